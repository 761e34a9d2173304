"""The session event log: order, retention while nobody listens, bounds, cancellation."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from kallichore.jupyter.wire import Channel, Message
from kallichore.session.events import (
    EVENT_OVERHEAD_BYTES,
    RECEIVE_MAX_BYTES,
    Event,
    EventLog,
    EventsDropped,
    ExecutionQueuedEvent,
    JupyterEvent,
    OutputEvent,
    Subscription,
    event_size,
)


def queued(n: int) -> ExecutionQueuedEvent:
    return ExecutionQueuedEvent(str(n))


async def test_events_published_with_no_subscriber_reach_the_next_one_in_order() -> None:
    log = EventLog()
    for i in range(5):
        log.publish(queued(i))
    with log.subscribe() as sub:
        assert await sub.receive() == [queued(i) for i in range(5)]
    log.publish(queued(5))
    with log.subscribe() as sub:
        # What the first subscriber took is not delivered twice.
        assert await sub.receive() == [queued(5)]


async def test_receive_waits_for_new_events() -> None:
    log = EventLog()
    with log.subscribe() as sub:
        async with trio.open_nursery() as nursery:
            got: list[object] = []

            async def reader() -> None:
                got.extend(await sub.receive())

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            log.publish(queued(1))
        assert got == [queued(1)]


async def test_each_subscriber_sees_every_event() -> None:
    log = EventLog()
    with log.subscribe() as a, log.subscribe() as b:
        for i in range(3):
            log.publish(queued(i))
        assert await a.receive(max_events=2) == [queued(0), queued(1)]
        assert await b.receive() == [queued(i) for i in range(3)]
        assert await a.receive() == [queued(2)]


async def test_overflow_drops_the_oldest_and_says_so() -> None:
    log = EventLog(max_bytes=3 * EVENT_OVERHEAD_BYTES)
    for i in range(10):
        log.publish(queued(i))
    assert len(log) == 3
    with log.subscribe() as sub:
        assert await sub.receive() == [EventsDropped(7), queued(7), queued(8), queued(9)]
    # What was published counts, dropped or not (a burst's size, for giving memory back).
    assert log.published_bytes == 10 * EVENT_OVERHEAD_BYTES


async def test_a_slow_subscriber_is_told_what_it_missed() -> None:
    log = EventLog(max_bytes=2 * EVENT_OVERHEAD_BYTES)
    with log.subscribe() as sub:
        for i in range(5):
            log.publish(queued(i))
        assert await sub.receive() == [EventsDropped(3), queued(3), queued(4)]


async def test_a_client_reading_again_after_a_burst_takes_the_log_in_slices() -> None:
    """What a client that stopped reading has missed comes out about RECEIVE_MAX_BYTES at a time
    (so it is never framed and copied whole), in order, and an event larger than that alone."""
    line = "x" * (RECEIVE_MAX_BYTES // 4)
    log = EventLog(max_bytes=16 * RECEIVE_MAX_BYTES)
    with log.subscribe() as sub:
        for i in range(20):
            log.publish(OutputEvent("stdout", f"{i} {line}"))
        log.publish(OutputEvent("stdout", "x" * 2 * RECEIVE_MAX_BYTES))
        batches: list[list[Event]] = []
        while len(batches) < 6:
            batches.append(await sub.receive())
    sizes = [sum(map(event_size, batch)) for batch in batches]
    assert all(len(batch) == 4 for batch in batches[:5]), sizes
    assert all(size < RECEIVE_MAX_BYTES + event_size(batches[0][0]) for size in sizes[:5])
    assert [int(e.text.split()[0]) for b in batches[:5] for e in b] == list(range(20))  # type: ignore[union-attr]
    assert batches[5] == [OutputEvent("stdout", "x" * 2 * RECEIVE_MAX_BYTES)]


async def test_an_observer_leaves_the_backlog_for_the_next_client() -> None:
    log = EventLog()
    log.publish(queued(0))
    with log.subscribe(backlog=False) as observer:
        log.publish(queued(1))
        assert await observer.receive() == [queued(1)]
    with log.subscribe() as client:
        assert await client.receive() == [queued(0), queued(1)]


async def test_an_observer_after_a_seq_keeps_what_it_has_not_read_and_acknowledges_nothing() -> (
    None
):
    log = EventLog()
    for i in range(3):
        log.publish(queued(i))
    with log.subscribe() as client:
        assert await client.receive() == [queued(0), queued(1), queued(2)]
        parked = log.subscribe(after=1)
        client.close()
        log.publish(queued(3))
        # The parked observer holds queued(1) and queued(2) (acknowledged) for its reader:
        assert log.acknowledged == 3
        assert not log.attached
        assert await parked.receive() == [queued(1), queued(2), queued(3)]
        parked.close()
    # Only queued(3), the next client's backlog, is left.
    assert len(log) == 1
    with pytest.raises(ValueError, match="not in this session's log"):
        log.subscribe(after=5)


async def test_an_observer_after_a_seq_is_told_what_the_bound_dropped() -> None:
    log = EventLog(max_bytes=2 * EVENT_OVERHEAD_BYTES)
    with log.subscribe(after=0) as parked:
        for i in range(5):
            log.publish(queued(i))
        assert await parked.receive() == [EventsDropped(3), queued(3), queued(4)]
        assert log.acknowledged == 0


async def test_cancelled_receive_takes_nothing() -> None:
    log = EventLog()
    with log.subscribe() as sub:
        log.publish(queued(0))
        with trio.CancelScope() as scope:
            scope.cancel()
            await sub.receive()
        assert await sub.receive() == [queued(0)]


async def test_close_ends_subscribers_after_the_remaining_events() -> None:
    log = EventLog()
    with log.subscribe() as sub:
        log.publish(queued(0))
        log.close()
        log.publish(queued(1))
        assert await sub.receive() == [queued(0)]
        with pytest.raises(trio.EndOfChannel):
            await sub.receive()


def test_the_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EventLog(max_bytes=0)


def stream(text: str, buffers: tuple[bytes, ...] = ()) -> JupyterEvent:
    message = Message.build(
        "stream", {"name": "stdout", "text": text}, session="s", buffers=buffers
    )
    return JupyterEvent(Channel.IOPUB, message)


def test_an_events_size_is_its_payload_plus_a_fixed_overhead() -> None:
    event = stream("x" * 1000, (b"b" * 500,))
    payload = len(event.message.content_json) + len(event.message.metadata_json) + 500
    assert event_size(event) == EVENT_OVERHEAD_BYTES + payload
    assert event_size(OutputEvent("stdout", "abc")) == EVENT_OVERHEAD_BYTES + 3
    assert event_size(queued(1)) == EVENT_OVERHEAD_BYTES


async def test_the_bound_is_in_bytes_whatever_the_count() -> None:
    bound = 1_000_000
    log = EventLog(max_bytes=bound)
    with log.subscribe() as stuck:  # attached, never reads
        big = [stream(f"{i:08d}" + "x" * 100_000) for i in range(50)]
        for event in big:
            log.publish(event)
            assert log.nbytes <= bound
        assert len(log) == bound // event_size(big[0])
        small: list[Event] = [queued(i) for i in range(10_000)]
        log.publish_many(small)
        assert log.nbytes <= bound
        assert len(log) == bound // EVENT_OVERHEAD_BYTES
        # It reads again: told how many it missed, then the newest, in order.
        kept = len(log)
        dropped, *rest = await stuck.receive(max_events=20_000)
        assert dropped == EventsDropped(50 + 10_000 - kept)
        assert rest == small[-kept:]


async def test_the_newest_event_stays_even_when_larger_than_the_bound() -> None:
    log = EventLog(max_bytes=10)
    large = stream("x" * 100)
    log.publish_many([queued(0), large])
    with log.subscribe() as sub:
        assert await sub.receive() == [EventsDropped(1), large]


async def test_an_unclean_drop_leaves_what_was_not_acknowledged_for_the_next_subscriber() -> None:
    log = EventLog()
    log.publish_many([queued(i) for i in range(5)])
    first = log.subscribe()
    assert await first.receive() == [queued(i) for i in range(5)]
    first.acknowledge(2)  # e.g. a pong after the second frame
    first.close(acknowledged=0)  # its socket died
    assert log.acknowledged == 2
    assert len(log) == 3, "what was acknowledged is let go"
    with log.subscribe() as second:
        assert await second.receive() == [queued(2), queued(3), queued(4)]
    # `second` closed cleanly: nothing is replayed again.
    log.publish(queued(5))
    with log.subscribe() as third:
        assert await third.receive() == [queued(5)]


async def test_acknowledging_never_goes_past_what_was_taken_or_backwards() -> None:
    log = EventLog()
    log.publish_many([queued(i) for i in range(4)])
    sub = log.subscribe()
    await sub.receive(max_events=2)
    sub.acknowledge(10)
    assert log.acknowledged == 2
    sub.acknowledge(1)
    assert log.acknowledged == 2
    with log.subscribe(backlog=False) as observer:
        log.publish(queued(4))
        await observer.receive()
        observer.acknowledge(5)
        assert log.acknowledged == 2, "an observer acknowledges nothing"
    sub.close(acknowledged=0)


async def test_resume_continues_after_the_given_seq() -> None:
    log = EventLog()
    log.publish_many([queued(i) for i in range(6)])
    first = log.subscribe()
    await first.receive()
    first.close(acknowledged=0)
    # The client had seqs 1..4 (events 0..3) when its socket died.
    with log.subscribe(resume=4) as resumed:
        assert await resumed.receive() == [queued(4), queued(5)]
    assert log.acknowledged == 6


async def test_resume_after_what_is_gone_says_how_much_and_a_bad_seq_is_refused() -> None:
    log = EventLog(max_bytes=3 * EVENT_OVERHEAD_BYTES)
    log.publish_many([queued(i) for i in range(10)])
    with log.subscribe(resume=2) as resumed:
        assert await resumed.receive() == [EventsDropped(5), queued(7), queued(8), queued(9)]
    with pytest.raises(ValueError, match="not in this session's log"):
        log.subscribe(resume=11)


async def test_a_log_that_continues_an_earlier_one_numbers_past_it() -> None:
    """A daemon restarted on its state directory: a client resuming from the session's
    previous life gets the whole new log, and its old seq is never taken for a new one."""
    log = EventLog(first_seq=1_000)
    log.publish_many([queued(0), queued(1)])
    assert log.last_seq == 1_002
    with log.subscribe(resume=5) as resumed:
        assert await resumed.receive() == [queued(0), queued(1)]
    with pytest.raises(ValueError, match="not in this session's log"):
        log.subscribe(resume=1_003)


class RecordingSink:
    """A sink that takes events while `accepting` (and raises on request)."""

    def __init__(self, subscription: Subscription) -> None:
        self.accepting = True
        self.failing = False
        self.taken: list[object] = []
        subscription.sink = self

    def __call__(self, events: list[Event]) -> bool:
        if self.failing:
            raise RuntimeError("the sink broke")
        if self.accepting:
            self.taken.extend(events)
        return self.accepting


async def test_a_caught_up_subscriber_gets_new_events_through_its_sink_only() -> None:
    log = EventLog()
    with log.subscribe() as sub:
        sink = RecordingSink(sub)
        log.publish_many([queued(0), queued(1)])
        log.publish(queued(2))
        assert sink.taken == [queued(0), queued(1), queued(2)]
        with trio.move_on_after(0.05):
            assert await sub.receive() == [], "taken by the sink, so never received"
    with log.subscribe() as later:
        log.publish(queued(3))
        assert await later.receive() == [queued(3)], "the sink's events count as delivered"


async def test_what_the_sink_declines_is_received_in_order_and_later_events_wait_for_it() -> None:
    log = EventLog()
    with log.subscribe() as sub:
        sink = RecordingSink(sub)
        sink.accepting = False
        log.publish(queued(0))
        sink.accepting = True
        # The subscriber is behind now: the sink must not jump the queue.
        log.publish(queued(1))
        assert sink.taken == []
        assert await sub.receive() == [queued(0), queued(1)]
        log.publish(queued(2))
        assert sink.taken == [queued(2)]


async def test_a_failing_sink_leaves_the_events_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = EventLog()
    with log.subscribe() as sub:
        sink = RecordingSink(sub)
        sink.failing = True
        log.publish(queued(0))
        assert await sub.receive() == [queued(0)]
    assert "an event sink failed" in caplog.text


async def test_a_subscriber_parked_behind_a_sink_wakes_for_declined_events() -> None:
    log = EventLog()
    with log.subscribe() as sub:
        sink = RecordingSink(sub)
        got: list[object] = []
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                got.extend(await sub.receive())

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            log.publish(queued(0))
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            sink.accepting = False
            log.publish(queued(1))
        assert got == [queued(1)]
        assert sink.taken == [queued(0)]
