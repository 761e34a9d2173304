"""The heartbeat's schedule, apart from the socket it pings, so its timing can be tested on
trio's autojump clock instead of in real seconds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


async def keep_beating(
    ping: Callable[[], Awaitable[None]],
    on_beat: Callable[[int], Awaitable[None]],
    *,
    timeout: float,
    interval: Callable[[], float],
) -> None:
    """Forever: `ping` the kernel (it returns once the kernel answered), give it `timeout`
    seconds, tell `on_beat` how many beats in a row went unanswered (0: this one was answered),
    then sleep `interval()` seconds (asked each time: it depends on whether anyone watches)."""
    misses = 0
    while True:
        with trio.move_on_after(timeout) as timer:
            await ping()
        misses = misses + 1 if timer.cancelled_caught else 0
        await on_beat(misses)
        await trio.sleep(interval())
