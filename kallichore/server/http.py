"""Serve the Kallichore API: the HTTP routes (one dispatcher) and the channels.

On TCP, a `FrontDoor` owns the port: it reads every request itself and serves channel
WebSockets with our WebSocket shell and everything else with the dispatcher, in the same task.
On the Unix-socket transport, hypercorn and Quart serve the API socket with the same
dispatcher, and the channels have per-session sockets of their own.

Shutdown order matters: channel clients are told first (a 1001 close), then the requests being
answered finish, then the listener stops.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import hypercorn.logging
import hypercorn.trio
import trio
from hypercorn.config import Config

from kallichore.api.app import ChannelSockets, ServerState, create_api
from kallichore.channels.broker import ChannelBroker
from kallichore.channels.jupyter_hub import JupyterHubs
from kallichore.server.front import FrontDoor
from kallichore.server.lifetime import ServerLifetime
from kallichore.server.quart_shell import quart_app
from kallichore.supervisor import Supervisor

logger = logging.getLogger(__name__)

# Where the API listens unless told otherwise: this machine alone.
LOOPBACK = "127.0.0.1"
# How long channel clients get to receive their 1001 close when the server stops.
CLIENTS_CLOSE_SECONDS = 2.0


class HypercornLog(hypercorn.logging.Logger):
    """hypercorn's own news, demoted: its info lines are debug detail to our users.

    Its startup banner repeats the socket we announce ourselves. Its warnings and errors keep
    their level.
    """

    async def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        await self.debug(message, *args, **kwargs)


@attrs.define
class RunningServer:
    """A serving API: where it listens, its server-wide state, and what ends it."""

    url: str
    state: ServerState
    broker: ChannelBroker
    lifetime: ServerLifetime
    # The Jupyter channels' connections (the kernel model's `connections` counts them).
    hubs: JupyterHubs
    # Set once the kernels are down and the HTTP server has stopped.
    finished: trio.Event = attrs.Factory(trio.Event)

    @property
    def shutdown_requested(self) -> trio.Event:
        return self.lifetime.shutdown_requested

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


async def serve_api(
    supervisor: Supervisor,
    state: ServerState,
    *,
    host: str = LOOPBACK,
    port: int = 0,
    unix_socket: Path | None = None,
    broker: ChannelBroker | None = None,
    sockets: ChannelSockets | None = None,
    lifetime: ServerLifetime | None = None,
    shutdown_grace: float | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on `host`:`port` (0: any free port), or on `unix_socket`, until shut down.

    `POST /shutdown` requests the shutdown, and so may the caller with
    `lifetime.request_shutdown()`; every kernel is shut down before the server stops.
    """
    lifetime = lifetime or ServerLifetime()
    broker = broker or ChannelBroker()
    hubs = JupyterHubs()
    dispatcher = create_api(supervisor, state, lifetime, sockets, connections=hubs)
    stop_http = trio.Event()
    front_scope = trio.CancelScope()
    running: RunningServer | None = None
    front: FrontDoor | None = None
    try:
        async with trio.open_nursery() as nursery:
            if unix_socket is None:
                front = FrontDoor(supervisor, state, broker, dispatcher, hubs=hubs)
                bound: int = await nursery.start(_serve_front, front, host, port, front_scope)
                url = f"http://{reachable_host(host)}:{bound}"
            else:
                await nursery.start(
                    partial(
                        hypercorn.trio.serve,
                        quart_app(dispatcher),
                        hypercorn_config(unix_socket),
                        shutdown_trigger=stop_http.wait,
                    )
                )
                url = f"unix:{unix_socket}"
            running = RunningServer(url, state, broker, lifetime, hubs)
            task_status.started(running)
            try:
                await lifetime.shutdown_requested.wait()
                logger.info("shutting down: stopping every kernel")
                await supervisor.shutdown(shutdown_grace)
            finally:
                broker.stopping.set()
                hubs.stopping.set()
                with trio.move_on_after(CLIENTS_CLOSE_SECONDS):
                    await broker.wait_detached()
                    await hubs.wait_detached()
                    # Answers being made go out first: `POST /shutdown`'s own, when no kernel
                    # kept the shutdown busy long enough for it to leave by itself.
                    if front is not None:
                        await front.settled()
                stop_http.set()
                front_scope.cancel()
    finally:
        dispatcher.close()
        if running is not None:
            running.finished.set()


def hypercorn_config(unix_socket: Path) -> Config:
    """hypercorn serving the API on `unix_socket`, logging through our handlers."""
    config = Config()
    config.accesslog = None
    # Our handlers, not a second stderr handler of hypercorn's own.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.logger_class = HypercornLog
    config.graceful_timeout = 2.0
    config.bind = [f"unix:{unix_socket}"]
    return config


def reachable_host(host: str) -> str:
    """How a client on this machine reaches a server listening on `host`, for a URL."""
    if host in ("", "0.0.0.0"):
        return LOOPBACK
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def _serve_front(
    front: FrontDoor,
    host: str,
    port: int,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await front.serve(host, port, task_status=task_status)
