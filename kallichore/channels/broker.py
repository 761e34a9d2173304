"""One client per session on the channels stream, handed over without loss or duplication.

A session's channel client reads the session's event log and forwards what the client sends
to the kernel. When a second client connects, the first is *displaced*: it finishes the batch it
is sending, is told `clientDisconnected` and closed, and only then does the new client start
reading, from exactly the event after the last one the old client was sent. The transport (a
WebSocket over TCP or over a per-session Unix socket) is behind `ClientTransport`.

While a client is caught up, new events are written to it by the task that publishes them
(the log's sink) when its socket takes them without waiting: on the hot path this saves a task
switch per batch. Otherwise, and always for what the sink declines, its forwarding task reads
the log.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Protocol

import trio

from kallichore.channels.kallichore_framing import (
    FrameError,
    client_error,
    decode_buffers,
    encode_event,
    kernel_event,
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


class ClientTransport(Protocol):
    """Where a client's frames go: each frame is the UTF-8 JSON of one text message."""

    async def send(self, frame: bytes) -> None: ...

    async def send_batch(self, frames: list[bytes]) -> None:
        """Several frames at once, in order (the transport may coalesce the writes)."""

    @property
    def free(self) -> bool:
        """Nothing is being written and nothing is owed: `send_now` may write at once."""

    def send_now(self, frames: list[bytes]) -> bool:
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

    def __init__(self, session: KernelSession, transport: ClientTransport) -> None:
        self.session = session
        self._transport = transport
        self._displaced = False
        self._waiting: trio.CancelScope | None = None
        self._finished = trio.Event()

    async def run(self, stopping: trio.Event) -> None:
        """Serve the client until it leaves, is displaced, or the server stops."""
        try:
            with self.session.events.subscribe() as events:
                async with trio.open_nursery() as nursery:
                    events.sink = partial(self._send_now, nursery)
                    nursery.start_soon(self._forward_events, events, nursery.cancel_scope)
                    nursery.start_soon(self._forward_client_messages, nursery.cancel_scope)
                    nursery.start_soon(self._close_when, stopping, nursery.cancel_scope)
        finally:
            self._finished.set()

    def _send_now(self, nursery: trio.Nursery, events: list[Event]) -> bool:
        """The event log's fast path: new events written in the publisher's task, when the
        client is caught up and its socket takes them without waiting."""
        transport = self._transport
        # Checked before framing: a batch declined here is framed again by the forwarding task.
        if self._displaced or not transport.free:
            return False
        if not transport.send_now([encode_event(event) for event in events]):
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
            await self._transport.send_batch([encode_event(event) for event in batch])
        if self._displaced:
            reason = "another client connected to this session"
            logger.info("session %s: a channels client was displaced", self.session.session_id)
            await self._transport.send(kernel_event("clientDisconnected", reason))
            await self._transport.close(POLICY_VIOLATION, reason)
        else:
            await self._transport.close(GOING_AWAY, "the session was deleted")
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

    async def serve(self, session: KernelSession, transport: ClientTransport) -> None:
        session_id = session.session_id
        previous = self._clients.get(session_id)
        client = ChannelClient(session, transport)
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
