"""One client per session on the channels stream, handed over without loss or duplication.

A session's channel client reads the session's event log and forwards what the client sends
to the kernel. When a second client connects, the first is *displaced*: it finishes the batch it
is sending, is told `clientDisconnected` and closed, and only then does the new client start
reading, from exactly the event after the last one the old client was sent. The transport (a
WebSocket over TCP or over a per-session Unix socket) is behind `ClientTransport`.

While a client is caught up, new events are written to it by the task that publishes them
(the log's sink) when its socket takes them without waiting: on the hot path this saves a task
switch per batch. Otherwise, and always for what the sink declines, its forwarding task reads
the log. Either way the publisher never waits for a client.

What a client was sent stays in the log until the client acknowledges it, so that an unclean
drop (its socket died with frames in it) loses nothing: the transport acknowledges what a pong
or a clean close proves the client read, and the next client starts after that. A client that
asked for numbered frames (`Resume`) says itself where to continue when it comes back; pongs do
not acknowledge for it, since it may have read frames it never got to process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol

import trio

from kallichore.channels.kallichore_framing import (
    FrameError,
    Resume,
    client_error,
    decode_buffers,
    encode_event,
    kernel_event,
    numbered,
    parse_client_frame,
)
from kallichore.errors import KallichoreError
from kallichore.jupyter.wire import utc_now
from kallichore.session.events import Event, Subscription
from kallichore.session.kernel_session import KernelSession

logger = logging.getLogger(__name__)

# WebSocket close codes.
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
# How long a client we close gets to answer our Close (proving it read everything before it).
CLOSE_ANSWER_SECONDS = 1.0


class ClientTransport(Protocol):
    """Where a client's frames go: each frame is the UTF-8 JSON of one text message.

    Frames of events carry `through`, the seq of the batch's last event: the transport tells
    `on_acknowledged` the seq through which the client provably read them, and after the
    connection, `sent_through` and whether it `closed_cleanly`.
    """

    on_acknowledged: Callable[[int], None] | None

    @property
    def sent_through(self) -> int:
        """The seq of the last event whose frame was written whole (or is owed)."""

    @property
    def closed_cleanly(self) -> bool:
        """The client sent a Close frame: it read what it wanted of what it was sent."""

    async def send(self, frame: bytes) -> None: ...

    async def send_batch(self, frames: list[bytes], through: int | None = None) -> None:
        """Several frames at once, in order (the transport may coalesce the writes)."""

    @property
    def free(self) -> bool:
        """Nothing is being written and nothing is owed: `send_now` may write at once."""

    def send_now(self, frames: list[bytes], through: int) -> bool:
        """Write the frames at once if nothing else is being written, without waiting.

        False if nothing was written. True if the socket took the frames, or part of them:
        then `owes` is true until a later send or `flush` has written the rest.
        """

    @property
    def owes(self) -> bool: ...

    async def flush(self) -> None:
        """Write what `send_now` could not."""

    async def receive(self) -> str | None:
        """The next text frame; None once the client has closed the connection."""

    async def close(self, code: int, reason: str) -> None: ...


class ChannelClient:
    """A client attached to one session's channels."""

    def __init__(
        self, session: KernelSession, transport: ClientTransport, resume: Resume | None = None
    ) -> None:
        self.session = session
        self._transport = transport
        self._resume = resume
        self._displaced = False
        self._waiting: trio.CancelScope | None = None
        self._finished = trio.Event()

    async def run(self, stopping: trio.Event) -> None:
        """Serve the client until it leaves, is displaced, or the server stops."""
        transport = self._transport
        try:
            resume = self._resume
            events = self.session.events.subscribe(resume=resume.seq if resume else None)
            if resume is None:
                transport.on_acknowledged = events.acknowledge
            try:
                async with trio.open_nursery() as nursery:
                    events.sink = partial(self._send_now, nursery, events)
                    nursery.start_soon(self._forward_events, events, nursery.cancel_scope)
                    nursery.start_soon(self._forward_client_messages, nursery.cancel_scope)
                    nursery.start_soon(self._close_when, stopping, nursery.cancel_scope)
            finally:
                # Without a clean close, what was sent since the last acknowledgement is
                # replayed to the next client.
                events.close(transport.sent_through if transport.closed_cleanly else 0)
        finally:
            self._finished.set()

    def _frames(self, events: list[Event], through: int) -> list[bytes]:
        """The frames of events whose last has seq `through` (numbered if the client asked)."""
        frames = [encode_event(event) for event in events]
        if self._resume is not None:
            first = through - len(frames) + 1
            frames = [numbered(frame, first + i) for i, frame in enumerate(frames)]
        return frames

    def _send_now(
        self, nursery: trio.Nursery, subscription: Subscription, events: list[Event]
    ) -> bool:
        """The event log's fast path: new events written in the publisher's task, when the
        client is caught up and its socket takes them without waiting."""
        transport = self._transport
        # Checked before framing: a batch declined here is framed again by the forwarding task.
        if self._displaced or not transport.free:
            return False
        through = subscription.cursor + len(events)
        if not transport.send_now(self._frames(events, through), through):
            return False
        if transport.owes:
            nursery.start_soon(transport.flush)
        return True

    async def displace(self) -> None:
        """Stop this client for a newer one, and wait until it has let go of the event log."""
        self._displaced = True
        if self._waiting is not None:
            self._waiting.cancel()
        await self._finished.wait()

    async def _forward_events(self, events: Subscription, done: trio.CancelScope) -> None:
        while not self._displaced:
            batch = None
            with trio.CancelScope() as self._waiting:
                try:
                    batch = await events.receive()
                except trio.EndOfChannel:
                    break
            self._waiting = None
            if batch is None:
                break
            through = events.cursor
            await self._transport.send_batch(self._frames(batch, through), through)
        if self._displaced:
            reason = "another client connected to this session"
            logger.info("session %s: a channels client was displaced", self.session.session_id)
            await self._transport.send(kernel_event("clientDisconnected", reason))
            await self._transport.close(POLICY_VIOLATION, reason)
        else:
            await self._transport.close(GOING_AWAY, "the session was deleted")
        # The client's answer ends the connection (`_forward_client_messages`), cleanly.
        await trio.sleep(CLOSE_ANSWER_SECONDS)
        done.cancel()

    async def _forward_client_messages(self, done: trio.CancelScope) -> None:
        while True:
            text = await self._transport.receive()
            if text is None:  # an empty frame is a bad frame, not a goodbye
                break
            await self._forward(text)
        logger.info("session %s: a channels client disconnected", self.session.session_id)
        done.cancel()

    async def _forward(self, text: str) -> None:
        msg_id = None
        try:
            channel, data = parse_client_frame(text)
            header = data["header"]
            msg_id = header["msg_id"]
            parent = data.get("parent_header") or {}
            message = self.session.message(
                header["msg_type"],
                data.get("content", {}),
                msg_id=msg_id,
                parent=self._rebuild(parent) if parent.get("msg_id") else None,
                metadata=data.get("metadata", {}),
                buffers=decode_buffers(data),
            )
            await self.session.send(channel, message)
        except FrameError as error:
            logger.info("session %s: refused a client frame: %s", self.session.session_id, error)
            await self._transport.send(client_error(error, error.msg_id))
        except KallichoreError as error:
            await self._transport.send(client_error(error, msg_id))

    def _rebuild(self, parent: dict[str, object]) -> dict[str, object]:
        """A parent header as the kernel expects it, from the msg_id/msg_type clients keep."""
        spec = self.session.spec
        return {
            "msg_id": parent.get("msg_id"),
            "msg_type": parent.get("msg_type"),
            "session": self.session.session_id,
            "username": spec.username or "kallichore",
            "date": utc_now(),
            "version": spec.protocol_version,
        }

    async def _close_when(self, stopping: trio.Event, done: trio.CancelScope) -> None:
        await stopping.wait()
        await self._transport.close(GOING_AWAY, "the server is shutting down")
        done.cancel()


class ChannelBroker:
    """Which client is attached to which session."""

    def __init__(self) -> None:
        self._clients: dict[str, ChannelClient] = {}
        self.stopping = trio.Event()
        self._detached = trio.Event()
        self._detached.set()

    async def wait_detached(self) -> None:
        """Wait until no client is attached to any session."""
        await self._detached.wait()

    async def serve(
        self, session: KernelSession, transport: ClientTransport, resume: Resume | None = None
    ) -> None:
        session_id = session.session_id
        previous = self._clients.get(session_id)
        client = ChannelClient(session, transport, resume)
        if not self._clients:
            self._detached = trio.Event()
        self._clients[session_id] = client
        logger.info("session %s: a channels client connected", session_id)
        if previous is not None:
            await previous.displace()
        try:
            await client.run(self.stopping)
        finally:
            if self._clients.get(session_id) is client:
                del self._clients[session_id]
            if not self._clients:
                self._detached.set()
