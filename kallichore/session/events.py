"""The ordered stream of what a session has to say to its clients.

Every kernel message and every supervisor event (status changes, process output, exits) is
appended to one `EventLog` per session, so every client sees one consistent order, and gets a
sequence number. Events wait in the log until a client has *acknowledged* them: a kernel's
output while nobody is attached is delivered, in order, to the next subscriber, and what was
sent to a client that then vanished (its socket died with the frames in it) is still there for
the next one: the replay window. A client acknowledges by closing cleanly, by resuming from a
sequence number (it has everything up to there), or through its transport (a WebSocket pong).

The log is bounded by bytes, not by count: a client that stops reading while the kernel prints
costs at most the bound. When it overflows, the oldest events are dropped and whoever missed
them is told how many with `EventsDropped`. An event's size is counted from the lengths its
message already has, never by encoding it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Literal

import attrs
import trio

from kallichore.jupyter.connection import ConnectionInfo
from kallichore.jupyter.wire import Channel, Message
from kallichore.session.model import RestartOrigin, Status
from kallichore.session.resources import ResourceUsage

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 2**20
# What one event costs in Python objects besides its content, metadata and buffers (the parsed
# headers, the message and the event): measured at ~2 KiB for a small stream message. Counted
# per event so that a flood of tiny messages weighs what it costs.
EVENT_OVERHEAD_BYTES = 2048
# What one `receive` takes at most (and at least one event): a client reading again after a
# burst gets the log in slices, each framed and written before the next, rather than all of it
# at once, which framing and joining would copy twice over (three times the bound at the peak).
RECEIVE_MAX_BYTES = 2**20


@attrs.frozen
class JupyterEvent:
    """A message from the kernel on one of its channels."""

    channel: Channel
    message: Message


@attrs.frozen
class StatusEvent:
    status: Status
    reason: str | None


@attrs.frozen
class OutputEvent:
    """One line the kernel process wrote to its own stdout or stderr (not iopub)."""

    stream: Literal["stdout", "stderr"]
    text: str


@attrs.frozen
class ExecutionQueuedEvent:
    """An `execute_request` is held until the kernel finishes the one before it."""

    msg_id: str


@attrs.frozen
class ExecutionRequestedEvent:
    """Code is about to run on somebody's behalf other than the attached client's (the agent
    API's `execute`): whoever watches the session sees what was run, and by whom."""

    msg_id: str
    code: str
    source: str


@attrs.frozen
class ExitedEvent:
    """The kernel process ended: its exit code, or minus the signal number that ended it;
    `restart` says who is restarting it, if this exit is part of a restart."""

    exit_code: int
    restart: RestartOrigin | None = None


@attrs.frozen
class WorkingDirChangedEvent:
    """The kernel's current directory changed during an execution."""

    path: str


@attrs.frozen
class ResourceUsageEvent:
    usage: ResourceUsage


@attrs.frozen
class HandshakeCompletedEvent:
    """A kernel registered itself through the JEP 66 handshake, at these ports."""

    session_id: str
    connection: ConnectionInfo


@attrs.frozen
class EventsDropped:
    """`count` events were dropped, unseen by this subscriber, because the log overflowed."""

    count: int


Event = (
    JupyterEvent
    | StatusEvent
    | OutputEvent
    | ExecutionQueuedEvent
    | ExecutionRequestedEvent
    | ExitedEvent
    | WorkingDirChangedEvent
    | ResourceUsageEvent
    | HandshakeCompletedEvent
    | EventsDropped
)


def event_size(event: Event) -> int:
    """About what `event` holds in memory, from lengths it already has (nothing is encoded)."""
    if type(event) is JupyterEvent:
        message = event.message
        size = EVENT_OVERHEAD_BYTES + len(message.content_json) + len(message.metadata_json)
        for buffer in message.buffers:
            size += len(buffer)
        return size
    if type(event) is OutputEvent:
        return EVENT_OVERHEAD_BYTES + len(event.text)
    if type(event) is ExecutionRequestedEvent:
        return EVENT_OVERHEAD_BYTES + len(event.code)
    return EVENT_OVERHEAD_BYTES


class EventLog:
    """A byte-bounded, ordered log of events with any number of independent subscribers.

    The n-th event ever published has sequence number `first_seq` + n, so a subscriber's cursor, the
    number of events before the next one it takes, is also the seq of the last one it took.
    Everything after the *acknowledged* point is kept (within the bound) and is where the next
    subscriber that takes the backlog starts; an observer keeps what it has not read yet. A
    resume point is just a seq: whoever keeps one per client (a `?resume=` query today, the
    Jupyter API's `session_id` tomorrow) can start a subscriber there.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *, first_seq: int = 0) -> None:
        """`first_seq`: the seq before this log's first event (0 unless the log continues one
        that an earlier process kept, whose seqs were all lower)."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._max_bytes = max_bytes
        self._events: deque[Event] = deque()
        # Each event's `event_size`, computed once.
        self._sizes: deque[int] = deque()
        self._bytes = 0
        self._published_bytes = 0
        self._origin = first_seq
        self._first_seq = first_seq
        self._next_seq = first_seq
        self._acked = first_seq
        self._subscribers: set[Subscription] = set()
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self._attached = trio.Event()

    def __len__(self) -> int:
        return len(self._events)

    @property
    def nbytes(self) -> int:
        """The estimated size of the events kept (see `event_size`)."""
        return self._bytes

    @property
    def published_bytes(self) -> int:
        """The estimated size of every event ever published here (see `event_size`)."""
        return self._published_bytes

    @property
    def last_seq(self) -> int:
        """The seq of the newest event (`first_seq` before the first)."""
        return self._next_seq

    @property
    def acknowledged(self) -> int:
        """The seq up to which a client has acknowledged the events; the next one starts after."""
        return self._acked

    @property
    def closed(self) -> bool:
        """No more events will come (the session ended)."""
        return self._closed

    @property
    def attached(self) -> bool:
        """A client is attached: some subscriber takes the backlog (an observer does not count)."""
        return self._attached.is_set()

    async def wait_attached(self) -> None:
        await self._attached.wait()

    def publish(self, event: Event) -> None:
        self.publish_many([event])

    def publish_many(self, events: list[Event]) -> None:
        """Append `events` in order; a caught-up subscriber's sink may take them at once."""
        if self._closed or not events:
            return
        first = self._next_seq
        self._events.extend(events)
        sizes = self._sizes
        total = self._bytes
        for event in events:
            size = event_size(event)
            sizes.append(size)
            total += size
        self._published_bytes += total - self._bytes
        self._bytes = total
        self._next_seq += len(events)
        behind = False
        for subscription in self._subscribers:
            if subscription.cursor == first and subscription.offer(events):
                subscription.cursor = self._next_seq
            elif subscription.cursor < self._next_seq:
                behind = True
        self._trim()
        if behind:
            self._lot.unpark_all()

    def subscribe(
        self, *, backlog: bool = True, resume: int | None = None, after: int | None = None
    ) -> Subscription:
        """Follow the log from the first event not acknowledged, or after `resume`.

        `resume` is the seq of the last event the client has: it acknowledges everything up to
        there, and what is gone since is announced by `EventsDropped`. Raises ValueError if it
        is past this log's last. A point from before the log began (a client of the daemon
        that ran this session before a restart) takes the whole log. Without `backlog`, follow
        the log from now on as an observer, which acknowledges nothing; with `after`, as an
        observer from after that seq (what it has not read stays in the log for it, within the
        bound, and what is gone is announced by `EventsDropped`: a Jupyter client's parked
        buffer).
        """
        start = resume if resume is not None else after
        if start is not None:
            point = max(start, self._origin)
            if point > self._next_seq:
                raise ValueError(
                    f"resume point {point} is not in this session's log "
                    f"(its last event is {self._next_seq})"
                )
            subscription = Subscription(self, point, delivers=resume is not None)
            if resume is not None:
                self._acknowledge(point)
        elif backlog:
            subscription = Subscription(self, self._acked, delivers=True)
        else:
            subscription = Subscription(self, self._next_seq, delivers=False)
        if subscription.delivers:
            self._attached.set()
        self._subscribers.add(subscription)
        return subscription

    def close(self) -> None:
        """No more events: subscribers get what is left, then `trio.EndOfChannel`."""
        self._closed = True
        self._lot.unpark_all()

    def _acknowledge(self, seq: int) -> None:
        if seq > self._acked:
            self._acked = seq
            self._trim()

    def _unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        if self.attached and not any(s.delivers for s in self._subscribers):
            self._attached = trio.Event()
        self._trim()

    def _take(self, subscription: Subscription, max_events: int) -> list[Event]:
        taken: list[Event] = []
        if subscription.cursor < self._first_seq:
            taken.append(EventsDropped(self._first_seq - subscription.cursor))
            subscription.cursor = self._first_seq
        start = subscription.cursor - self._first_seq
        stop = min(len(self._events), start + max_events)
        if self._bytes > RECEIVE_MAX_BYTES:  # (a caught-up client's log is far smaller)
            stop = self._slice_end(start, stop)
        taken.extend(self._events[i] for i in range(start, stop))
        subscription.cursor += stop - start
        self._trim()
        return taken

    def _slice_end(self, start: int, stop: int) -> int:
        """Where a take from `start` ends for RECEIVE_MAX_BYTES of content (at most `stop`, past
        at least one event)."""
        taken = 0
        sizes = self._sizes
        # (Indexing a deque is quick near either end, where a reader's cursor mostly is.)
        for index in range(start, stop):
            # Without the per-event overhead: what counts is what the frames will copy.
            taken += sizes[index] - EVENT_OVERHEAD_BYTES
            if taken >= RECEIVE_MAX_BYTES:
                return index + 1
        return stop

    def _trim(self) -> None:
        """Drop what is acknowledged and read by every observer, then the oldest events while
        over the bound (the newest stays, so that one event larger than the bound gets out)."""
        keep_from = min((s.cursor for s in self._subscribers), default=self._acked)
        keep_from = min(keep_from, self._acked)
        events, sizes = self._events, self._sizes
        count = min(keep_from - self._first_seq, len(events))
        if count > 0:
            freed = 0
            for _ in range(count):
                events.popleft()
                freed += sizes.popleft()
            self._bytes -= freed
            self._first_seq += count
        while self._bytes > self._max_bytes and len(events) > 1:
            events.popleft()
            self._bytes -= sizes.popleft()
            self._first_seq += 1


Sink = Callable[[list[Event]], bool]


class Subscription:
    """One reader's position in an `EventLog`."""

    def __init__(self, log: EventLog, cursor: int, *, delivers: bool) -> None:
        self._log = log
        self.cursor = cursor
        self.delivers = delivers
        self._closed = False
        # The fast path: while this subscriber is caught up, new events are offered to the sink
        # the moment they are published, in the publisher's task; events it takes are never
        # returned by `receive`. A sink that declines (returns False) leaves them in the log.
        self.sink: Sink | None = None

    def offer(self, events: list[Event]) -> bool:
        """Hand new events straight to the sink, if any; True if the sink took them all."""
        if self.sink is None:
            return False
        try:
            return self.sink(events)
        except Exception:
            logger.exception("an event sink failed; its events stay in the log")
            return False

    async def receive(self, max_events: int = 1000) -> list[Event]:
        """Wait for events after the cursor and take up to `max_events` of them (and about
        RECEIVE_MAX_BYTES at most).

        Cancellation-safe: a cancelled call takes nothing.
        """
        log = self._log
        parked = False
        while self.cursor >= log._next_seq:
            if log._closed:
                await trio.lowlevel.checkpoint()
                raise trio.EndOfChannel
            await log._lot.park()
            parked = True
        if not parked:
            # Every trio operation yields at least once; one that parked already did.
            await trio.lowlevel.checkpoint()
        return log._take(self, max_events)

    def acknowledge(self, seq: int) -> None:
        """The client has received every event up to `seq` (at most what it was given)."""
        if self.delivers and not self._closed:
            self._log._acknowledge(min(seq, self.cursor))

    def close(self, acknowledged: int | None = None) -> None:
        """Stop following the log, the client having received every event up to `acknowledged`
        (by default all it took, as after a clean close). What it took after that stays for
        the next subscriber, which gets it again: the replay after an unclean drop."""
        if self._closed:
            return
        self.acknowledge(self.cursor if acknowledged is None else acknowledged)
        self._closed = True
        self._log._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
