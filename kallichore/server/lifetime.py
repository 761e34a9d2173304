"""The daemon's hold on the server's life: the shutdown trigger and idle shutdown.

The API changes these only through its `ServerControl` interface, which this implements, so
the API layer never imports the daemon.
"""

from __future__ import annotations

import logging

import attrs
import trio

from kallichore.server.idle_shutdown import IdleShutdown, Supervised

logger = logging.getLogger(__name__)


@attrs.define
class ServerLifetime:
    """When the server should stop: on request (`POST /shutdown`, a signal) or when idle."""

    idle: IdleShutdown = attrs.Factory(IdleShutdown)
    shutdown_requested: trio.Event = attrs.Factory(trio.Event)

    @property
    def idle_shutdown_hours(self) -> int | None:
        return self.idle.hours if self.idle.period is not None else None

    def set_idle_shutdown_hours(self, hours: int | None) -> None:
        self.idle.configure(hours=hours)

    def note_client(self, process_id: int) -> None:
        if process_id != self.idle.client_pid:
            logger.info("client process is now %d", process_id)
            self.idle.client_pid = process_id

    def request_shutdown(self) -> None:
        self.shutdown_requested.set()

    async def shut_down_when_idle(self, supervisor: Supervised) -> None:
        await self.idle.wait_until_idle(supervisor)
        self.request_shutdown()
