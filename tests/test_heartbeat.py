"""The heartbeat's schedule on trio's autojump clock: what it reports, and when."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from kallichore.session.heartbeat import keep_beating


class Kernel:
    """Answers pings after `delay` seconds (math.inf: never); records each beat's time (from
    the start) and misses."""

    def __init__(self) -> None:
        self.delay = 0.1
        self.start = trio.current_time()
        self.beats: list[tuple[float, int]] = []

    async def ping(self) -> None:
        await trio.sleep(self.delay)

    async def on_beat(self, misses: int) -> None:
        self.beats.append((trio.current_time() - self.start, misses))

    async def beat_for(self, seconds: float, intervals: list[float] | None = None) -> None:
        def interval() -> float:
            return intervals.pop(0) if intervals else 2.0

        with trio.move_on_after(seconds):
            await keep_beating(self.ping, self.on_beat, timeout=5.0, interval=interval)


def times(kernel: Kernel) -> list[float]:
    return [t for t, _ in kernel.beats]


async def test_an_answering_kernel_is_pinged_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kernel = Kernel()
    await kernel.beat_for(7)
    assert times(kernel) == pytest.approx([0.1, 2.2, 4.3, 6.4])
    assert [misses for _, misses in kernel.beats] == [0, 0, 0, 0]


async def test_misses_are_counted_after_each_timeout_and_reset_by_an_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kernel = Kernel()
    kernel.delay = math.inf
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kernel.beat_for, 25)
        await trio.sleep(16)  # pings at 0, 7 and 14 time out 5 s later
        kernel.delay = 0.1
    assert times(kernel) == pytest.approx([5, 12, 19, 21.1, 23.2])
    assert [misses for _, misses in kernel.beats] == [1, 2, 3, 0, 0]


async def test_the_interval_is_asked_for_before_each_sleep(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kernel = Kernel()
    await kernel.beat_for(13, intervals=[10.0, 1.0, 1.0, 1.0])
    assert times(kernel) == pytest.approx([0.1, 10.2, 11.3, 12.4])
