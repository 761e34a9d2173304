"""Run the Kallichore API with hypercorn's trio worker in the caller's nursery.

Shutdown order matters: channel clients are told first (a 1001 close, so they are not left
waiting for hypercorn's graceful timeout), then hypercorn stops accepting and drains.
"""

from __future__ import annotations

import logging
from functools import partial

import attrs
import hypercorn.trio
import trio
from hypercorn.config import Config

from kallichore.api.app import ChannelSockets, ServerState, create_app
from kallichore.api.channels import ChannelBroker
from kallichore.supervisor import Supervisor

logger = logging.getLogger(__name__)

# A WebSocket ping every 10 s, as Kallichore sends them.
PING_INTERVAL_SECONDS = 10.0


@attrs.define
class RunningServer:
    """A serving API: where it listens, and its server-wide state."""

    urls: list[str]
    state: ServerState
    broker: ChannelBroker
    shutdown_requested: trio.Event
    # Set once the kernels are down and the HTTP server has stopped.
    finished: trio.Event = attrs.Factory(trio.Event)

    @property
    def url(self) -> str:
        return self.urls[0]


async def serve_api(
    supervisor: Supervisor,
    state: ServerState,
    *,
    binds: list[str],
    broker: ChannelBroker | None = None,
    sockets: ChannelSockets | None = None,
    shutdown_grace: float | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until a shutdown is requested (which first shuts every kernel down).

    `binds` are hypercorn bind strings: `127.0.0.1:0` (any free port) or `unix:/path`.
    `POST /shutdown` requests the shutdown; so may the caller, with `state.request_shutdown()`.
    """
    shutdown_requested = trio.Event()
    state.request_shutdown = shutdown_requested.set
    broker = broker or ChannelBroker()
    app = create_app(supervisor, state, broker, sockets)
    config = Config()
    config.bind = binds
    config.accesslog = None
    config.graceful_timeout = 2.0
    config.websocket_ping_interval = PING_INTERVAL_SECONDS
    stop_http = trio.Event()
    running: RunningServer | None = None
    try:
        async with trio.open_nursery() as nursery:
            urls: list[str] = await nursery.start(
                partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop_http.wait)
            )
            running = RunningServer(urls, state, broker, shutdown_requested)
            task_status.started(running)
            try:
                await shutdown_requested.wait()
                logger.info("shutting down: stopping every kernel")
                await supervisor.shutdown(shutdown_grace)
            finally:
                broker.stopping.set()
                stop_http.set()
    finally:
        if running is not None:
            running.finished.set()
