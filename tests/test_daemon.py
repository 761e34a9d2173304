"""The daemon as a subprocess: flags, connection files, transports, idle shutdown, clean exits."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from kallichore.cli import OPEN_FILES, raise_open_files_limit
from kallichore.client import ApiError, KallichoreClient, execute_request, open_channels
from tests.conftest import (
    TIMEOUT,
    daemon,
    daemon_command,
    is_idle,
    is_reply,
    new_session_body,
    started_session,
    stream_text,
    until,
)

TCP_KEYS = [
    "port",
    "base_path",
    "transport",
    "server_path",
    "server_pid",
    "bearer_token",
    "log_path",
]
SOCKET_KEYS = ["socket_path", "transport", "server_path", "server_pid", "bearer_token", "log_path"]


async def raw_request(path: Path, request: bytes) -> bytes:
    """One HTTP/1.1 exchange by hand over a Unix socket; the response read to its length.

    (hypercorn answers `Connection: close` but leaves the connection open, so reading to the
    end of the stream would wait for its keep-alive timeout.)
    """
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(request)
        response = b""
        with trio.fail_after(TIMEOUT):
            while b"\r\n\r\n" not in response:
                response += await stream.receive_some()
            head, _, body = response.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += await stream.receive_some()
    return head + b"\r\n\r\n" + body


def kernel_pids(sessions: list[dict[str, Any]]) -> list[int]:
    return [s["process_id"] for s in sessions if "process_id" in s]


async def send_code(client: KallichoreClient, session_id: str, code: str) -> None:
    """Send an execute_request over the session's channels and leave it running."""
    async with client.channels(session_id) as channels:
        msg_id = await channels.send(execute_request(code))
        # Wait until the kernel has it: its busy status comes back.
        await until(
            channels,
            lambda f: is_reply(f, msg_id, "status") and f["content"]["execution_state"] == "busy",
        )


# -- flags and connection files -----------------------------------------------------------------


def test_help_and_version() -> None:
    help_text = subprocess.run(daemon_command("--help"), capture_output=True, text=True, check=True)
    for flag in (
        "--port",
        "--token",
        "--transport",
        "--connection-file",
        "--unix-socket",
        "--socket-dir",
        "--idle-shutdown-hours",
        "--resource-sample-interval",
        "--log-level",
        "--log-file",
        "--handshake-socket",
        "--state-dir",
        "--version",
        "--session-buffer-mb",
        "--kernel-transport",
        "--host",
        "--default-kernel",
    ):
        assert flag in help_text.stdout
    version = subprocess.run(
        daemon_command("--version"), capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("kallichore ")
    alias = Path(sys.executable).parent / "kcserver"
    assert alias.exists()


async def test_tcp_connection_file(tmp_path: Path) -> None:
    async with daemon(tmp_path, "--port", "0", "--token", "none", "--transport", "tcp") as d:
        info = d.connection
        assert list(info) == TCP_KEYS
        assert info["transport"] == "tcp"
        assert info["server_pid"] == d.process.pid
        assert info["port"] > 0
        assert info["base_path"] == f"http://127.0.0.1:{info['port']}"
        assert info["bearer_token"] is None
        assert info["log_path"] is None
        assert Path(info["server_path"]).is_absolute()
        path = tmp_path / "connection-0.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        async with d.client() as client:
            status = await client.status()
        assert status["process_id"] == d.process.pid
    assert await d.wait() == 0
    assert not path.exists()


async def test_default_transport_with_a_connection_file_is_a_unix_socket(tmp_path: Path) -> None:
    async with daemon(tmp_path, "--port", "0", "--token", "none") as d:
        info = d.connection
        assert list(info) == SOCKET_KEYS
        assert info["transport"] == "socket"
        socket_path = Path(info["socket_path"])
        assert socket_path.is_socket()
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        # A raw HTTP request over the socket, as Kallichore's own tests make it.
        response = await raw_request(
            socket_path, b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        assert response.startswith(b"HTTP/1.1 200")
        assert b"application/json" in response
    assert await d.wait() == 0
    assert not socket_path.exists()


async def test_explicit_socket_transport_and_paths(tmp_path: Path, short_dir: Path) -> None:
    explicit = short_dir / "api.sock"
    async with daemon(tmp_path, "--transport", "socket", "--unix-socket", str(explicit)) as d:
        assert d.connection["socket_path"] == str(explicit)
        async with d.client() as client:
            assert (await client.http.get("/status")).status_code == 200
    assert await d.wait() == 0
    async with daemon(tmp_path, "--transport", "socket", "--socket-dir", str(short_dir)) as d:
        socket_path = Path(d.connection["socket_path"])
        assert socket_path.name == f"kc-{d.process.pid}.sock"
        private = socket_path.parent
        assert private.parent == short_dir
        assert private.name.startswith(f"kc-{d.process.pid}-")
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert await d.wait() == 0
    assert not private.exists()


async def test_a_squatted_socket_name_cannot_block_the_channels(
    tmp_path: Path, short_dir: Path
) -> None:
    """Another user could create our socket's name first in a shared directory such as /tmp;
    our sockets live in a fresh directory of our own instead."""
    short_dir.chmod(0o1777)  # as /tmp is
    async with (
        daemon(tmp_path, "--transport", "socket", "--socket-dir", str(short_dir)) as d,
        d.client() as client,
    ):
        squatted = short_dir / f"kc-{d.process.pid}-python-1.sock"
        squatted.write_text("not a socket")
        await client.create_session(**new_session_body("python-1"))
        response = await client.http.get("/sessions/python-1/channels")
        assert response.status_code == 200, response.text
        channel_path = Path(response.json())
        assert channel_path.is_socket()
        assert channel_path.parent.parent == short_dir
        assert channel_path.parent == Path(d.connection["socket_path"]).parent
        assert stat.S_IMODE(channel_path.parent.stat().st_mode) == 0o700
        assert channel_path.parent.stat().st_uid == os.getuid()
    assert await d.wait() == 0
    assert not channel_path.parent.exists()
    assert squatted.read_text() == "not a socket"


async def test_the_token_is_never_logged_and_the_log_is_private(tmp_path: Path) -> None:
    """At debug, with the token on every request (and a wrong one on some), the log file holds
    no token, and only its owner can read it, even when it existed before."""
    token = "secret-token-4f1a9c0d7e"
    token_file = tmp_path / "token"
    token_file.write_text(token)
    log_file = tmp_path / "kallichore.log"
    log_file.write_text("an old log\n")
    log_file.chmod(0o644)
    stdout = tmp_path / "stdout"
    with stdout.open("wb") as output:
        process = await trio.lowlevel.open_process(
            daemon_command(
                "--transport", "tcp", "--token", str(token_file),
                "--log-level", "debug", "--log-file", str(log_file),
            ),
            stdout=output,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        with trio.fail_after(TIMEOUT):
            while "Listening at " not in stdout.read_text():
                assert process.returncode is None, stdout.read_text()
                await trio.sleep(0.05)
        address = stdout.read_text().split("Listening at ")[1].split()[0]
        async with (
            KallichoreClient(f"http://{address}", token=token, timeout=TIMEOUT) as client,
            KallichoreClient(f"http://{address}", token=token[::-1], timeout=TIMEOUT) as wrong,
        ):
            await started_session(client, "python-1")
            async with client.channels("python-1") as channels:
                result = await channels.execute("print('logged?')")
            assert stream_text(result.frames) == "logged?\n"
            with pytest.raises(ApiError):
                await wrong.kill("python-1")
            with pytest.raises(ApiError):
                async with wrong.channels("python-1"):
                    pass
            await client.get_session("python-1")
            await client.http.post("/server_configuration", json={"resource_sample_interval_ms": 0})
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(TIMEOUT):
            assert await process.wait() == 0
    log = log_file.read_text()
    assert "kallichore exited" in log
    assert token not in log
    assert token[::-1] not in log
    assert "an old log" not in log
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


async def test_token_file_is_read_deleted_and_used(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("test_auth_token_12345\n")
    async with daemon(tmp_path, "--transport", "tcp", "--token", str(token_file)) as d:
        assert d.connection["bearer_token"] == "test_auth_token_12345"
        assert not token_file.exists()
        async with d.client() as client, d.client(token=None) as anonymous:
            assert (await anonymous.status())["sessions"] == 0
            with pytest.raises(ApiError) as refused:
                await anonymous.create_session(**new_session_body("x"))
            assert refused.value.status == 401
            assert await client.create_session(**new_session_body("x")) == "x"


async def test_generated_token(tmp_path: Path) -> None:
    async with daemon(tmp_path, "--transport", "tcp") as d:
        token = d.connection["bearer_token"]
        assert isinstance(token, str)
        assert len(token) == 16


async def test_three_daemons_get_three_ports(tmp_path: Path) -> None:
    async with (
        daemon(tmp_path, "--transport", "tcp", "--token", "none") as a,
        daemon(tmp_path, "--transport", "tcp", "--token", "none") as b,
        daemon(tmp_path, "--transport", "tcp", "--token", "none") as c,
    ):
        ports = {a.connection["port"], b.connection["port"], c.connection["port"]}
    assert len(ports) == 3


@pytest.mark.parametrize(
    "args",
    [
        ["--transport", "invalid-transport"],
        ["--transport", "named-pipe"],
        ["--transport", "socket", "--port", "8080"],
        ["--port", "8080"],  # with a connection file the default transport is socket
        ["--transport", "tcp", "--unix-socket", "/tmp/x.sock"],
        ["--transport", "tcp", "--port", "70000"],
        ["--transport", "tcp", "--token", "/no/such/token/file"],
        ["--transport", "tcp", "--idle-shutdown-hours", "-1"],
        ["--transport", "tcp", "--session-buffer-mb", "0"],
        ["--transport", "tcp", "--session-buffer-mb", "9" * 400],
        ["--transport", "tcp", "--kernel-transport", "udp"],
        ["--transport", "tcp", "--root-dir", "/no/such/directory"],
        ["--transport", "socket", "--unix-socket", "/tmp/" + "x" * 120 + ".sock"],
    ],
)
def test_invalid_flags_exit_nonzero_and_write_nothing(tmp_path: Path, args: list[str]) -> None:
    connection_file = tmp_path / "connection.json"
    result = subprocess.run(
        daemon_command("--connection-file", str(connection_file), *args),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode != 0
    assert "Error:" in result.stderr or "error:" in result.stderr
    assert not connection_file.exists()


def test_an_overlong_token_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("x" * 65)
    result = subprocess.run(
        daemon_command("--transport", "tcp", "--token", str(token_file)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 1
    assert "longer than 64" in result.stderr


async def test_handshake_socket(tmp_path: Path, short_dir: Path) -> None:
    path = short_dir / "handshake.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(str(path))
    listener.listen(1)
    log = tmp_path / "daemon.log"
    with log.open("wb") as output:
        process = await trio.lowlevel.open_process(
            daemon_command("--handshake-socket", str(path), "--token", "none"),
            stdout=output,
            stderr=output,
        )
    try:
        with trio.fail_after(TIMEOUT):
            conn, _ = await listener.accept()
            data = b""
            while chunk := await conn.recv(65536):
                data += chunk
            conn.close()
        document = json.loads(data)
        assert document["transport"] == "socket"
        assert document["server_pid"] == process.pid
        async with KallichoreClient(socket_path=document["socket_path"]) as client:
            status = await client.status()
        assert status["server_id"] == document["server_id"]
    finally:
        listener.close()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(TIMEOUT):
            assert await process.wait() == 0


# -- sessions over the Unix socket ------------------------------------------------------------


async def test_a_full_session_over_the_unix_socket(tmp_path: Path, short_dir: Path) -> None:
    async with (
        daemon(tmp_path, "--transport", "socket", "--socket-dir", str(short_dir)) as d,
        d.client() as client,
    ):
        await started_session(client, "python-1")
        response = await client.http.get("/sessions/python-1/channels")
        assert response.status_code == 200
        channel_path = response.json()
        assert isinstance(channel_path, str)
        assert Path(channel_path).is_socket()
        stream = await trio.open_unix_socket(channel_path)
        async with open_channels(stream, "localhost", "/api/channels/python-1") as channels:
            msg_id = await channels.send(execute_request("print('over a unix socket')"))
            frames = await until(channels, lambda f: is_idle(f, msg_id))
            assert stream_text(frames) == "over a unix socket\n"
            session = await client.get_session("python-1")
            assert session["connected"] is True
            assert session["socket_path"] == channel_path
        await client.kill("python-1")
        assert not Path(channel_path).exists()


async def test_raw_http_session_over_the_socket(tmp_path: Path, short_dir: Path) -> None:
    async with daemon(tmp_path, "--transport", "socket", "--socket-dir", str(short_dir)) as d:
        body = json.dumps(new_session_body("python-raw", working_directory="/tmp")).encode()
        request = (
            b"PUT /sessions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + d.token.encode() + b"\r\n"  # type: ignore[union-attr]
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        response = await raw_request(Path(d.connection["socket_path"]), request)
        assert response.startswith(b"HTTP/1.1 200")
        assert b'"session_id": "python-raw"' in response or b'"session_id":"python-raw"' in response


# -- idle shutdown ----------------------------------------------------------------------------


async def test_idle_shutdown_when_nothing_happens(tmp_path: Path) -> None:
    async with daemon(tmp_path, "--transport", "tcp", "--idle-shutdown-seconds", "1") as d:
        assert await d.wait() == 0


async def test_idle_shutdown_waits_for_a_busy_session(tmp_path: Path) -> None:
    done = tmp_path / "done"
    async with (
        daemon(tmp_path, "--transport", "tcp", "--idle-shutdown-seconds", "1") as d,
        d.client() as client,
    ):
        await started_session(client, "python-1")
        # Busy until we say so: past several idle periods, the daemon is still up.
        await send_code(
            client,
            "python-1",
            f"import os, time\nwhile not os.path.exists({str(done)!r}): time.sleep(0.05)",
        )
        await trio.sleep(3)
        assert d.process.returncode is None
        pid = (await client.get_session("python-1"))["process_id"]
        done.touch()
        assert await d.wait() == 0
    assert not psutil.pid_exists(pid)


async def test_idle_shutdown_waits_for_a_starting_session(tmp_path: Path) -> None:
    go_on = tmp_path / "go-on"
    # A kernel that takes several idle periods to start: it waits for us before it runs.
    slow_start = (
        "import os, runpy, sys, time\n"
        f"while not os.path.exists({str(go_on)!r}): time.sleep(0.05)\n"
        "runpy.run_module('ipykernel_launcher', run_name='__main__')"
    )
    argv = [sys.executable, "-c", slow_start, "-f", "{connection_file}"]
    async with (
        daemon(tmp_path, "--transport", "tcp", "--idle-shutdown-seconds", "1") as d,
        d.client() as client,
    ):
        await client.create_session(**new_session_body("python-1", argv=argv))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.start, "python-1")
            await trio.sleep(3)
            assert d.process.returncode is None
            go_on.touch()
        assert (await client.get_session("python-1"))["status"] == "idle"
        assert await d.wait() == 0


async def test_idle_shutdown_waits_for_a_connected_client(tmp_path: Path) -> None:
    async with (
        daemon(tmp_path, "--transport", "tcp", "--idle-shutdown-seconds", "1") as d,
        d.client() as client,
    ):
        await started_session(client, "python-1")
        async with client.channels("python-1"):
            await trio.sleep(3)
            assert d.process.returncode is None
        assert await d.wait() == 0


async def test_idle_shutdown_waits_while_the_heartbeat_client_lives(tmp_path: Path) -> None:
    client_process = await trio.lowlevel.open_process(["sleep", "600"])
    try:
        async with (
            daemon(tmp_path, "--transport", "tcp", "--idle-shutdown-seconds", "1") as d,
            d.client() as client,
        ):
            await client.client_heartbeat(client_process.pid)
            await trio.sleep(3)
            assert d.process.returncode is None
            client_process.kill()
            await client_process.wait()
            assert await d.wait() == 0
    finally:
        if client_process.returncode is None:
            client_process.kill()
            await client_process.wait()


async def test_idle_period_can_be_changed_live(tmp_path: Path) -> None:
    async with daemon(tmp_path, "--transport", "tcp") as d, d.client() as client:
        await client.set_server_configuration(idle_shutdown_hours=0)
        config = await client.server_configuration()
        assert config["idle_shutdown_hours"] == 0


# -- clean exits ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "/shutdown"])
async def test_exit_leaves_no_kernel_behind(tmp_path: Path, how: str) -> None:
    async with (
        daemon(tmp_path, "--transport", "tcp", "--shutdown-grace", "1") as d,
        d.client() as client,
    ):
        await started_session(client, "python-1")
        await started_session(client, "python-busy")
        await client.create_session(**new_session_body("never-started"))
        # A busy ipykernel does not act on shutdown_request: the grace period decides.
        await send_code(client, "python-busy", "import time; time.sleep(600)")
        pids = kernel_pids(await client.list_sessions())
        assert len(pids) == 2
        if how == "/shutdown":
            await client.shutdown()
        else:
            d.process.send_signal(getattr(signal, how))
        assert await d.wait() == 0
    assert not any(psutil.pid_exists(pid) for pid in pids)


async def test_shutdown_answers_before_the_daemon_exits(tmp_path: Path) -> None:
    """With no kernel to stop, the daemon used to hang up before `POST /shutdown`'s answer."""
    async with daemon(tmp_path, "--transport", "tcp") as d, d.client() as client:
        response = await client.http.post("/shutdown")
        assert response.status_code == 200
        assert response.json() is None
        assert await d.wait() == 0


async def test_a_second_sigint_kills_at_once(tmp_path: Path) -> None:
    async with (
        daemon(tmp_path, "--transport", "tcp", "--shutdown-grace", "600") as d,
        d.client() as client,
    ):
        await started_session(client, "python-busy")
        await send_code(client, "python-busy", "import time; time.sleep(600)")
        pid = (await client.get_session("python-busy"))["process_id"]
        d.process.send_signal(signal.SIGINT)
        # A signal that arrives before the daemon has read the first would be the same one.
        with trio.fail_after(TIMEOUT):
            while "SIGINT: shutting down" not in d.log.read_text():
                await trio.sleep(0.05)
        assert d.process.returncode is None  # waiting out the 600 s grace period
        d.process.send_signal(signal.SIGINT)
        assert await d.wait() == 0
    assert not psutil.pid_exists(pid)


def test_python_dash_m_and_the_console_script_are_the_same_program() -> None:
    script = Path(sys.executable).parent / "kallichore"
    by_script = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, check=True
    )
    by_module = subprocess.run(
        daemon_command("--version"), capture_output=True, text=True, check=True
    )
    assert by_script.stdout == by_module.stdout


def test_the_daemon_raises_its_soft_limit_of_open_files() -> None:
    """A soft limit of 1,024 would stop the daemon at about 75 kernels (13 descriptors each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        raise_open_files_limit()
        raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raised == (OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
