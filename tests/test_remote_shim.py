"""The remote shim run as the launchers run it: `python -c SOURCE`, a real local subprocess.

A plain pyzmq REP socket (a CurveZMQ server, as the daemon's is) stands in for the daemon's
registration socket and checks the shim's handshake with our own wire module; one real
ipykernel is reached with jupyter_client over CurveZMQ; the other kernels are small Python
scripts, which are all the shim needs to prove signals, kills, detaching and attaching.
Timeouts only turn a hang into a failure.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import psutil
import pytest
import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import KernelConnectionInfo

from kallichore.jupyter.wire import Message, Signer, deserialize, serialize
from kallichore.session.launch.remote_shim import (
    EVENT_PREFIX,
    MAX_LINE_BYTES,
    SOURCE,
    STDERR,
    STDOUT,
    Lines,
    Outbox,
    request_digest,
)

HANG_GUARD = 60  # seconds
# The registration socket's CurveZMQ key pair (the launch order carries the public key).
REGISTRATION_PUBLIC, REGISTRATION_SECRET = zmq.curve_keypair()
IPYKERNEL_ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
# A stand-in kernel: prints a line that looks like the shim's exit event, and "one"; then "two"
# once the file it is given appears (so the test knows "two" came while the shim had no
# controller), then marks it has, then waits.
SPOOF = '{"event": "exited", "returncode": 0}'
SCRIPT_KERNEL = f"""
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: print("usr1", flush=True))
print("\\x1ekallichore-shim " + {SPOOF!r})
print("one", flush=True)
go, done = sys.argv[1:3]
give_up = time.monotonic() + 120  # should a failed test leave it behind
while not os.path.exists(go) and time.monotonic() < give_up:
    time.sleep(0.02)
print("two", flush=True)
open(done, "w").close()
time.sleep(120)
"""

Context = zmq.Context[zmq.Socket[bytes]]


class Stream:
    """The lines a pipe gives, read by a thread so a test can wait for one with a timeout."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: IO[bytes]) -> None:
        for line in pipe:
            self.lines.put(line.decode())
        self.lines.put(None)

    def until(self, wanted: str) -> str:
        """The first line from now on that contains `wanted`."""
        while True:
            line = self.lines.get(timeout=HANG_GUARD)
            assert line is not None, f"the stream ended before {wanted!r}; saw {self.seen}"
            self.seen.append(line)
            if wanted in line:
                return line

    def event(self, name: str) -> dict[str, Any]:
        line = self.until(EVENT_PREFIX + '{"event": "' + name)
        event: dict[str, Any] = json.loads(line[len(EVENT_PREFIX) :])
        return event

    def rest(self) -> list[str]:
        """Every line until the end."""
        while (line := self.lines.get(timeout=HANG_GUARD)) is not None:
            self.seen.append(line)
        return self.seen


class Shim:
    """`python -c SOURCE [args]` with piped standard streams."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SOURCE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self.stdout = Stream(self.process.stdout)
        self.stderr = Stream(self.process.stderr)

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def hang_up(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def wait(self) -> int:
        return self.process.wait(timeout=HANG_GUARD)


@pytest.fixture
def ctx() -> Iterator[Context]:
    context: Context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def registration(ctx: Context) -> Iterator[zmq.Socket[bytes]]:
    """The daemon's side of JEP 66: a REP socket on a free loopback port, encrypted."""
    with ctx.socket(zmq.REP) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, REGISTRATION_SECRET)
        sock.setsockopt(zmq.RCVTIMEO, HANG_GUARD * 1000)
        sock.bind("tcp://127.0.0.1:0")
        yield sock


@pytest.fixture
def tmp(short_dir: Path) -> Path:
    """The shim's TMPDIR: short, for the attach socket's path, and checked empty at the end."""
    return short_dir


@pytest.fixture
def shims(tmp: Path) -> Iterator[list[Shim]]:
    """Shims a test starts; any still running at its end are killed, with their kernels."""
    started: list[Shim] = []
    yield started
    for shim in started:
        if shim.process.poll() is None:
            for child in psutil.Process(shim.process.pid).children(recursive=True):
                child.kill()
            shim.process.kill()
            shim.process.wait()


def launch(
    shims: list[Shim],
    registration: zmq.Socket[bytes],
    tmp: Path,
    argv: list[str],
    **order: Any,
) -> Shim:
    env = {**os.environ, "TMPDIR": str(tmp), "SLURM_JOB_ID": "4242"}
    shim = Shim(env=env)
    shims.append(shim)
    endpoint = registration.getsockopt_string(zmq.LAST_ENDPOINT)
    shim.send(
        json.dumps(
            {
                "argv": argv,
                "env": {"KALLICHORE_TEST": "set by the order"},
                "cwd": str(tmp),
                "signature_scheme": "hmac-sha256",
                "registration": endpoint,
                "registration_publickey": REGISTRATION_PUBLIC.decode(),
                "own_session": True,
                "reconnect_seconds": 0,
                **order,
            }
        )
    )
    return shim


def register(registration: zmq.Socket[bytes]) -> dict[str, Any]:
    """Take the shim's handshake_request, check its signature with the key it brings, answer
    it; its content, with the digest it is vouched for by under "digest"."""
    frames = registration.recv_multipart()
    key = json.loads(frames[-1])["key"]
    signer = Signer(key.encode())
    _, request = deserialize(frames, signer)
    assert request.msg_type == "handshake_request"
    reply = Message.build(
        "handshake_reply", {"status": "ok"}, session="test", parent=request.header
    )
    registration.send_multipart(serialize(reply, signer))
    return {**request.content, "digest": request_digest(frames)}


def script_kernel(tmp: Path) -> list[str]:
    return [sys.executable, "-c", SCRIPT_KERNEL, str(tmp / "go"), str(tmp / "done")]


def start_script_kernel(
    shims: list[Shim], registration: zmq.Socket[bytes], tmp: Path, **order: Any
) -> tuple[Shim, dict[str, Any]]:
    """A shim with `SCRIPT_KERNEL`, registered and started; the "kallichore" part of its
    handshake, which matches its start event."""
    shim = launch(shims, registration, tmp, script_kernel(tmp), **order)
    about = register(registration)["kallichore"]
    started = shim.stdout.event("started")
    assert started == {"event": "started", "pid": about["pid"], "attach": about["attach"]}
    shim.stdout.until("one")
    return shim, about


def assert_gone(pid: int, tmp: Path) -> None:
    """The kernel is no process any more and the shim left nothing in its TMPDIR."""
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert [path.name for path in tmp.iterdir() if path.name not in ("go", "done")] == []


def test_a_kernel_registers_runs_code_over_curve_is_interrupted_and_killed(
    shims: list[Shim], registration: zmq.Socket[bytes], tmp: Path
) -> None:
    shim = launch(shims, registration, tmp, IPYKERNEL_ARGV)
    content = register(registration)
    started = shim.stdout.event("started")
    assert started == {"event": "started", "pid": started["pid"], "attach": None}
    # The request came encrypted, with the secrets the shim made for the kernel, and the shim
    # vouched for it on its own output.
    assert shim.stdout.event("registering") == {
        "event": "registering",
        "digest": content.pop("digest"),
    }
    secrets = {name: content.pop(name) for name in ("key", "curve_publickey", "curve_secretkey")}
    assert len(secrets["key"]) == 32
    assert zmq.curve_public(secrets["curve_secretkey"].encode()) == (
        secrets["curve_publickey"].encode()
    )
    ports = {name: content.pop(name) for name in list(content) if name.endswith("_port")}
    assert sorted(ports) == ["control_port", "hb_port", "iopub_port", "shell_port", "stdin_port"]
    assert len(set(ports.values())) == 5
    assert content == {
        "ip": "127.0.0.1",
        "kallichore": {
            "pid": started["pid"],
            "host": socket.gethostname(),
            "job_id": "4242",
            "attach": None,
        },
    }
    [kernel_dir] = tmp.iterdir()
    connection_file = kernel_dir / "kernel.json"
    assert stat.S_IMODE(kernel_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(connection_file.stat().st_mode) == 0o600
    written = json.loads(connection_file.read_text())
    assert {name: written[name] for name in secrets} == secrets

    # What the daemon knows: the ports and the secrets from the handshake.
    info = {**ports, "ip": content["ip"], "transport": "tcp", **secrets}
    client = BlockingKernelClient()
    client.load_connection_info(cast(KernelConnectionInfo, info))
    client.start_channels()
    try:
        client.wait_for_ready(timeout=HANG_GUARD)
        printed: list[str] = []

        def collect(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                printed.append(msg["content"]["text"])

        code = "import os; print(6*7); os.write(1, b'raw out\\n'); os.write(2, b'raw err\\n')"
        reply = client.execute_interactive(code, output_hook=collect, timeout=HANG_GUARD)
        assert reply["content"]["status"] == "ok"
        assert "".join(printed) == "42\n"
        # What the kernel writes to its own stdout and stderr comes out of the shim's.
        assert shim.stdout.until("raw out") == "raw out\n"
        assert shim.stderr.until("raw err") == "raw err\n"
        # The order's environment was set on top of the shim's.
        code = "import os; print(os.environ['KALLICHORE_TEST'], os.getcwd())"
        printed.clear()
        client.execute_interactive(code, output_hook=collect, timeout=HANG_GUARD)
        assert "".join(printed) == f"set by the order {tmp}\n"

        # Interrupted once it runs the code: before that, ipykernel ignores SIGINT.
        msg_id = client.execute("import time; print('sleeping', flush=True); time.sleep(60)")
        while (msg := client.get_iopub_msg(timeout=HANG_GUARD))["msg_type"] != "stream":
            pass
        assert msg["parent_header"]["msg_id"] == msg_id
        shim.send("signal 2")
        reply = client.get_shell_msg(timeout=HANG_GUARD)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        client.stop_channels()

    shim.send("kill")
    assert shim.stdout.event("exited") == {"event": "exited", "returncode": -9}
    assert shim.wait() == 128 + 9
    assert_gone(started["pid"], tmp)


def test_stdin_ending_without_reconnect_kills_the_kernel(
    shims: list[Shim], registration: zmq.Socket[bytes], tmp: Path
) -> None:
    shim, about = start_script_kernel(shims, registration, tmp)
    shim.hang_up()
    assert shim.wait() == 128 + 9
    assert_gone(about["pid"], tmp)


def test_the_shim_ignores_sigint_and_sighup_and_reports_the_kernel_on_sigterm(
    shims: list[Shim], registration: zmq.Socket[bytes], tmp: Path
) -> None:
    """In the shim's process group (Slurm's case), `signal N` goes to the kernel itself."""
    shim, about = start_script_kernel(shims, registration, tmp, own_session=False)
    pid = about["pid"]
    assert shim.stdout.seen[-2] == "\\x1ekallichore-shim " + SPOOF + "\n"
    assert os.getpgid(pid) == os.getpgid(shim.process.pid)
    shim.process.send_signal(signal.SIGINT)
    shim.process.send_signal(signal.SIGHUP)
    shim.send(f"signal {signal.SIGUSR1.value}")
    assert shim.stdout.until("usr1") == "usr1\n"
    shim.process.terminate()
    assert shim.stdout.event("exited") == {"event": "exited", "returncode": -9}
    assert shim.wait() == 128 + 9
    assert_gone(pid, tmp)


def test_an_attach_gets_what_the_kernel_wrote_meanwhile_and_can_kill_it(
    shims: list[Shim], registration: zmq.Socket[bytes], tmp: Path
) -> None:
    shim, about = start_script_kernel(shims, registration, tmp, reconnect_seconds=HANG_GUARD)
    attach_path = about["attach"]
    assert stat.S_IMODE(Path(attach_path).parent.stat().st_mode) == 0o700
    shim.hang_up()
    assert shim.stdout.rest()[-1] == "one\n"
    (tmp / "go").touch()
    while not (tmp / "done").exists():
        assert shim.process.poll() is None
        threading.Event().wait(0.02)

    attached = Shim("attach", attach_path, env=dict(os.environ))
    shims.append(attached)
    assert attached.stdout.event("attached") == {"event": "attached"}
    assert attached.stdout.until("two") == "two\n"
    # A second attach takes over: the daemon may see a connection die before the shim does.
    second = Shim("attach", attach_path, env=dict(os.environ))
    shims.append(second)
    assert attached.wait() == 1
    assert second.stdout.event("attached") == {"event": "attached"}
    second.send("kill")
    assert second.stdout.event("exited") == {"event": "exited", "returncode": -9}
    assert second.wait() == 128 + 9
    assert shim.wait() == 128 + 9
    assert_gone(about["pid"], tmp)


def test_without_an_attach_the_kernel_is_killed_after_the_grace_period(
    shims: list[Shim], registration: zmq.Socket[bytes], tmp: Path
) -> None:
    shim, about = start_script_kernel(shims, registration, tmp, reconnect_seconds=0.2)
    shim.hang_up()
    assert shim.wait() == 128 + 9
    assert_gone(about["pid"], tmp)
    attached = Shim("attach", about["attach"], env=dict(os.environ))
    assert attached.wait() == 1
    assert "cannot attach" in attached.stderr.rest()[0]


def test_a_handshake_without_a_reply_kills_the_kernel(
    shims: list[Shim], registration: zmq.Socket[bytes], tmp: Path
) -> None:
    shim = launch(shims, registration, tmp, script_kernel(tmp), handshake_seconds=0.2)
    pid = shim.stdout.event("started")["pid"]
    registration.recv_multipart()
    assert shim.wait() == 1
    assert "no handshake reply within 0.2 s" in "".join(shim.stderr.rest())
    assert_gone(pid, tmp)


@pytest.mark.parametrize(
    ("mistake", "said"),
    [
        (
            {"registration_publickey": None},
            "invalid launch order: 'registration_publickey' in the launch order has the wrong type",
        ),
        (
            {"argv": ["/nonexistent/kernel"]},
            "cannot start the kernel: [Errno 2] No such file or directory: '/nonexistent/kernel'",
        ),
    ],
)
def test_a_kernel_that_cannot_start_is_explained(
    shims: list[Shim], registration: zmq.Socket[bytes], tmp: Path, mistake: Any, said: str
) -> None:
    order = {"argv": IPYKERNEL_ARGV, **mistake}
    shim = launch(shims, registration, tmp, **order)
    assert shim.wait() == 1
    assert shim.stderr.rest() == [f"kallichore-shim: {said}\n"]
    assert shim.stdout.rest() == []
    assert list(tmp.iterdir()) == []


def test_long_lines_are_passed_on_in_pieces() -> None:
    lines = Lines()
    assert lines.feed(b"a\nb") == [b"a\n"]
    assert lines.feed(b"c" * MAX_LINE_BYTES + b"d") == [b"b" + b"c" * (MAX_LINE_BYTES - 1) + b"\n"]
    assert lines.end() == [b"cd\n"]
    assert lines.end() == []


def test_the_outbox_drops_the_oldest_output_never_an_event_and_says_so() -> None:
    outbox = Outbox(limit=10)
    outbox.put(STDOUT, b"event\n", droppable=False)
    outbox.put(STDOUT, b"one 1\n")
    outbox.put(STDERR, b"two 2\n")
    outbox.advance(2)  # "ev" written
    outbox.put(STDOUT, b"three\n")
    taken = []
    while outbox:
        stream, rest = outbox.first()
        taken.append((stream, rest))
        outbox.advance(len(rest))
    assert taken == [
        (STDOUT, b"ent\n"),
        (STDERR, b"kallichore-shim: 12 bytes of kernel output dropped\n"),
        (STDOUT, b"three\n"),
    ]


def test_an_attach_is_greeted_then_gets_lines_tagged_and_a_new_one_the_whole_line() -> None:
    outbox = Outbox()
    outbox.put(STDERR, b"err\n")
    outbox.put(STDOUT, b"out\n")
    outbox.restart(b"hello\n", tagged=True)
    assert outbox.first() == (STDOUT, b"1hello\n")
    outbox.advance(7)
    assert outbox.first() == (STDERR, b"2err\n")
    outbox.advance(2)
    assert outbox.first() == (STDERR, b"rr\n")
    outbox.restart(b"again\n", tagged=True)
    outbox.advance(7)
    assert outbox.first() == (STDERR, b"2err\n")
    outbox.advance(5)
    assert outbox.first() == (STDOUT, b"1out\n")


def test_the_source_is_python_3_8() -> None:
    """Cluster nodes run old Pythons: the script must not use newer syntax."""
    ast.parse(SOURCE, feature_version=(3, 8))
