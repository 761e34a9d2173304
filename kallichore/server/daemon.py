"""The standalone daemon: bind, announce where, serve, and exit cleanly on every path.

SIGINT, SIGTERM, `POST /shutdown` and idle shutdown all end the same way: every kernel gets a
`shutdown_request` and a grace period, then its process group is killed; the sockets and files
the daemon created are removed; the exit status is 0. A second SIGINT (or SIGTERM) during that
kills the kernels at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from kallichore import __version__
from kallichore.api.app import ServerState
from kallichore.api.jupyter import JupyterSettings
from kallichore.api.single_kernel import start_default_kernel
from kallichore.channels.broker import ChannelBroker
from kallichore.errors import StartupError
from kallichore.footprint import Footprint
from kallichore.jupyter.connection import write_json_file
from kallichore.jupyter.kernelspec import KernelSpec
from kallichore.server.http import LOOPBACK, RunningServer, serve_api
from kallichore.server.idle_shutdown import IdleShutdown
from kallichore.server.lifetime import ServerLifetime
from kallichore.server.private_dir import private_socket_dir, socket_base
from kallichore.server.session_sockets import MAX_SOCKET_PATH_BYTES, SessionSockets
from kallichore.session.model import KernelTransport, SessionConfig
from kallichore.supervisor import Supervisor, SupervisorConfig, open_supervisor

logger = logging.getLogger(__name__)


class Transport(StrEnum):
    TCP = "tcp"
    SOCKET = "socket"
    NAMED_PIPE = "named-pipe"


@attrs.frozen
class DaemonOptions:
    transport: Transport
    host: str = LOOPBACK
    port: int = 0
    unix_socket: Path | None = None
    socket_dir: Path | None = None
    connection_file: Path | None = None
    handshake_socket: Path | None = None
    token: str | None = None
    idle_shutdown_hours: int | None = None
    idle_shutdown_seconds: float | None = None
    resource_sample_interval_ms: int = 1000
    shutdown_grace: float = 10.0
    session_buffer_bytes: int = SessionConfig().event_buffer_bytes
    kernel_transport: KernelTransport = SessionConfig().kernel_transport
    log_level: str = "info"
    log_file: Path | None = None
    state_dir: Path | None = None
    jupyter: JupyterSettings = attrs.Factory(JupyterSettings)
    # Single-kernel mode: the kernelspec the session `default` runs.
    default_kernel: KernelSpec | None = None


class DaemonError(Exception):
    """A fatal problem before serving (a bad socket path, an unwritable connection file)."""


def main_socket_path(options: DaemonOptions, sockets_dir: Path) -> Path:
    """The API's socket path: --unix-socket, else one in our private `sockets_dir`."""
    if options.unix_socket is None:
        return sockets_dir / f"kc-{os.getpid()}.sock"
    path = options.unix_socket
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise DaemonError(
            f"socket path {path} is {len(os.fsencode(path))} bytes long; "
            f"the limit is {MAX_SOCKET_PATH_BYTES}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return path


@contextmanager
def private_files() -> Iterator[None]:
    """Create files (the API socket) private to the owner, with no window in between."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def connection_document(
    options: DaemonOptions, server: RunningServer, socket_path: Path | None
) -> dict[str, Any]:
    """Kallichore's connection file: keys in its order, address keys for this transport only."""
    document: dict[str, Any] = {}
    if socket_path is None:
        document["port"] = server.port
        document["base_path"] = server.url
    else:
        document["socket_path"] = str(socket_path)
    document["transport"] = options.transport.value
    document["server_path"] = server_executable()
    document["server_pid"] = os.getpid()
    document["bearer_token"] = options.token
    document["log_path"] = str(options.log_file) if options.log_file else None
    return document


def server_executable() -> str:
    program = sys.argv[0]
    if os.path.isabs(program):
        return program
    return os.path.abspath(program) if os.path.exists(program) else sys.executable


async def send_handshake(path: Path, document: dict[str, Any]) -> None:
    """Newer Positron: connect to the client's socket, write the document, close."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(json.dumps(document).encode())


async def run_daemon(options: DaemonOptions) -> int:
    """Serve until shut down; returns the exit status."""
    grace = options.shutdown_grace
    footprint = Footprint.open()
    config = SupervisorConfig(
        session=SessionConfig(
            shutdown_grace=grace,
            event_buffer_bytes=options.session_buffer_bytes,
            kernel_transport=options.kernel_transport,
        ),
        resource_sample_interval_ms=options.resource_sample_interval_ms,
        footprint=footprint,
        state_dir=options.state_dir,
    )
    state = ServerState(token=options.token, log_level=options.log_level, jupyter=options.jupyter)
    lifetime = ServerLifetime(
        IdleShutdown(hours=options.idle_shutdown_hours, seconds=options.idle_shutdown_seconds)
    )
    created: list[Path] = []
    # Our socket directory goes last, after every socket in it is closed.
    cleanup = ExitStack()
    try:
        async with open_supervisor(config) as supervisor, trio.open_nursery() as nursery:
            if supervisor.state_dir is not None:
                supervisor.state_dir.save_token(options.token)
            if options.default_kernel is not None:
                await start_default(supervisor, options)
            if options.host != LOOPBACK:
                logger.warning(
                    "listening on %s: other machines may connect (with the token)", options.host
                )
            broker = ChannelBroker()
            sockets = None
            socket_path = None
            if options.transport is Transport.SOCKET:
                sockets_dir = cleanup.enter_context(
                    private_socket_dir(socket_base(options.socket_dir, MAX_SOCKET_PATH_BYTES))
                )
                # Every socket of ours is in it: the directory is what the sweep removes.
                footprint.add_path(sockets_dir)
                socket_path = main_socket_path(options, sockets_dir)
                sockets = SessionSockets(broker, sockets_dir, os.getpid())
                await nursery.start(sockets.run)
            with private_files():
                server: RunningServer = await nursery.start(
                    partial(
                        serve_api,
                        supervisor,
                        state,
                        host=options.host,
                        port=options.port,
                        unix_socket=socket_path,
                        broker=broker,
                        sockets=sockets,
                        lifetime=lifetime,
                        shutdown_grace=grace,
                    )
                )
            if socket_path is not None:
                socket_path.chmod(0o600)
            document = connection_document(options, server, socket_path)
            if options.connection_file is not None:
                footprint.add_path(options.connection_file)
                write_json_file(options.connection_file, document)
                created.append(options.connection_file)
            if options.handshake_socket is not None:
                await send_handshake(
                    options.handshake_socket, {**document, "server_id": state.server_id}
                )
            announce(options, server, socket_path)
            nursery.start_soon(shut_down_on_signals, server, supervisor)
            nursery.start_soon(lifetime.shut_down_when_idle, supervisor)
            await server.finished.wait()
            nursery.cancel_scope.cancel()
    finally:
        for path in created:
            with suppress(OSError):
                path.unlink()
        cleanup.close()
        footprint.close()
    logger.info("kallichore exited")
    return 0


async def start_default(supervisor: Supervisor, options: DaemonOptions) -> None:
    """Single-kernel mode: the session `default` is ready before anybody can ask for it."""
    assert options.default_kernel is not None
    try:
        await start_default_kernel(supervisor, options.default_kernel, options.jupyter.root_dir)
    except StartupError as error:
        raise DaemonError(
            f"the default kernel ({options.default_kernel.name}) failed to start: {error}"
        ) from None


def announce(options: DaemonOptions, server: RunningServer, socket_path: Path | None) -> None:
    """Where we listen, on stdout (clients read the connection file, people read this)."""
    if socket_path is not None:
        print(f"Listening on Unix socket: {socket_path}", flush=True)
    else:
        host = f"[{options.host}]" if ":" in options.host else options.host
        print(f"Listening at {host}:{server.port}", flush=True)
    print(f"kallichore {__version__} (kcserver-compatible)", flush=True)
    if options.token and options.connection_file is None and options.handshake_socket is None:
        # The only way to learn a generated token here; never in the log, which may be shared.
        print(f"Bearer token: {options.token}", flush=True)


async def shut_down_on_signals(server: RunningServer, supervisor: Supervisor) -> None:
    """The first SIGINT/SIGTERM shuts down gracefully; another one kills the kernels now."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not server.shutdown_requested.is_set():
                logger.info("%s: shutting down", name)
                server.lifetime.request_shutdown()
            else:
                logger.info("%s again: killing every kernel now", name)
                supervisor.kill_all()
