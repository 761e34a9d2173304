"""Kallichore's idle shutdown: exit after a full period in which nothing nudged the server.

Nudges are sessions being created, becoming idle or exiting, clients connecting, and client
heartbeats. A tick comes at least one full period after the previous one and after the last
nudge (missed ticks, say across a laptop's sleep, are not caught up). At a tick the server stays
up while the client process that sent heartbeats is alive, or while any session is starting,
busy, or has a client attached.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Protocol

import attrs
import psutil
import trio

from kallichore.api.models import MAX_IDLE_SHUTDOWN_HOURS
from kallichore.session.model import Status

logger = logging.getLogger(__name__)

# `--idle-shutdown-hours 0` means this many seconds, as in Kallichore.
ZERO_HOURS_SECONDS = 30.0


class Session(Protocol):
    @property
    def status(self) -> Status: ...

    @property
    def connected(self) -> bool: ...


class Supervised(Protocol):
    """What idle shutdown watches: the supervisor's activity and its sessions."""

    @property
    def last_activity(self) -> float: ...

    def sessions(self) -> Sequence[Session]: ...


def _hours(_: object, __: object, hours: int | None) -> None:
    """Bounded, so that no period overflows a float or a timer."""
    if hours is not None and not 0 <= hours <= MAX_IDLE_SHUTDOWN_HOURS:
        raise ValueError(f"idle shutdown hours are 0 to {MAX_IDLE_SHUTDOWN_HOURS}, not {hours}")


def _seconds(_: object, __: object, seconds: float | None) -> None:
    if seconds is not None and not 0 < seconds < math.inf:
        raise ValueError(f"idle shutdown seconds must be positive and finite, not {seconds}")


@attrs.define
class IdleShutdown:
    """The configured period and the client process whose life keeps the server up.

    The period is checked whenever it is set (attrs validates on assignment too).
    """

    hours: int | None = attrs.field(default=None, validator=_hours)
    seconds: float | None = attrs.field(default=None, validator=_seconds)
    client_pid: int | None = None
    _changed: trio.Event = attrs.field(factory=trio.Event)
    _configured_at: float = 0.0

    @property
    def period(self) -> float | None:
        """Seconds of quiet before shutting down; None for never."""
        if self.seconds is not None:
            return self.seconds
        if self.hours is None:
            return None
        return ZERO_HOURS_SECONDS if self.hours == 0 else self.hours * 3600.0

    def configure(self, *, hours: int | None = None, seconds: float | None = None) -> None:
        """Set a new period (or none), counted from now."""
        self.hours = hours
        self.seconds = seconds
        self._configured_at = trio.current_time()
        self._changed.set()

    async def wait_until_idle(self, supervisor: Supervised) -> None:
        """Return when the server should shut down for idleness."""
        started = trio.current_time()
        last_tick = started
        self._configured_at = started
        while True:
            self._changed = trio.Event()
            period = self.period
            if period is None:
                await self._changed.wait()
                continue
            due = max(supervisor.last_activity, last_tick, self._configured_at) + period
            with trio.move_on_at(due):
                await self._changed.wait()
                continue
            if trio.current_time() < max(supervisor.last_activity, self._configured_at) + period:
                continue
            last_tick = trio.current_time()
            if last_tick - started < period or self._client_alive() or _in_use(supervisor):
                continue
            logger.info("idle for %g seconds: shutting down", period)
            return

    def _client_alive(self) -> bool:
        pid = self.client_pid
        if pid is None or pid <= 1:
            return False
        try:
            if psutil.pid_exists(pid):
                return True
        except (OverflowError, OSError, psutil.Error) as error:
            # Not a pid this system can have: a heartbeat must not take the server down.
            logger.warning("client process %d cannot be looked up: %s", pid, error)
        logger.info("client process %d is gone", pid)
        self.client_pid = None
        return False


def _in_use(supervisor: Supervised) -> bool:
    return any(s.status in _WORKING or s.connected for s in supervisor.sessions())


# A kernel being started is work in progress, as much as one running code.
_WORKING = frozenset({Status.STARTING, Status.BUSY})
