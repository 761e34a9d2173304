"""Shared fixtures: an isolated home for kernels, a supervisor, an ipykernel session spec, a
running server with a client of it, and the daemon as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from kallichore.api.app import ServerState
from kallichore.client import Channels, KallichoreClient
from kallichore.server.http import RunningServer, serve_api
from kallichore.session.model import InterruptMode, SessionConfig, SessionSpec
from kallichore.supervisor import Supervisor, SupervisorConfig, open_supervisor

# The Slurm cluster and the sshd of the remote launchers' tests (`slurm_cluster`, `ssh_host`).
pytest_plugins = ("tests.remote_hosts",)

IPYKERNEL_ARGV = (sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}")
TOKEN = "test-token-0123456789"
# A guard against hangs, not a measure of speed.
TIMEOUT = 60


@pytest.fixture(autouse=True, scope="session")
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Kernels and Jupyter write history and runtime files under HOME: keep them in a temp dir."""
    home = tmp_path_factory.mktemp("home")
    saved = {
        k: os.environ.get(k)
        for k in ("HOME", "IPYTHONDIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "MPLBACKEND")
    }
    os.environ.update(
        HOME=str(home),
        IPYTHONDIR=str(home / ".ipython"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTER_DATA_DIR=str(home / "data"),
        MPLBACKEND="agg",
    )
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def ipykernel_spec(session_id: str = "python-test", **changes: object) -> SessionSpec:
    fields: dict[str, object] = {
        "session_id": session_id,
        "argv": IPYKERNEL_ARGV,
        "display_name": "Python (test)",
        "language": "python",
        "username": "tester",
        "connection_timeout": 60.0,
        "interrupt_mode": InterruptMode.SIGNAL,
    }
    fields.update(changes)
    return SessionSpec(**fields)  # type: ignore[arg-type]


def supervisor_config(runtime_dir: Path, heartbeat_timeout: float = 30.0) -> SupervisorConfig:
    """The tests' supervisor: fast heartbeats, short grace."""
    return SupervisorConfig(
        runtime_dir=runtime_dir,
        session=SessionConfig(
            heartbeat_interval=0.2,
            unattended_heartbeat_interval=0.2,
            # A hang guard: a loaded machine must not make a kernel look offline. The tests of
            # heartbeat loss stop the kernel and use a short timeout of their own.
            heartbeat_timeout=heartbeat_timeout,
            shutdown_grace=5.0,
        ),
    )


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[Supervisor]:
    async with open_supervisor(supervisor_config(tmp_path / "runtime")) as sup:
        yield sup


def new_session_body(session_id: str, **fields: Any) -> dict[str, Any]:
    """A NewSession as Positron sends it (the newer shape)."""
    body: dict[str, Any] = {
        "session_id": session_id,
        "display_name": "Python (test)",
        "language": "python",
        "username": "tester",
        "input_prompt": "",
        "continuation_prompt": "",
        "argv": list(IPYKERNEL_ARGV),
        "session_mode": "console",
        "working_directory": "",
        "env": [{"action": "replace", "name": "TEST_VAR", "value": "test_value"}],
        "connection_timeout": 60,
        "interrupt_mode": "message",
        "protocol_version": "5.3",
        "startup_environment": "none",
    }
    body.update(fields)
    return body


async def started_session(
    client: KallichoreClient, session_id: str = "python-1", **fields: Any
) -> None:
    """Create a session as Positron does (`fields` changed) and start its kernel."""
    await client.create_session(**new_session_body(session_id, **fields))
    await client.start(session_id)


# -- channel frames as the server sent them (decoded JSON), for tests of the wire itself ----


async def until(
    channels: Channels, done: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
) -> list[dict[str, Any]]:
    """Frames up to and including the first one for which `done` is true."""
    seen = []
    with trio.fail_after(timeout):
        while True:
            frame = await channels.receive_frame()
            seen.append(frame)
            if done(frame):
                return seen


def is_reply(frame: dict[str, Any], msg_id: str, msg_type: str) -> bool:
    return (
        frame.get("kind") == "jupyter"
        and frame["header"]["msg_type"] == msg_type
        and (frame["parent_header"] or {}).get("msg_id") == msg_id
    )


def is_idle(frame: dict[str, Any], msg_id: str) -> bool:
    return is_reply(frame, msg_id, "status") and frame["content"]["execution_state"] == "idle"


def kernel_events(frames: Iterable[dict[str, Any]], key: str) -> list[Any]:
    return [f[key] for f in frames if f.get("kind") == "kernel" and key in f]


def stream_text(frames: Iterable[dict[str, Any]], name: str = "stdout") -> str:
    """The text of the `name` stream messages among `frames` (a hostile kernel's `stream`
    without a name or text is none of them)."""
    return "".join(
        str(f["content"].get("text", ""))
        for f in frames
        if f.get("kind") == "jupyter"
        and f["header"]["msg_type"] == "stream"
        and isinstance(f["content"], dict)
        and f["content"].get("name") == name
    )


# -- servers ---------------------------------------------------------------------------------


async def serve(supervisor: Supervisor, nursery: trio.Nursery, **where: Any) -> RunningServer:
    """The API of `supervisor` with `TOKEN`, on a free loopback port (or `unix_socket=...`)."""
    running: RunningServer = await nursery.start(
        partial(serve_api, supervisor, ServerState(token=TOKEN), **where)
    )
    return running


@pytest.fixture
async def server(supervisor: Supervisor, nursery: trio.Nursery) -> RunningServer:
    """The API served on a free loopback port by the `supervisor` fixture, with `TOKEN`."""
    return await serve(supervisor, nursery)


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[KallichoreClient]:
    """A client of `server`, with the token."""
    async with KallichoreClient(server.url, token=TOKEN, timeout=TIMEOUT) as kallichore:
        yield kallichore


@pytest.fixture
async def anonymous(server: RunningServer) -> AsyncIterator[KallichoreClient]:
    """A client of `server` without the token."""
    async with KallichoreClient(server.url, timeout=TIMEOUT) as kallichore:
        yield kallichore


@asynccontextmanager
async def served_client(
    runtime_dir: Path, heartbeat_timeout: float = 30.0
) -> AsyncIterator[tuple[KallichoreClient, RunningServer]]:
    """A supervisor served on loopback and a client of it, for a test that needs one of its
    own (a hypothesis example: pytest-trio keeps fixtures across a test's examples)."""
    async with (
        open_supervisor(supervisor_config(runtime_dir, heartbeat_timeout)) as sup,
        trio.open_nursery() as nursery,
    ):
        running = await serve(sup, nursery)
        async with KallichoreClient(running.url, token=TOKEN, timeout=TIMEOUT) as kallichore:
            yield kallichore, running
        nursery.cancel_scope.cancel()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths are limited to 104 bytes: pytest's tmp_path can be too long."""
    path = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """`python -m kallichore` running as a subprocess, and what its connection file says."""

    def __init__(self, process: trio.Process, connection: dict[str, Any], log: Path) -> None:
        self.process = process
        self.connection = connection
        self.log = log

    @property
    def token(self) -> str | None:
        token: str | None = self.connection["bearer_token"]
        return token

    def client(self, token: str | None = "default") -> KallichoreClient:
        """A client on the daemon's transport (with its token unless told otherwise)."""
        token = self.token if token == "default" else token
        if self.connection["transport"] == "socket":
            return KallichoreClient(
                token=token, socket_path=self.connection["socket_path"], timeout=TIMEOUT
            )
        return KallichoreClient(self.connection["base_path"], token=token, timeout=TIMEOUT)

    async def wait(self, timeout: float = TIMEOUT) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


def daemon_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kallichore", *args]


async def wait_for_file(path: Path, process: trio.Process, log: Path) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        while not path.exists():
            if process.returncode is not None:
                raise AssertionError(f"daemon exited {process.returncode}: {log.read_text()}")
            await trio.sleep(0.05)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


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
