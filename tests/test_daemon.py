"""The daemon as a subprocess: flags, connection files, transports, idle shutdown, clean exits."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
import trio_websocket

from tests.api_client import execute_request, is_idle, new_session_body, stream_text

TIMEOUT = 60
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


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths are limited to 104 bytes: pytest's tmp_path can be too long."""
    path = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


class Daemon:
    def __init__(self, process: trio.Process, connection: dict[str, Any], log: Path) -> None:
        self.process = process
        self.connection = connection
        self.log = log

    @property
    def token(self) -> str | None:
        token: str | None = self.connection["bearer_token"]
        return token

    def http(self, token: str | None = "default") -> httpx.AsyncClient:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self.connection["transport"] == "socket":
            transport = httpx.AsyncHTTPTransport(uds=self.connection["socket_path"])
            return httpx.AsyncClient(
                transport=transport, base_url="http://kallichore", headers=headers, timeout=TIMEOUT
            )
        return httpx.AsyncClient(
            base_url=self.connection["base_path"], headers=headers, timeout=TIMEOUT
        )

    async def send_code(self, session_id: str, code: str) -> None:
        """Send an execute_request over a channels WebSocket (TCP) and leave it running."""
        url = (
            self.connection["base_path"].replace("http", "ws") + f"/sessions/{session_id}/channels"
        )
        headers = [(b"Authorization", f"Bearer {self.token}".encode())] if self.token else []
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            await ws.send_message(json.dumps(execute_request(code)))
            # Wait until the kernel has it: its busy status comes back.
            with trio.fail_after(TIMEOUT):
                while '"busy"' not in str(await ws.get_message()):
                    pass

    async def wait(self, timeout: float = TIMEOUT) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


async def wait_for_file(path: Path, process: trio.Process, log: Path) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        while not path.exists():
            if process.returncode is not None:
                raise AssertionError(f"daemon exited {process.returncode}: {log.read_text()}")
            await trio.sleep(0.05)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def daemon_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kallichore", *args]


@asynccontextmanager
async def daemon(
    tmp_path: Path, *args: str, connection_file: Path | None = None
) -> AsyncIterator[Daemon]:
    """Run the daemon with `args` plus a connection file; stop it (and check it stopped)."""
    connection_file = (
        connection_file or tmp_path / f"connection-{len(list(tmp_path.iterdir()))}.json"
    )
    log = tmp_path / f"{connection_file.stem}.log"
    with log.open("wb") as output:
        process = await trio.lowlevel.open_process(
            daemon_command("--connection-file", str(connection_file), *args),
            stdout=output,
            stderr=output,
        )
    try:
        yield Daemon(process, await wait_for_file(connection_file, process, log), log)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(TIMEOUT):
                await process.wait()


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


async def start_session(client: httpx.AsyncClient, session_id: str, **fields: Any) -> None:
    response = await client.put("/sessions", json=new_session_body(session_id, **fields))
    assert response.status_code == 200, response.text
    response = await client.post(f"/sessions/{session_id}/start")
    assert response.status_code == 200, response.text


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
        "--version",
    ):
        assert flag in help_text.stdout
    version = subprocess.run(
        daemon_command("--version"), capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("kcserver ")
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
        async with d.http() as client:
            status = (await client.get("/status")).json()
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
        async with d.http() as client:
            assert (await client.get("/status")).status_code == 200
    assert await d.wait() == 0
    async with daemon(tmp_path, "--transport", "socket", "--socket-dir", str(short_dir)) as d:
        assert d.connection["socket_path"] == str(short_dir / f"kc-{d.process.pid}.sock")


async def test_token_file_is_read_deleted_and_used(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("test_auth_token_12345\n")
    async with daemon(tmp_path, "--transport", "tcp", "--token", str(token_file)) as d:
        assert d.connection["bearer_token"] == "test_auth_token_12345"
        assert not token_file.exists()
        async with d.http() as client, d.http(token=None) as anonymous:
            assert (await anonymous.get("/status")).status_code == 200
            assert (await anonymous.put("/sessions", json=new_session_body("x"))).status_code == 401
            assert (await client.put("/sessions", json=new_session_body("x"))).status_code == 200


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
        transport = httpx.AsyncHTTPTransport(uds=document["socket_path"])
        async with httpx.AsyncClient(transport=transport, base_url="http://kallichore") as client:
            status = (await client.get("/status")).json()
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
        d.http() as client,
    ):
        await start_session(client, "python-1")
        response = await client.get("/sessions/python-1/channels")
        assert response.status_code == 200
        channel_path = response.json()
        assert isinstance(channel_path, str)
        assert Path(channel_path).is_socket()
        async with trio.open_nursery() as nursery:
            stream = await trio.open_unix_socket(channel_path)
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, "localhost", "/api/channels/python-1"
            )
            request = execute_request("print('over a unix socket')")
            await ws.send_message(json.dumps(request))
            frames: list[dict[str, Any]] = []
            with trio.fail_after(TIMEOUT):
                while not frames or not is_idle(frames[-1], request["header"]["msg_id"]):
                    frames.append(json.loads(await ws.get_message()))
            assert stream_text(frames) == "over a unix socket\n"
            session = (await client.get("/sessions/python-1")).json()
            assert session["connected"] is True
            assert session["socket_path"] == channel_path
            await ws.aclose()
        assert (await client.post("/sessions/python-1/kill")).status_code == 200
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
        d.http() as client,
    ):
        await start_session(client, "python-1")
        # Busy until we say so: past several idle periods, the daemon is still up.
        await d.send_code(
            "python-1",
            f"import os, time\nwhile not os.path.exists({str(done)!r}): time.sleep(0.05)",
        )
        await trio.sleep(3)
        assert d.process.returncode is None
        pid = (await client.get("/sessions/python-1")).json()["process_id"]
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
        d.http() as client,
    ):
        response = await client.put("/sessions", json=new_session_body("python-1", argv=argv))
        assert response.status_code == 200, response.text
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.post, "/sessions/python-1/start")
            await trio.sleep(3)
            assert d.process.returncode is None
            go_on.touch()
        assert (await client.get("/sessions/python-1")).json()["status"] == "idle"
        assert await d.wait() == 0


async def test_idle_shutdown_waits_for_a_connected_client(tmp_path: Path) -> None:
    async with (
        daemon(tmp_path, "--transport", "tcp", "--idle-shutdown-seconds", "1") as d,
        d.http() as client,
    ):
        await start_session(client, "python-1")
        url = d.connection["base_path"].replace("http", "ws") + "/sessions/python-1/channels"
        headers = [(b"Authorization", f"Bearer {d.token}".encode())]
        async with trio_websocket.open_websocket_url(url, extra_headers=headers):
            await trio.sleep(3)
            assert d.process.returncode is None
        assert await d.wait() == 0


async def test_idle_shutdown_waits_while_the_heartbeat_client_lives(tmp_path: Path) -> None:
    client_process = await trio.lowlevel.open_process(["sleep", "600"])
    try:
        async with (
            daemon(tmp_path, "--transport", "tcp", "--idle-shutdown-seconds", "1") as d,
            d.http() as client,
        ):
            response = await client.post(
                "/client_heartbeat", json={"process_id": client_process.pid}
            )
            assert response.status_code == 200
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
    async with daemon(tmp_path, "--transport", "tcp") as d, d.http() as client:
        response = await client.post("/server_configuration", json={"idle_shutdown_hours": 0})
        assert response.status_code == 200
        config = (await client.get("/server_configuration")).json()
        assert config["idle_shutdown_hours"] == 0


# -- clean exits ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "/shutdown"])
async def test_exit_leaves_no_kernel_behind(tmp_path: Path, how: str) -> None:
    async with (
        daemon(tmp_path, "--transport", "tcp", "--shutdown-grace", "1") as d,
        d.http() as client,
    ):
        await start_session(client, "python-1")
        await start_session(client, "python-busy")
        response = await client.put("/sessions", json=new_session_body("never-started"))
        assert response.status_code == 200
        # A busy ipykernel does not act on shutdown_request: the grace period decides.
        await d.send_code("python-busy", "import time; time.sleep(600)")
        pids = kernel_pids((await client.get("/sessions")).json()["sessions"])
        assert len(pids) == 2
        if how == "/shutdown":
            assert (await client.post("/shutdown")).status_code == 200
        else:
            d.process.send_signal(getattr(signal, how))
        assert await d.wait() == 0
    assert not any(psutil.pid_exists(pid) for pid in pids)


async def test_a_second_sigint_kills_at_once(tmp_path: Path) -> None:
    async with (
        daemon(tmp_path, "--transport", "tcp", "--shutdown-grace", "600") as d,
        d.http() as client,
    ):
        await start_session(client, "python-busy")
        await d.send_code("python-busy", "import time; time.sleep(600)")
        pid = (await client.get("/sessions/python-busy")).json()["process_id"]
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
