"""Serving a channels client over trio-websocket, whichever listener accepted it.

Both the TCP front door and the per-session Unix sockets end here: a WebSocket connection is
adapted to the broker's `ClientTransport` and watched with Kallichore's pings (an 8-byte
counter every 10 s; more than 3 unanswered and the client is dropped).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from kallichore.channels.broker import ChannelBroker
from kallichore.session.kernel_session import KernelSession

logger = logging.getLogger(__name__)

PING_INTERVAL_SECONDS = 10.0
MAX_UNANSWERED_PINGS = 3
# How long we wait for the client's Close frame before closing the socket regardless.
CLOSE_TIMEOUT_SECONDS = 1.0
# The limit Kallichore's WebSocket library applies to a message (trio-websocket's is 1 MiB).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Larger batches go through the forwarding task, which can wait for the socket: written at
# once they would mostly fill it, and leave a copied tail and a task to finish the write.
DIRECT_WRITE_MAX_BYTES = 64 * 1024


async def serve_channel_client(
    broker: ChannelBroker,
    session: KernelSession,
    ws: WebSocketConnection,
    stream: ReplayStream,
    *,
    ping_interval: float = PING_INTERVAL_SECONDS,
) -> None:
    """Attach `ws` (over `stream`) to `session` until it leaves, is displaced, or stops answering
    pings; then close it (briefly waiting for the client's Close)."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _drop_if_unresponsive, ws, session.session_id, ping_interval, nursery
            )
            await broker.serve(session, WebSocketTransport(ws, stream))
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT_SECONDS):
            await ws.aclose()


async def _drop_if_unresponsive(
    ws: WebSocketConnection, session_id: str, interval: float, connection: trio.Nursery
) -> None:
    """Ping like Kallichore; cancel the connection once too many pings go unanswered.

    Each ping waits for its pong in its own task, so pings keep their pace whatever the
    client does; those waits end at the latest when this decides to drop the client.
    """
    sent = 0
    answered = 0

    async def ping(number: int) -> None:
        nonlocal answered
        try:
            await ws.ping(number.to_bytes(8, "big"))
        except ConnectionClosed:
            return  # the connection's own tasks notice and end it
        # trio-websocket wakes the earlier pings too when a pong arrives, so this only grows.
        answered = max(answered, number)

    async with trio.open_nursery() as pings:
        while True:
            await trio.sleep(interval)
            if sent - answered > MAX_UNANSWERED_PINGS:
                break
            sent += 1
            pings.start_soon(ping, sent)
        pings.cancel_scope.cancel()
    logger.info(
        "session %s: dropping a channels client that left %d pings unanswered",
        session_id,
        sent - answered,
    )
    connection.cancel_scope.cancel()


def text_frame_header(length: int) -> bytes:
    """The header of an unfragmented, unmasked (server to client) text frame (RFC 6455 5.2)."""
    if length < 126:
        return bytes((0x81, length))
    if length < 1 << 16:
        return bytes((0x81, 126)) + length.to_bytes(2, "big")
    return bytes((0x81, 127)) + length.to_bytes(8, "big")


def _no_check() -> None:
    pass


class WebSocketTransport:
    """`ClientTransport` over a trio-websocket connection on a `ReplayStream`.

    trio-websocket reads the client's frames and answers its control frames; the events going
    out are framed here, a whole batch written to the socket at once: one write and one wake-up
    of the client per batch instead of one per frame, and no round trip through str.

    Sending raises ConnectionClosed once the closing handshake has begun: it ends the broker's
    client, and the connection.
    """

    def __init__(self, ws: WebSocketConnection, stream: ReplayStream) -> None:
        self._ws = ws
        self._stream = stream

    async def send(self, frame: bytes) -> None:
        await self.send_batch([frame])

    async def send_batch(self, frames: list[bytes]) -> None:
        await self._stream.send_all_unless_closing(_framed(frames), self._raise_if_closing)

    def send_now(self, frames: list[bytes]) -> bool:
        if self._ws.closed is not None or sum(map(len, frames)) > DIRECT_WRITE_MAX_BYTES:
            return False
        return self._stream.write_now(_framed(frames))

    @property
    def owes(self) -> bool:
        return self._stream.owes

    async def flush(self) -> None:
        await self._stream.send_all_unless_closing(b"", self._raise_if_closing)

    def _raise_if_closing(self) -> None:
        # trio-websocket sets the reason before it writes its Close frame, and every write goes
        # through the same lock, so no data frame can follow a Close.
        if (reason := self._ws.closed) is not None:
            raise ConnectionClosed(reason)

    async def receive(self) -> str | None:
        while True:
            try:
                message = await self._ws.get_message()
            except ConnectionClosed:
                return None
            if isinstance(message, str):
                return message
            logger.info("ignoring a binary frame from a channels client")

    async def close(self, code: int, reason: str) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT_SECONDS):
            await self._ws.aclose(code, reason)


def _framed(frames: list[bytes]) -> bytes:
    parts: list[bytes] = []
    for frame in frames:
        parts.append(text_frame_header(len(frame)))
        parts.append(frame)
    return b"".join(parts)


class ReplayStream(trio.abc.Stream):
    """A socket stream that first gives back the bytes the protocol sniffing already read.

    Writes are serialised by one lock: trio-websocket's own (pongs, pings, Close) and the
    event batches `WebSocketTransport` frames itself, so frames never interleave. `write_now`
    is the fast path for a batch that can go out at once, without waiting and without a task
    switch; whatever part of it the socket does not take is written before any later write.

    Not a trio.SocketStream, so trio-websocket's `local`/`remote` fall back to repr() instead of
    raising the ValueError they raise for Unix socket addresses.
    """

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        self._writing = trio.StrictFIFOLock()
        # The unwritten tail of a `write_now`; the next holder of the lock writes it first.
        self._unwritten = b""

    def write_now(self, data: bytes) -> bool:
        """Write `data` now if no other write is under way: True if the socket took some of it
        (the rest is owed, see `owes`), False if nothing was written."""
        if self._writing.locked() or self._unwritten:
            return False
        # Looked up each time: a closed socket says -1, and its old number may be reused.
        fd = self._stream.socket.fileno()
        if fd < 0:
            return False
        try:
            sent = os.write(fd, data)
        except OSError:
            # Full (BlockingIOError) or broken: the ordinary path waits, or reports the error.
            return False
        self._unwritten = data[sent:]
        return True

    @property
    def owes(self) -> bool:
        """Whether part of a `write_now` is still to be written (by any later write)."""
        return bool(self._unwritten)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_all_unless_closing(data, _no_check)

    async def send_all_unless_closing(
        self, data: bytes | bytearray | memoryview, check: Callable[[], None]
    ) -> None:
        """Write `data` unless `check`, called once no other write is under way, raises."""
        try:
            # The lock is nearly always free: taking it without a schedule point saves one
            # pass of the event loop per write (the write itself still yields).
            self._writing.acquire_nowait()
        except trio.WouldBlock:
            await self._writing.acquire()
        try:
            check()
            if self._unwritten:
                unwritten, self._unwritten = self._unwritten, b""
                await self._stream.send_all(unwritten)
            if data:
                await self._stream.send_all(data)
        finally:
            self._writing.release()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._prefix:
            return await self._stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._prefix) if max_bytes is None else max_bytes
        chunk, self._prefix = self._prefix[:size], self._prefix[size:]
        return chunk

    async def aclose(self) -> None:
        self._prefix = b""
        await self._stream.aclose()
