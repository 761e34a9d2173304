"""The fault suite: kernels killed or stopped, clients dropped mid-stream or by the hundred, a
full disk under the log, and issue 10's findings, each tried against a real daemon or server
on loopback. What must hold: the session at fault says so, every other session is untouched,
and the daemon goes on serving without leaking.

Quick with the other tests; `nox -s faults` runs it in full (see tests/suites.py).
"""

from __future__ import annotations

import collections
import errno
import json
import os
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from kallichore.client import KallichoreClient, message
from kallichore.jupyter.wire import Channel
from kallichore.session.state import REPLY_IDLE_GRACE_SECONDS
from tests.conftest import (
    TIMEOUT,
    TOKEN,
    daemon,
    is_idle,
    kernel_events,
    new_session_body,
    served_client,
    started_session,
    stream_text,
    until,
)
from tests.hostile_kernel import served_hostile_kernel
from tests.raw_channels import RawChannels
from tests.suites import (
    assert_no_traceback,
    budget,
    open_fds,
    refusal_status,
    threads,
)

# A full run's examples can take longer than the default timeout of one test.
pytestmark = [pytest.mark.faults, pytest.mark.timeout(budget(180, 3600))]


def is_status(status: str) -> Any:
    return lambda f: f.get("kind") == "kernel" and f.get("status", {}).get("status") == status


async def kernel_pid(client: KallichoreClient, session_id: str) -> int:
    pid: int = (await client.get_session(session_id))["process_id"]
    return pid


async def assert_executes(client: KallichoreClient, session_id: str) -> None:
    async with client.channels(session_id) as channels:
        result = await channels.execute("print(6 * 7)")
    assert stream_text(result.frames) == "42\n"


# -- kernels killed or stopped ---------------------------------------------------------------


async def test_a_kernel_killed_by_sigkill_is_reported_and_the_others_go_on(
    client: KallichoreClient,
) -> None:
    await started_session(client, "python-1")
    await started_session(client, "python-2")
    pid = await kernel_pid(client, "python-1")
    async with client.channels("python-1") as channels:
        os.kill(pid, signal.SIGKILL)
        frames = await until(channels, lambda f: f.get("kind") == "kernel" and "exited" in f)
    assert kernel_events(frames, "exited") == [-signal.SIGKILL]
    assert (await client.get_session("python-1"))["status"] == "exited"
    await assert_executes(client, "python-2")


async def test_a_stopped_kernel_is_reported_offline_and_the_others_go_on(tmp_path: Path) -> None:
    async with served_client(tmp_path / "runtime", heartbeat_timeout=1.0) as (client, _):
        await started_session(client, "python-1")
        await started_session(client, "python-2")
        pid = await kernel_pid(client, "python-1")
        async with client.channels("python-1") as channels:
            os.kill(pid, signal.SIGSTOP)
            try:
                await until(channels, is_status("offline"))
                await assert_executes(client, "python-2")
            finally:
                os.kill(pid, signal.SIGCONT)
            frames = await until(channels, is_status("idle"))
        assert {"status": "idle", "reason": "heartbeat detected after offline"} in kernel_events(
            frames, "status"
        )
        await assert_executes(client, "python-1")


# -- clients dropped at random points of a stream --------------------------------------------

LINES = budget(5_000, 100_000)
DROPS = budget(3, 25)


async def stream_with_drops(port: int, resume: bool, rng: random.Random) -> list[str]:
    """Run code printing LINES numbered lines, dropping the client (TCP reset, no closing
    handshake) DROPS times at random points and reconnecting: the lines the client saw.

    A resuming client asks for numbered frames (`?resume`) and reconnects with
    `?resume=<seq>`, the last `seq` it saw; the others just reconnect."""
    request = message(
        "execute_request",
        # One stream message per line (flushed), so that drops land mid-stream.
        {"code": f"for i in range({LINES}): print(i, flush=True)", "store_history": False},
    )
    msg_id = request["header"]["msg_id"]
    texts: list[str] = []
    seq: Any = None
    channels = await RawChannels.connect(port, "python-1", TOKEN, "resume" if resume else "")
    await channels.send_message(request)
    for drop in range(DROPS + 1):
        frames_to_read = rng.randint(1, 40) if drop < DROPS else -1
        while frames_to_read:
            frame = await channels.receive()
            assert frame is not None, "the server closed the connection"
            seq = frame.get("seq", seq)
            texts.append(stream_text([frame]))
            if is_idle(frame, msg_id):
                await channels.close()
                return "".join(texts).splitlines()
            frames_to_read -= 1
        # Let the server write more than was read, into buffers that the drop throws away.
        await trio.sleep(0.05)
        await channels.abort()
        query = ("resume" if seq is None else f"resume={seq}") if resume else ""
        channels = await RawChannels.connect(port, "python-1", TOKEN, query)
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    "resume",
    [
        pytest.param(False, id="plain"),
        pytest.param(True, id="resuming"),
    ],
)
async def test_a_client_dropped_at_random_points_loses_no_line(
    client: KallichoreClient, server: Any, resume: bool
) -> None:
    await started_session(client, "python-1")
    lines = await stream_with_drops(server.port, resume, random.Random(budget(10, os.getpid())))
    counts = collections.Counter(lines)
    missing = [n for n in range(LINES) if str(n) not in counts]
    assert not missing, f"{len(missing)} of {LINES} lines lost, the first {missing[:5]}"
    if resume:
        assert max(counts.values()) == 1, "a resuming client saw a line twice"


# -- many clients connecting and dropping ----------------------------------------------------

CLIENTS = budget(100, 1000)


async def connect_and_drop(port: int, token: str | None, rng: random.Random) -> None:
    """One client: connect, maybe ask something, then go away cleanly or not at all."""
    channels = await RawChannels.connect(port, "python-1", token)
    if rng.random() < 0.5:
        await channels.send_message(message("kernel_info_request", {}))
        if rng.random() < 0.5:
            await channels.receive()
    if rng.random() < 0.5:
        await channels.abort()
    else:
        await channels.close()


async def test_clients_connecting_and_dropping_in_a_loop_leak_nothing(tmp_path: Path) -> None:
    rng = random.Random(budget(10, os.getpid()))
    async with (
        daemon(tmp_path, "--transport", "tcp", "--port", "0") as d,
        d.client() as client,
    ):
        await started_session(client, "python-1")
        port, pid = int(d.connection["port"]), d.process.pid
        await connect_and_drop(port, d.token, rng)
        await assert_executes(client, "python-1")
        fds, tasks = open_fds(pid), threads(pid)
        for _ in range(CLIENTS // 5):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(connect_and_drop, port, d.token, rng)
        await assert_executes(client, "python-1")
        # A dropped connection's socket is closed once the server notices: a guard, not a pace.
        with trio.move_on_after(30):
            while open_fds(pid) > fds:
                await trio.sleep(0.1)
        assert open_fds(pid) <= fds
        assert threads(pid) <= tasks
        assert (await client.status())["sessions"] == 1
    assert_no_traceback(d.log)


# -- a full disk under the log file ----------------------------------------------------------


@pytest.fixture
def full_disk(short_dir: Path) -> Any:
    """A 1 MiB tmpfs, to be filled (root only; skipped elsewhere)."""
    where = short_dir / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> None:
    """Write zeros to `disk` until it is full."""
    with (disk / "filler").open("wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


async def test_the_daemon_serves_on_when_its_log_cannot_be_written(
    tmp_path: Path, full_disk: Path
) -> None:
    log = full_disk / "kallichore.log"
    args = ("--transport", "tcp", "--port", "0", "--log-file", str(log), "--log-level", "debug")
    async with daemon(tmp_path, *args) as d, d.client() as client:
        fill(full_disk)
        # What the daemon logs at info whatever else it does, past the log's last page
        # (tmpfs lets a file fill the page it has).
        for n in range(200):
            await client.client_heartbeat(os.getpid() if n % 2 else 1)
        for n in range(3):
            await started_session(client, f"python-{n}")
            await assert_executes(client, f"python-{n}")
        assert (await client.status())["sessions"] == 3
        assert d.process.returncode is None
    # The log was written to, and failed: the daemon's stderr says why.
    assert "No space left on device" in d.log.read_text()


# -- issue 10's findings, one line each ------------------------------------------------------

HUGE = b"1" + b"0" * 312


def sampler(interval: bytes) -> tuple[tuple[str, str, bytes], ...]:
    return (
        ("POST", "/server_configuration", b'{"resource_sample_interval_ms": ' + interval + b"}"),
    )


def new_and_started(**fields: Any) -> tuple[tuple[str, str, bytes], ...]:
    """Create a session with `fields`, then start it (some bad input fails only then)."""
    body = json.dumps(new_session_body("hostile", **fields)).encode()
    return (("PUT", "/sessions", body), ("POST", "/sessions/hostile/start", b""))


# Each row: requests sent in turn (with `TOKEN` or without), of which one at least must be
# refused with a 4xx and none may get an undocumented 5xx.
HOSTILE_REQUESTS = [
    pytest.param(sampler(HUGE), None, id="1-sampler-anon"),
    pytest.param(sampler(HUGE), TOKEN, id="1-sampler-token"),
    pytest.param(
        (("POST", "/server_configuration", b'{"idle_shutdown_hours": 0}'),),
        None,
        id="1-idle-anon",
    ),
    pytest.param(
        (("POST", "/client_heartbeat", b'{"process_id": 2147483648}'),),
        None,
        id="2-heartbeat-pid",
    ),
    pytest.param(
        (
            (
                "PUT",
                "/sessions",
                json.dumps(new_session_body("hostile"))
                .encode()
                .replace(b'"connection_timeout": 60', b'"connection_timeout": 1' + b"0" * 400),
            ),
        ),
        TOKEN,
        id="6-connection-timeout",
    ),
    pytest.param(new_and_started(argv=["python3", "a\0b"]), TOKEN, id="6-nul-argv"),
    pytest.param(
        new_and_started(env=[{"action": "replace", "name": "X", "value": "a\0"}]),
        TOKEN,
        id="6-nul-env",
    ),
    pytest.param(
        new_and_started(argv=["python3", "-c", "\ud800"]),
        TOKEN,
        id="6-surrogate-argv",
    ),
    pytest.param(
        new_and_started(working_directory="\ud800"),
        TOKEN,
        id="6-surrogate-cwd",
    ),
]


@pytest.mark.parametrize(("requests", "token"), HOSTILE_REQUESTS)
async def test_a_hostile_request_is_refused_and_harms_nothing(
    tmp_path: Path, requests: tuple[tuple[str, str, bytes], ...], token: str | None
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    args = ("--transport", "tcp", "--port", "0", "--token", str(token_file))
    async with daemon(tmp_path, *args) as d, d.client(token) as sender, d.client() as client:
        statuses = [await refusal_status(sender.http, *request) for request in requests]
        assert any(400 <= status < 500 for status in statuses), f"accepted: {statuses}"
        await started_session(client, "python-1")
        await assert_executes(client, "python-1")
    assert_no_traceback(d.log)


async def test_an_anonymous_listing_shows_no_environment(
    client: KallichoreClient, anonymous: KallichoreClient
) -> None:
    await client.create_session(**new_session_body("python-1"))
    shown = [await anonymous.get_session("python-1"), *await anonymous.list_sessions()]
    for session in shown:
        # Blanked rather than left out, so that answers still match the OpenAPI schema.
        assert not any(session.get(field) for field in ("initial_env", "argv", "working_directory"))


async def test_the_token_is_never_logged_and_the_log_file_is_private(tmp_path: Path) -> None:
    log = tmp_path / "kallichore.log"
    async with daemon(tmp_path, "--transport", "tcp", "--port", "0", "--log-file", str(log)) as d:
        token = d.token
        assert token
    for written in (log, d.log):
        assert token not in written.read_text()
    assert log.stat().st_mode & 0o777 == 0o600


async def test_no_kernel_outlives_its_killed_daemon(tmp_path: Path) -> None:
    async with (
        daemon(tmp_path, "--transport", "tcp", "--port", "0") as d,
        d.client() as client,
    ):
        await started_session(client, "python-1")
        kernel = psutil.Process(await kernel_pid(client, "python-1"))
        d.process.send_signal(signal.SIGKILL)
        await d.wait()
    try:
        # "Within seconds" (issue 10); the guard is generous.
        with trio.move_on_after(20):
            while kernel.is_running() and kernel.status() != psutil.STATUS_ZOMBIE:
                await trio.sleep(0.2)
        assert not kernel.is_running() or kernel.status() == psutil.STATUS_ZOMBIE
    finally:
        if kernel.is_running():
            kernel.kill()


async def test_a_squatted_socket_path_does_not_refuse_the_channels(
    tmp_path: Path, short_dir: Path
) -> None:
    args = ("--transport", "socket", "--socket-dir", str(short_dir))
    async with daemon(tmp_path, *args) as d, d.client() as client:
        await started_session(client, "python-1")
        # What another user could do in a shared socket directory.
        (short_dir / f"kc-{d.process.pid}-python-1.sock").touch()
        await assert_executes(client, "python-1")


async def test_the_daemon_logs_a_session_s_life(tmp_path: Path) -> None:
    async with daemon(tmp_path, "--transport", "tcp", "--port", "0") as d, d.client() as client:
        await started_session(client, "python-logged")
        await client.kill("python-logged")
    log = d.log.read_text()
    assert log.count("python-logged") >= 2, log[-2000:]


@pytest.mark.parametrize("idle", ["late", "lost"])
async def test_an_idle_late_or_lost_holds_the_queue_until_the_kernel_answers_a_probe(
    tmp_path: Path, idle: str
) -> None:
    """An execution's idle that has not come a grace period after its reply: the session asks
    the kernel (a kernel_info_request on shell, which no client sees). An idle that was late
    (a loaded machine) comes before the kernel's answer and lets the next execution go as
    usual; one that was lost (a PUB socket drops messages) is proven lost by the answer."""
    async with (
        served_hostile_kernel(tmp_path / "runtime") as (client, _, kernel),
        client.channels("hostile") as channels,
    ):
        assert await kernel.published(channels, "ready")
        kernel.hold_kernel_info = True
        first = await channels.send(message("execute_request", {"code": "1"}))
        second = await channels.send(message("execute_request", {"code": "2"}))
        with trio.fail_after(TIMEOUT):
            identities, request = await kernel.held.receive()
        assert request.msg_id == first
        await kernel.publish_status(request, "busy")
        await kernel.reply(Channel.SHELL, identities, request, "execute_reply", {"status": "ok"})
        with trio.fail_after(TIMEOUT):
            probe_identities, probe = await kernel.held.receive()
        assert probe.msg_type == "kernel_info_request"
        # However long the kernel takes to answer, the queue waits for it.
        with trio.move_on_after(REPLY_IDLE_GRACE_SECONDS):
            too_soon = await kernel.held.receive()
            pytest.fail(f"{too_soon[1].msg_type} sent before the kernel answered the probe")
        if idle == "late":
            await kernel.publish_status(request, "idle")
        else:
            await kernel.answer_kernel_info(Channel.SHELL, probe_identities, probe)
        with trio.fail_after(TIMEOUT):
            identities, request = await kernel.held.receive()
        assert request.msg_id == second
        if idle == "late":
            await kernel.answer_kernel_info(Channel.SHELL, probe_identities, probe)
        await kernel.publish_status(request, "busy")
        await kernel.reply(Channel.SHELL, identities, request, "execute_reply", {"status": "ok"})
        await kernel.publish_status(request, "idle")
        frames = await until(channels, lambda f: is_idle(f, second))
        seen = {
            (f["header"]["msg_type"], f["parent_header"].get("msg_id"))
            for f in frames
            if f.get("kind") == "jupyter"
        }
        assert ("execute_reply", first) in seen
        assert {msg_type for msg_type, _ in seen} == {"status", "execute_reply"}
        assert {parent for _, parent in seen} == {first, second}  # nothing of the probe


async def test_an_execution_sent_after_an_interrupt_waits_for_the_interrupted_one_to_end(
    tmp_path: Path,
) -> None:
    """An interrupt drops the executions held, but the one at the kernel keeps its place until
    its idle: sent earlier, the next would reach ipykernel while it still aborts what comes
    after the interrupted execution's error (an agent's next call came back `aborted`)."""
    async with (
        served_hostile_kernel(tmp_path / "runtime") as (client, _, kernel),
        client.channels("hostile") as channels,
    ):
        assert await kernel.published(channels, "ready")
        await channels.send(message("execute_request", {"code": "sleep"}))
        with trio.fail_after(TIMEOUT):
            identities, request = await kernel.held.receive()
        await kernel.publish_status(request, "busy")
        held = await channels.send(message("execute_request", {"code": "held"}))
        await until(channels, lambda f: f.get("executionQueued") == held)
        await channels.send(message("interrupt_request", {}, "control"))
        after = await channels.send(message("execute_request", {"code": "after"}))
        await until(channels, lambda f: f.get("executionQueued") == after)
        with pytest.raises(trio.WouldBlock):
            kernel.held.receive_nowait()
        error = {"status": "error", "ename": "KeyboardInterrupt", "evalue": "", "traceback": []}
        await kernel.reply(Channel.SHELL, identities, request, "execute_reply", error)
        await kernel.publish_status(request, "idle")
        with trio.fail_after(TIMEOUT):
            _, request = await kernel.held.receive()
        assert request.msg_id == after  # `held` was dropped by the interrupt
