"""The subcommands for a running daemon (`kallichore ls`, `run`, `kernelspecs`, `attach`), each
run as a user runs it, a subprocess, against one real daemon on TCP with a real ipykernel."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from kallichore.client import KallichoreClient
from tests.conftest import IPYKERNEL_ARGV, TIMEOUT, TOKEN, daemon_command
from tests.conftest import daemon as socket_daemon
from tests.test_public_surface import imports_of

PNG = b"\x89PNG\r\n\x1a\n\x00\xffnot really"


@attrs.frozen
class Daemon:
    connection_file: Path
    url: str
    http: httpx.Client


def kallichore(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`kallichore ARGS` run to its end, with no KALLICHORE_* variable but those of `env`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KALLICHORE_")}
    return subprocess.run(
        daemon_command(*args),
        input=stdin,
        capture_output=True,
        text=True,
        env=environment | (env or {}),
        timeout=TIMEOUT,
        check=False,
    )


def read_when_written(path: Path, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + TIMEOUT
    while not (path.exists() and path.read_text()):
        assert process.poll() is None, "the daemon exited"
        assert time.monotonic() < deadline, "the daemon wrote no connection file"
        time.sleep(0.05)
    return path.read_text()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module, with a token, and an ipykernel session `shared` (the session
    a person's Positron would have)."""
    base = tmp_path_factory.mktemp("commands")
    token_file = base / "token"
    token_file.write_text(TOKEN)
    connection_file = base / "connection.json"
    arguments = ["--transport", "tcp", "--connection-file", str(connection_file)]
    with (base / "daemon.log").open("wb") as log:
        process = subprocess.Popen(
            daemon_command(*arguments, "--token", str(token_file)), stdout=log, stderr=log
        )
    try:
        url = json.loads(read_when_written(connection_file, process))["base_path"]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT) as http:
            body = {
                "session_id": "shared",
                "argv": list(IPYKERNEL_ARGV),
                "display_name": "Shared",
                "language": "python",
                "username": "tester",
            }
            assert http.put("/sessions", json=body).status_code == 200
            assert http.post("/sessions/shared/start").status_code == 200
            yield Daemon(connection_file, url, http)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)


def test_help_says_what_each_command_does() -> None:
    daemon_help = kallichore("--help")
    assert daemon_help.returncode == 0
    assert "--port" in daemon_help.stdout  # the daemon's own flags, as they were
    assert "ls | start | run | kernelspecs | attach" in " ".join(daemon_help.stdout.split())
    attach_help = kallichore("attach", "--help")
    assert attach_help.returncode == 0
    assert "never displaces the session's own client" in " ".join(attach_help.stdout.split())
    for flag in ("--connection-file", "--url", "--unix-socket", "--token", "KALLICHORE_TOKEN"):
        assert flag in attach_help.stdout


def test_the_command_line_knows_only_the_client() -> None:
    for name, imported in imports_of("kallichore.commands").items():
        ours = {m for m in imported if m.startswith("kallichore")}
        assert all(m.startswith(("kallichore.client", "kallichore.commands")) for m in ours), name


def test_kernelspecs(daemon: Daemon) -> None:
    listed = kallichore("kernelspecs", "--url", daemon.url, env={"KALLICHORE_TOKEN": TOKEN})
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "LANGUAGE", "DISPLAY", "NAME"]
    assert any(row.split()[:3] == ["python3", "*", "python"] for row in rows)


def test_ls_and_where_the_daemon_is(daemon: Daemon) -> None:
    listed = kallichore("ls", env={"KALLICHORE_CONNECTION_FILE": str(daemon.connection_file)})
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["SESSION", "STATUS", "LANGUAGE", "NAME", "PID", "CLIENT", "STARTED"]
    [shared] = [row.split() for row in rows if row.startswith("shared ")]
    assert shared[1:4] == ["idle", "python", "Shared"]
    assert int(shared[4]) > 0  # the kernel's pid
    nowhere = kallichore("ls", "--url", "http://127.0.0.1:1")
    assert nowhere.returncode == 1
    assert nowhere.stderr.startswith("Error: cannot reach the daemon")
    refused = kallichore("kernelspecs", "--url", daemon.url, "--token", "wrong")
    assert refused.returncode == 1
    assert refused.stderr.startswith("Error: the daemon refused: HTTP 401")


def test_start_then_run(daemon: Daemon) -> None:
    address = ("--connection-file", str(daemon.connection_file))
    started = kallichore("start", "--session", "scratch", *address)
    assert started.returncode == 0, started.stderr
    assert started.stdout == "scratch\n"
    assert "started session scratch (kernelspec python3)" in started.stderr
    ambiguous = kallichore("run", "1", *address)
    assert ambiguous.returncode == 1
    assert "2 sessions are running" in ambiguous.stderr
    code = "import sys; print('out'); print('err', file=sys.stderr); x = 6; x * 7"
    printed = kallichore("run", "--session", "scratch", code, *address)
    assert (printed.returncode, printed.stdout, printed.stderr) == (0, "out\n42\n", "err\n")
    failed = kallichore("run", "-s", "scratch", "-", *address, stdin="print(x)\n1 / 0\n")
    assert failed.returncode == 1
    assert failed.stdout == "6\n"
    assert "ZeroDivisionError: division by zero" in failed.stderr
    assert "\x1b[" not in failed.stderr  # no colours but on a terminal
    show = f"from IPython.display import Image, display; display(Image(data={PNG!r}, format='png'))"
    as_json = kallichore("run", "--json", "-s", "scratch", show, *address)
    assert as_json.returncode == 0, as_json.stderr
    *outputs, result = [json.loads(line) for line in as_json.stdout.splitlines()]
    [display] = outputs
    assert base64.b64decode(display["data"]["image/png"]) == PNG
    assert (result["type"], result["status"]) == ("result", "ok")
    timed_out = kallichore(
        "run", "-s", "scratch", "--timeout", "1", "import time; time.sleep(30)", *address
    )
    assert timed_out.returncode == 1
    assert "timed out after 1 s: the kernel was interrupted" in timed_out.stderr


class Console:
    """`kallichore attach` in a subprocess: what it printed so far, and its input."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stdout = ""
        self.stderr = ""

    async def collect(self, stream: trio.abc.ReceiveStream, name: str) -> None:
        async for chunk in stream:
            setattr(self, name, getattr(self, name) + chunk.decode())

    async def type(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(text.encode())

    async def until(self, text: str, name: str = "stdout") -> None:
        with trio.fail_after(TIMEOUT):
            while text not in getattr(self, name):
                await trio.sleep(0.05)


@asynccontextmanager
async def attached(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[Console]:
    process = await trio.lowlevel.open_process(
        daemon_command("attach", *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=None if env is None else os.environ | env,
    )
    console = Console(process)
    async with trio.open_nursery() as nursery:
        assert process.stdout is not None
        assert process.stderr is not None
        nursery.start_soon(console.collect, process.stdout, "stdout")
        nursery.start_soon(console.collect, process.stderr, "stderr")
        try:
            yield console
        finally:
            if process.returncode is None:
                with trio.move_on_after(TIMEOUT):
                    await process.wait()
                process.kill()


async def test_attach_beside_the_sessions_own_client(daemon: Daemon) -> None:
    """A console on `shared` while its Kallichore channels client (Positron) stays connected:
    each sees what the other runs; input(), Ctrl-C and blocks work; Ctrl-D detaches."""
    async with (
        KallichoreClient.from_connection_file(daemon.connection_file) as client,
        client.channels("shared") as positron,
        attached("shared", "--connection-file", str(daemon.connection_file)) as console,
    ):
        await console.until("Ctrl-D detaches", "stderr")
        await console.type("for i in range(2):\n    print('line', i)\n\n")
        await console.until("line 0\nline 1\n")
        await console.type("name = input('who? ')\nalice\nprint('hi', name)\n")
        await console.until("who? hi alice\n")
        seen = await positron.execute("print('from positron')")
        assert seen.stdout == "from positron\n"
        await console.until("from positron\n")
        await console.until("(another client): print('from positron')", "stderr")
        await console.type("import time; print('sleeping', flush=True); time.sleep(30)\n")
        await console.until("sleeping\n")
        console.process.send_signal(signal.SIGINT)
        await console.until("KeyboardInterrupt", "stderr")
        await console.type("6 * 7\n")
        await console.until("]: 42\n")
        assert daemon.http.get("/sessions/shared").json()["connected"] is True
        assert (await positron.execute("print(name)")).stdout == "alice\n"
        assert console.process.stdin is not None
        await console.process.stdin.aclose()
        with trio.fail_after(TIMEOUT):
            assert await console.process.wait() == 0
        # Positron was never displaced: its connection still works.
        assert (await positron.execute("print('still here')")).stdout == "still here\n"


async def test_attach_where_the_jupyter_channels_are_not_served(
    tmp_path: Path, short_dir: Path
) -> None:
    """The API on a Unix socket (found through the variables): no Jupyter channels, so the
    console runs each statement through the streamed /execute, on the session it starts."""
    api = short_dir / "api.sock"
    async with socket_daemon(tmp_path, "--unix-socket", str(api)) as running:
        env = {"KALLICHORE_UNIX_SOCKET": str(api), "KALLICHORE_TOKEN": str(running.token)}
        async with attached(env=env) as console:
            await console.until("Ctrl-D detaches", "stderr")
            assert "started session python3-" in console.stderr
            await console.type("for i in range(2):\n    print('line', i)\n\nx = 6\nx * 7\n")
            await console.until("line 0\nline 1\n42\n")
            assert console.process.stdin is not None
            await console.process.stdin.aclose()
            with trio.fail_after(TIMEOUT):
                assert await console.process.wait() == 0
