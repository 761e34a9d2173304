"""The channels WebSocket: wsproto's connection state, driven by a thin trio shell.

wsproto is the protocol: it completes the handshake of a request h11 has parsed, parses what
the client sends (text messages, pings, pongs, Close) and builds our control frames. The shell,
`WebSocket`, owns the socket: it reads bytes into wsproto, and it is the only writer, through one
lock of its own, so frames never interleave. It also pings like Kallichore (an 8-byte big-endian
counter every 10 s; more than 3 unanswered and the client is dropped). A ping is written after
every frame before it, and TCP keeps the order: the pong proves that the client's WebSocket
read all of them, and is the acknowledgement the event log keeps its replay window by.

The events going to the client are the one thing framed here rather than by wsproto: wsproto
frames a text message from a `str`, and ours are UTF-8 bytes already. Decoding them for wsproto
to encode again costs ~9 us a frame instead of ~1 (and 4 ms instead of 0.1 for a 1 MB message),
on every frame of the hot path. A server's data frame, unfragmented and without extensions (we
negotiate none), is a 2-to-10-byte header and the payload (RFC 6455 5.2); `data_frames` writes
it, and only while wsproto says the connection is open. Frames are text, except those marked
`Binary` (the Jupyter channels' framing); binary messages from the client are read only on a
connection accepted with `binary=True`, and ignored on the others.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Sequence

import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import H11Handshake

from kallichore.channels.broker import ChannelBroker
from kallichore.channels.jupyter_framing import Binary, Frame
from kallichore.channels.kallichore_framing import Resume
from kallichore.session.kernel_session import KernelSession

logger = logging.getLogger(__name__)

PING_INTERVAL_SECONDS = 10.0
MAX_UNANSWERED_PINGS = 3
# How long we wait for the client's Close frame before closing the socket regardless.
CLOSE_TIMEOUT_SECONDS = 1.0
# The limit Kallichore's WebSocket library applies to a message.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Larger batches go through the forwarding task, which can wait for the socket: written at
# once they would mostly fill it, and leave a copied tail and a task to finish the write.
DIRECT_WRITE_MAX_BYTES = 64 * 1024
RECEIVE_BYTES = 64 * 1024
# A larger batch is written in slices of whole frames about this long, each under the lock of
# its own: a pong waiting for the socket goes out after the slice being written, not behind the
# whole batch (a client that reads slowly, as a loaded one does, sees its keepalive answered).
WRITE_SLICE_BYTES = 64 * 1024


class ConnectionClosed(Exception):
    """The WebSocket is closing or closed: no more messages can be sent on it."""


def handshake_for(request: h11.Request) -> H11Handshake:
    """wsproto's server handshake for a request h11 has parsed.

    Raises `wsproto.utilities.RemoteProtocolError` if it is not a valid WebSocket upgrade.
    """
    handshake = H11Handshake(ConnectionType.SERVER)
    handshake.initiate_upgrade_connection(list(request.headers), request.target)
    return handshake


async def accept(
    stream: trio.SocketStream,
    handshake: H11Handshake,
    received: bytes,
    *,
    subprotocol: str | None = None,
    binary: bool = False,
) -> WebSocket:
    """Answer the upgrade (no extension negotiated; `subprotocol` if given); `received` is what
    the client sent after its request head, which may already hold WebSocket frames. With
    `binary`, the client's binary messages are read too."""
    await stream.send_all(handshake.send(AcceptConnection(subprotocol=subprotocol)))
    connection = handshake.connection
    assert connection is not None  # accepted
    return WebSocket(stream, connection, received, binary=binary)


def data_frames(frames: Sequence[Frame]) -> bytes:
    """Unfragmented, unmasked (server to client) frames: text around UTF-8 payloads, binary
    around `Binary` ones."""
    parts: list[bytes] = []
    for frame in frames:
        if type(frame) is Binary:
            payload, first = frame.payload, 0x82
        else:
            payload, first = frame, 0x81  # type: ignore[assignment]
        length = len(payload)
        if length < 126:
            parts.append(bytes((first, length)))
        elif length < 1 << 16:
            parts.append(bytes((first, 126)) + length.to_bytes(2, "big"))
        else:
            parts.append(bytes((first, 127)) + length.to_bytes(8, "big"))
        parts.append(payload)
    return b"".join(parts)


def _slices(frames: Sequence[Frame]) -> list[Sequence[Frame]]:
    """`frames` in runs of about WRITE_SLICE_BYTES (at least one frame each)."""
    parts: list[Sequence[Frame]] = []
    start = size = 0
    for index, frame in enumerate(frames):
        size += len(frame)
        if size >= WRITE_SLICE_BYTES:
            parts.append(frames[start : index + 1])
            start, size = index + 1, 0
    if start < len(frames):
        parts.append(frames[start:])
    return parts


class WebSocket:
    """The server end of one WebSocket: the socket, wsproto's state, and the only writer.

    Implements the broker's `ClientTransport`. Reading happens in `receive` (the broker's
    task for client messages), which also answers pings and the client's Close.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        connection: Connection,
        received: bytes,
        *,
        binary: bool = False,
    ) -> None:
        self._stream = stream
        self._binary = binary
        self._connection = connection
        self._writing = trio.StrictFIFOLock()
        # The unwritten tail of a `send_now`; the next holder of the lock writes it first.
        self._unwritten = b""
        # A write was interrupted, maybe mid-frame: nothing more may be written.
        self._broken = False
        self._messages: deque[str | bytes | None] = deque()
        self._fragments: list[str | bytes | bytearray] = []
        self._fragments_size = 0
        # The highest ping counter the client has answered.
        self._answered = 0
        # The pings not answered yet, each with the seq of the last event written before it.
        self._pings: deque[tuple[int, int]] = deque()
        self._sent_through = 0
        self.on_acknowledged: Callable[[int], None] | None = None
        self.closed_cleanly = False
        if received:
            connection.receive_data(received)

    # -- to the client -------------------------------------------------------------------------

    @property
    def sent_through(self) -> int:
        """The seq of the last event whose frame was written whole (or is owed)."""
        return self._sent_through

    async def send(self, frame: bytes) -> None:
        await self.send_batch([frame])

    async def send_batch(self, frames: Sequence[Frame], through: int | None = None) -> None:
        """Write `frames` in one write; raises ConnectionClosed once closing.

        `through`: the seq of the last event among them, once they are written."""
        if len(frames) > 1 and sum(map(len, frames)) > WRITE_SLICE_BYTES:
            for part in _slices(frames):
                await self._write(data_frames(part))
        else:
            await self._write(data_frames(frames))
        if through is not None:
            self._sent_through = through

    @property
    def free(self) -> bool:
        return not (
            self._writing.locked()
            or self._unwritten
            or self._broken
            or self._connection.state is not ConnectionState.OPEN
        )

    def send_now(self, frames: Sequence[Frame], through: int) -> bool:
        """Write the frames at once if nothing else is being written, without waiting.

        False if nothing was written. True if the socket took the frames, or part of them:
        then `owes` is true until a later write or `flush` has written the rest.
        """
        if not self.free or sum(map(len, frames)) > DIRECT_WRITE_MAX_BYTES:
            return False
        # Looked up each time: a closed socket says -1, and its old number may be reused.
        fd = self._stream.socket.fileno()
        if fd < 0:
            return False
        data = data_frames(frames)
        try:
            sent = os.write(fd, data)
        except OSError:
            # Full (BlockingIOError) or broken: the ordinary path waits, or reports the error.
            return False
        self._unwritten = data[sent:]
        # What is owed goes out before anything else: a later ping still follows it.
        self._sent_through = through
        return True

    @property
    def owes(self) -> bool:
        """Whether part of a `send_now` is still to be written (by any later write)."""
        return bool(self._unwritten)

    async def flush(self) -> None:
        """Write what `send_now` could not."""
        await self._write(b"")

    async def close(self, code: int, reason: str | None) -> None:
        """Start the closing handshake (or answer the client's); `aclose` completes it."""
        if self._connection.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            await self._send_event(CloseConnection(code, reason))

    async def _send_event(self, event: Event) -> None:
        """A control frame from wsproto, built once the lock is ours so that it goes out in
        the order of the connection's state (no data after our Close)."""
        async with self._writing:
            state = self._connection.state
            if self._broken or state is ConnectionState.CLOSED:
                return
            if state is not ConnectionState.OPEN and not isinstance(event, CloseConnection):
                return  # a ping or pong that crossed a Close: nothing but a Close goes out now
            if isinstance(event, CloseConnection) and state is ConnectionState.LOCAL_CLOSING:
                return  # our Close is out already
            if isinstance(event, Ping):
                counter = int.from_bytes(event.payload, "big")
                self._pings.append((counter, self._sent_through))
            await self._write_locked(self._connection.send(event))

    async def _write(self, data: bytes) -> None:
        # The lock is nearly always free: taking it without a schedule point saves one pass
        # of the event loop per write (the write itself still yields).
        try:
            self._writing.acquire_nowait()
        except trio.WouldBlock:
            await self._writing.acquire()
        try:
            if self._broken or self._connection.state is not ConnectionState.OPEN:
                raise ConnectionClosed
            await self._write_locked(data)
        finally:
            self._writing.release()

    async def _write_locked(self, data: bytes) -> None:
        try:
            if self._unwritten:
                unwritten, self._unwritten = self._unwritten, b""
                await self._stream.send_all(unwritten)
            if data:
                await self._stream.send_all(data)
        except BaseException:
            self._broken = True
            raise

    # -- from the client -----------------------------------------------------------------------

    async def receive(self) -> str | None:
        """The next text message; None once the connection is closing or closed."""
        message = await self.receive_message()
        assert not isinstance(message, bytes), "binary messages are read only with `binary`"
        return message

    async def receive_message(self) -> str | bytes | None:
        """The next message (bytes: a binary one); None once the connection is closing or
        closed."""
        while not self._messages:
            if self._connection.state is ConnectionState.CLOSED:
                return None
            data = await self._stream.receive_some(RECEIVE_BYTES)
            self._connection.receive_data(data or None)  # None: the client hung up
            await self._handle_events()
        return self._messages.popleft()

    async def _handle_events(self) -> None:
        for event in self._connection.events():
            match event:
                case TextMessage(data=text):
                    if not await self._add_fragment(
                        text, len(text) if text.isascii() else len(text.encode())
                    ):
                        return
                    if event.message_finished:
                        self._messages.append("".join(self._fragments))  # type: ignore[arg-type]
                        self._fragments.clear()
                        self._fragments_size = 0
                case BytesMessage(data=data) if self._binary:
                    if not await self._add_fragment(data, len(data)):
                        return
                    if event.message_finished:
                        self._messages.append(b"".join(self._fragments))  # type: ignore[arg-type]
                        self._fragments.clear()
                        self._fragments_size = 0
                case BytesMessage(message_finished=True):
                    logger.info("ignoring a binary message from a channels client")
                case Ping():
                    await self._send_event(event.response())
                case Pong(payload=payload):
                    self._answered = max(self._answered, int.from_bytes(payload[:8], "big"))
                    self._acknowledge()
                case CloseConnection():
                    # The client's Close (or its answer to ours), a parse error, or a hang-up:
                    # only a Close frame moves the state on, and a hang-up reads 1006.
                    if (
                        self._connection.state is not ConnectionState.OPEN
                        and event.code != CloseReason.ABNORMAL_CLOSURE
                    ):
                        self.closed_cleanly = True
                    await self.close(event.code, event.reason)
                    self._messages.append(None)
                    return

    async def _add_fragment(self, data: str | bytes | bytearray, size: int) -> bool:
        """Keep part of a message; False (and the connection closing) if it is too big."""
        self._fragments.append(data)
        self._fragments_size += size
        if self._fragments_size > MAX_MESSAGE_BYTES:
            await self.close(CloseReason.MESSAGE_TOO_BIG, "message too big")
            self._messages.append(None)
            return False
        return True

    def _acknowledge(self) -> None:
        """Tell `on_acknowledged` what the answered pings prove the client read."""
        through = None
        while self._pings and self._pings[0][0] <= self._answered:
            through = self._pings.popleft()[1]
        if through is not None and self.on_acknowledged is not None:
            self.on_acknowledged(through)

    # -- liveness and the end --------------------------------------------------------------------

    async def ping_until_unanswered(self, interval: float) -> None:
        """Ping every `interval`; return once more than MAX_UNANSWERED_PINGS are unanswered.

        Each ping is written by a task of its own, so a socket that takes nothing (a client
        that stopped reading) delays no ping: the count grows and the client is dropped.
        """
        sent = 0
        async with trio.open_nursery() as pings:
            while True:
                await trio.sleep(interval)
                if sent - self._answered > MAX_UNANSWERED_PINGS:
                    break
                sent += 1
                pings.start_soon(self._send_event, Ping(sent.to_bytes(8, "big")))
            pings.cancel_scope.cancel()

    async def aclose(self) -> None:
        """Close (1000 unless a close has begun), wait briefly for the client's Close, and
        close the socket."""
        try:
            with trio.move_on_after(CLOSE_TIMEOUT_SECONDS):
                await self.close(CloseReason.NORMAL_CLOSURE, "")
                while self._connection.state is ConnectionState.LOCAL_CLOSING:
                    data = await self._stream.receive_some(RECEIVE_BYTES)
                    self._connection.receive_data(data or None)
                    for _ in self._connection.events():
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(self._stream)


async def serve_channels(
    broker: ChannelBroker,
    session: KernelSession,
    websocket: WebSocket,
    *,
    resume: Resume | None = None,
    ping_interval: float = PING_INTERVAL_SECONDS,
) -> None:
    """Attach `websocket` to `session` until it leaves, is displaced, or stops answering pings;
    then close it. A client that went away ends only its own connection."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drop_if_unresponsive, websocket, session, ping_interval, nursery)
            await broker.serve(session, websocket, resume)
            nursery.cancel_scope.cancel()
    except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
        logger.info("session %s: a channels client went away", session.session_id)
    finally:
        await websocket.aclose()


async def _drop_if_unresponsive(
    websocket: WebSocket, session: KernelSession, interval: float, connection: trio.Nursery
) -> None:
    await websocket.ping_until_unanswered(interval)
    logger.info(
        "session %s: dropping a channels client that left %d pings unanswered",
        session.session_id,
        MAX_UNANSWERED_PINGS + 1,
    )
    connection.cancel_scope.cancel()
