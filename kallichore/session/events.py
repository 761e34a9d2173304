"""The ordered stream of what a session has to say to its clients.

Every kernel message and every supervisor event (status changes, process output, exits) is
appended to one `EventLog` per session, so every client sees one consistent order. Events wait
in the log until a subscriber has taken them: a kernel's output while nobody is attached is
delivered, in order, to the next subscriber. The log is bounded; when it overflows, the oldest
events are dropped and the subscriber that missed them is told how many with `EventsDropped`.
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
from kallichore.session.model import Status
from kallichore.session.resources import ResourceUsage

logger = logging.getLogger(__name__)


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
class ExitedEvent:
    """The kernel process ended: its exit code, or minus the signal number that ended it."""

    exit_code: int


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
    | ExitedEvent
    | WorkingDirChangedEvent
    | ResourceUsageEvent
    | HandshakeCompletedEvent
    | EventsDropped
)


class EventLog:
    """A bounded, ordered log of events with any number of independent subscribers.

    Sequence numbers count every event ever published. An event is retained while some attached
    subscriber has not read it yet, or while no subscriber has ever taken it; a new subscriber
    starts at the first event nobody has taken. Overflow drops the oldest events first.
    """

    def __init__(self, max_buffered: int = 100_000) -> None:
        if max_buffered < 1:
            raise ValueError("max_buffered must be at least 1")
        self._max_buffered = max_buffered
        self._events: deque[Event] = deque()
        self._first_seq = 0
        self._next_seq = 0
        self._delivered = 0
        self._subscribers: set[Subscription] = set()
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self._attached = trio.Event()

    def __len__(self) -> int:
        return len(self._events)

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
        self._next_seq += len(events)
        behind = False
        for subscription in self._subscribers:
            if subscription.cursor == first and subscription.offer(events):
                subscription.cursor = self._next_seq
                if subscription.delivers:
                    self._delivered = max(self._delivered, subscription.cursor)
            elif subscription.cursor < self._next_seq:
                behind = True
        self._trim()
        if behind:
            self._lot.unpark_all()

    def subscribe(self, *, backlog: bool = True) -> Subscription:
        """Follow the log from the first event nobody has taken.

        Without `backlog`, follow it from now on as an observer: what an observer reads still
        counts as undelivered for the next subscriber that takes the backlog.
        """
        if backlog:
            subscription = Subscription(self, self._delivered, delivers=True)
            self._attached.set()
        else:
            subscription = Subscription(self, self._next_seq, delivers=False)
        self._subscribers.add(subscription)
        return subscription

    def close(self) -> None:
        """No more events: subscribers get what is left, then `trio.EndOfChannel`."""
        self._closed = True
        self._lot.unpark_all()

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
        taken.extend(self._events[i] for i in range(start, stop))
        subscription.cursor += stop - start
        if subscription.delivers:
            self._delivered = max(self._delivered, subscription.cursor)
        self._trim()
        return taken

    def _trim(self) -> None:
        keep_from = min((s.cursor for s in self._subscribers), default=self._delivered)
        keep_from = min(keep_from, self._delivered)
        while self._events and self._first_seq < keep_from:
            self._events.popleft()
            self._first_seq += 1
        while len(self._events) > self._max_buffered:
            self._events.popleft()
            self._first_seq += 1


Sink = Callable[[list[Event]], bool]


class Subscription:
    """One reader's position in an `EventLog`."""

    def __init__(self, log: EventLog, cursor: int, *, delivers: bool) -> None:
        self._log = log
        self.cursor = cursor
        self.delivers = delivers
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
        """Wait for events after the cursor and take up to `max_events` of them.

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

    def close(self) -> None:
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
