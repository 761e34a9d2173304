"""A channels connection: one WebSocket to a session, over any trio stream (trio-websocket).

`open_channels` speaks the WebSocket handshake over a stream the caller opened (TCP, a
session's Unix socket, or a stream with extra socket options), so the same connection serves
every transport. Per message it decodes the JSON once; `execute()` then looks at the parent
header only, so that a client's round trip costs about what its frames cost.

A connection opened with `resume` gets numbered frames: `last_seq` is the number of the last
event received, and a new connection with `resume=channels.resume_point` after a drop continues
right after it, so that nothing is lost and nothing comes twice.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, cast

import trio
import trio_websocket

from kallichore.client.errors import ApiError
from kallichore.client.events import (
    JSON,
    ChannelEvent,
    KernelMessage,
    decode_frame,
    execute_request,
    message,
)
from kallichore.client.execution import ExecuteResult, ExecutionTracker

# Large outputs arrive as large frames: a frame has to fit.
MAX_MESSAGE_BYTES = 128 * 2**20
RECEIVE_BUFFER_BYTES = 256 * 2**10
# Frames read ahead of the caller, so that the socket keeps flowing while it works.
MESSAGE_QUEUE = 1024
CLOSE_SECONDS = 1.0


class Channels:
    """A session's channels: send messages to its kernel, receive typed events."""

    def __init__(self, websocket: trio_websocket.WebSocketConnection) -> None:
        self.websocket = websocket
        # The seq of the last event received, on a connection that asked for numbered frames.
        self.last_seq: int | None = None

    @property
    def resume_point(self) -> int | Literal[True]:
        """What a new connection should `resume` from: after `last_seq`, or (before the first
        numbered frame) wherever the server would start any client."""
        return True if self.last_seq is None else self.last_seq

    def _decode(self, text: str | bytes) -> JSON:
        frame: JSON = json.loads(text)
        seq = frame.pop("seq", None)
        if seq is not None:
            self.last_seq = seq
        return frame

    async def receive_frame(self) -> JSON:
        """The next frame as the server sent it (decoded JSON; its `seq` goes to `last_seq`)."""
        return self._decode(await self.websocket.get_message())

    async def receive(self) -> ChannelEvent:
        """The next event: a `KernelMessage` or a `SupervisorEvent`.

        Raises `trio_websocket.ConnectionClosed` once the server closed the connection.
        """
        return decode_frame(self._decode(await self.websocket.get_message()))

    def __aiter__(self) -> Channels:
        return self

    async def __anext__(self) -> ChannelEvent:
        """Events until the server closes the connection."""
        try:
            return await self.receive()
        except trio_websocket.ConnectionClosed:
            raise StopAsyncIteration from None

    async def receive_until(self, done: Callable[[ChannelEvent], bool]) -> list[ChannelEvent]:
        """Events up to and including the first one for which `done` is true."""
        events = []
        while True:
            event = await self.receive()
            events.append(event)
            if done(event):
                return events

    async def send(self, frame: Mapping[str, Any]) -> str:
        """Send a message to the kernel (as built by `message()`); its msg_id."""
        await self.websocket.send_message(json.dumps(frame))
        return str(frame["header"]["msg_id"])

    async def request(
        self, msg_type: str, content: Mapping[str, Any], channel: str = "shell"
    ) -> KernelMessage:
        """Send a request and wait for its reply (events in between are passed over)."""
        msg_id = await self.send(message(msg_type, content, channel))
        while True:
            event = await self.receive()
            if (
                isinstance(event, KernelMessage)
                and event.channel == channel
                and event.parent_msg_id == msg_id
            ):
                return event

    async def execute(
        self, code: str, *, allow_stdin: bool = False, idle_timeout: float | None = None
    ) -> ExecuteResult:
        """Run `code`; returns once both its execute_reply and its iopub idle have arrived.

        With `idle_timeout`, once the reply is in, stop waiting for the idle after that many
        seconds without a message (for a kernel, or a server, that loses it). Raises
        `ApiError` if the server refused the request (e.g. no kernel is running).
        """
        started = time.perf_counter()
        msg_id = await self.send(execute_request(code, allow_stdin=allow_stdin))
        execution = ExecutionTracker(msg_id, started)
        await self.follow(execution, idle_timeout=idle_timeout)
        return execution.result()

    async def follow(
        self, execution: ExecutionTracker, *, idle_timeout: float | None = None
    ) -> None:
        """Feed `execution` the frames that arrive until it is done (see `execute`)."""
        get_message = self.websocket.get_message
        while not execution.done:
            quiet = math.inf
            if execution.reply is not None and idle_timeout is not None:
                quiet = idle_timeout
            with trio.move_on_after(quiet) as waiting:
                text = await get_message()
            if waiting.cancelled_caught:
                return
            execution.add(self._decode(text), time.perf_counter())


@asynccontextmanager
async def open_channels(
    stream: trio.abc.Stream,
    host: str,
    resource: str,
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
) -> AsyncIterator[Channels]:
    """A channels connection over `stream` (which it closes), asking for `resource`, offering
    `subprotocols` (the server's choice is `channels.websocket.subprotocol`).

    A refused handshake raises `ApiError` with the server's status and error object.
    """
    try:
        async with stream, trio.open_nursery() as nursery:
            websocket = await trio_websocket.wrap_client_stream(
                nursery,
                # (Declared for socket streams; any trio stream works.)
                cast(trio.SocketStream, stream),
                host,
                resource,
                extra_headers=[(k.encode(), v.encode()) for k, v in headers],
                subprotocols=list(subprotocols),
                message_queue_size=MESSAGE_QUEUE,
                max_message_size=MAX_MESSAGE_BYTES,
                receive_buffer_size=RECEIVE_BUFFER_BYTES,
            )
            try:
                yield Channels(websocket)
            finally:
                try:
                    with trio.move_on_after(CLOSE_SECONDS, shield=True):
                        await websocket.aclose()
                finally:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery only runs the WebSocket's reader, which fails only on a refused
        # handshake: any other error is the caller's own, and reaches the caller as raised.
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
        if isinstance(error, trio_websocket.ConnectionRejected):
            raise ApiError.from_body(error.status_code, error.body or b"") from None
        raise error from None
