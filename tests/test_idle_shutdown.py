"""Idle shutdown's timing, on trio's autojump clock: what it watches is a small stand-in for the
supervisor's activity and sessions (no kernels: time is what is under test here; the daemon
tests cover the real thing end to end).
"""

from __future__ import annotations

import math
import os
import sys

import attrs
import pytest
import trio
import trio.testing

from kallichore.server.idle_shutdown import ZERO_HOURS_SECONDS, IdleShutdown
from kallichore.server.lifetime import ServerLifetime
from kallichore.session.model import Status

PERIOD = 100.0


@attrs.define
class Session:
    status: Status = Status.IDLE
    connected: bool = False


@attrs.define
class Activity:
    """The supervisor as idle shutdown sees it."""

    last_activity: float = attrs.Factory(trio.current_time)
    running: list[Session] = attrs.Factory(list)

    def sessions(self) -> list[Session]:
        return self.running

    def nudge(self) -> None:
        self.last_activity = trio.current_time()


async def shut_down_after(idle: IdleShutdown, activity: Activity) -> float:
    """Seconds until `idle` decides to shut down."""
    started = trio.current_time()
    await idle.wait_until_idle(activity)
    return trio.current_time() - started


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


async def test_a_quiet_server_shuts_down_after_one_period(clock: trio.testing.MockClock) -> None:
    assert await shut_down_after(IdleShutdown(seconds=PERIOD), Activity()) == PERIOD


async def test_activity_starts_the_period_again(clock: trio.testing.MockClock) -> None:
    activity = Activity()

    async def nudge_later() -> None:
        await trio.sleep(PERIOD * 0.75)
        activity.nudge()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(nudge_later)
        assert await shut_down_after(IdleShutdown(seconds=PERIOD), activity) == PERIOD * 1.75


@pytest.mark.parametrize(
    "in_use",
    [Session(status=Status.STARTING), Session(status=Status.BUSY), Session(connected=True)],
    ids=["starting", "busy", "attached"],
)
async def test_a_starting_busy_or_attached_session_keeps_the_server_up(
    clock: trio.testing.MockClock, in_use: Session
) -> None:
    """Checked at each tick: the tick after the session is free again shuts down."""
    activity = Activity(running=[in_use, Session()])

    async def free_later() -> None:
        await trio.sleep(PERIOD * 2.5)
        activity.running[0] = Session()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(free_later)
        assert await shut_down_after(IdleShutdown(seconds=PERIOD), activity) == PERIOD * 3


async def test_the_heartbeat_client_keeps_the_server_up_while_it_lives(
    clock: trio.testing.MockClock,
) -> None:
    idle = IdleShutdown(seconds=PERIOD, client_pid=os.getpid())
    with trio.move_on_after(PERIOD * 10) as waiting:
        await idle.wait_until_idle(Activity())
    assert waiting.cancelled_caught
    gone = await trio.lowlevel.open_process([sys.executable, "-c", "pass"])
    await gone.wait()
    idle.client_pid = gone.pid
    assert await shut_down_after(idle, Activity()) == PERIOD
    assert idle.client_pid is None


async def test_no_period_never_shuts_down_until_one_is_set(clock: trio.testing.MockClock) -> None:
    lifetime = ServerLifetime()
    assert lifetime.idle_shutdown_hours is None

    async def configure_later() -> None:
        await trio.sleep(10 * 3600)
        lifetime.set_idle_shutdown_hours(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(configure_later)
        nursery.start_soon(lifetime.shut_down_when_idle, Activity(last_activity=0.0))
        await lifetime.shutdown_requested.wait()
    assert trio.current_time() == 10 * 3600 + ZERO_HOURS_SECONDS
    assert lifetime.idle_shutdown_hours == 0


async def test_a_new_period_counts_from_when_it_is_set(clock: trio.testing.MockClock) -> None:
    idle = IdleShutdown(hours=1)

    async def shorten_later() -> None:
        await trio.sleep(1800)
        idle.configure(seconds=PERIOD)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(shorten_later)
        assert await shut_down_after(idle, Activity()) == 1800 + PERIOD


def test_the_lifetime_notes_the_client_and_the_shutdown_request() -> None:
    lifetime = ServerLifetime()
    lifetime.note_client(1234)
    assert lifetime.idle.client_pid == 1234
    assert not lifetime.shutdown_requested.is_set()
    lifetime.request_shutdown()
    assert lifetime.shutdown_requested.is_set()


@pytest.mark.parametrize("pid", [2**31, 2**63, 10**400])
async def test_a_client_pid_no_system_can_have_is_a_gone_client(
    clock: trio.testing.MockClock, pid: int
) -> None:
    """The API refuses such pids; the check must not crash on one regardless."""
    idle = IdleShutdown(seconds=PERIOD, client_pid=pid)
    assert await shut_down_after(idle, Activity()) == PERIOD
    assert idle.client_pid is None


@pytest.mark.parametrize(
    "period", [{"hours": 65536}, {"hours": 10**400}, {"seconds": math.inf}, {"seconds": 0.0}]
)
def test_a_period_that_could_overflow_a_timer_is_refused(period: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="idle shutdown"):
        IdleShutdown(**period)  # type: ignore[arg-type]
    idle = IdleShutdown()
    with pytest.raises(ValueError, match="idle shutdown"):
        idle.configure(**period)  # type: ignore[arg-type]
