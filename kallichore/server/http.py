"""Run the Kallichore API with hypercorn's trio worker in the caller's nursery.

Shutdown order matters: channel clients are told first (a 1001 close, so they are not left
waiting for hypercorn's graceful timeout), then hypercorn stops accepting and drains.
"""

from __future__ import annotations

import logging
import secrets
from functools import partial

import attrs
import hypercorn.trio
import trio
from hypercorn.config import Config

from kallichore.api.app import ServerState, create_app
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
    shutdown_requested: trio.Event

    @property
    def url(self) -> str:
        return self.urls[0]


async def serve_api(
    supervisor: Supervisor,
    *,
    binds: list[str],
    token: str | None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `POST /shutdown` (which first shuts every kernel down) or cancellation.

    `binds` are hypercorn bind strings: `127.0.0.1:0` (any free port) or `unix:/path`.
    """
    shutdown_requested = trio.Event()
    state = ServerState(token=token, server_id=secrets.token_hex(8))
    state.request_shutdown = shutdown_requested.set
    broker = ChannelBroker()
    app = create_app(supervisor, state, broker)
    config = Config()
    config.bind = binds
    config.accesslog = None
    config.graceful_timeout = 2.0
    config.websocket_ping_interval = PING_INTERVAL_SECONDS
    stop_http = trio.Event()
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(
            partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop_http.wait)
        )
        task_status.started(RunningServer(urls, state, shutdown_requested))
        try:
            await shutdown_requested.wait()
            logger.info("shutdown requested: stopping every kernel")
            await supervisor.shutdown()
        finally:
            broker.stopping.set()
            stop_http.set()
