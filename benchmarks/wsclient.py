"""One WebSocket client for every server: trio-websocket over a TCP or Unix stream.

Kallichore's channel envelope and the Jupyter servers' legacy JSON protocol share the frame
shape this client needs (`header`, `parent_header`, `channel`, `content`), so the same code
sends the same frames to all of them and decodes what comes back the same way. The
`quickack` variant sets TCP_QUICKACK on its socket before every read, which is what removes
the ~40 ms delayed-ACK stall of the tornado-based servers.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import trio
import trio_websocket

from benchmarks.environment import log

# Generous: a 64 MiB stream arrives in messages of a few hundred KiB, but a frame must fit.
MAX_MESSAGE_BYTES = 128 * 2**20
RECEIVE_BUFFER_BYTES = 256 * 2**10
MESSAGE_QUEUE = 1024
TIMEOUT = 120.0
# Once the execute_reply is in, this long without a message for the request means the rest
# (the idle included) was lost on the way: a server that drops messages under load.
QUIET_SECONDS = 2.0
CLIENT_SESSION = uuid.uuid4().hex


@dataclass(frozen=True)
class Execution:
    """One execute_request, from sending it until its execute_reply and iopub idle arrived
    (or, if the idle never came, until the last message that did)."""

    seconds: float
    # iopub messages whose parent is the request (status busy/idle and execute_input included).
    iopub_messages: int
    # Characters of stream output received (ASCII in the workloads, so bytes).
    stream_bytes: int
    # Whether the iopub idle arrived (False: the server lost it, with whatever else).
    complete: bool = True


class Tally:
    """Follows the replies to one request: counts its iopub messages and stream output.

    Start it just before sending the request.
    """

    def __init__(self) -> None:
        self.msg_id = ""
        self.started = time.perf_counter()
        self.last = self.started
        self.replied = False
        self.idle = False
        self.iopub_messages = 0
        self.stream_bytes = 0

    @property
    def done(self) -> bool:
        return self.replied and self.idle

    def add(self, channel: str | None, msg_type: str, content: Any) -> None:
        self.last = time.perf_counter()
        if channel == "iopub":
            self.iopub_messages += 1
            if msg_type == "stream":
                self.stream_bytes += len(content["text"])
            elif msg_type == "status" and content["execution_state"] == "idle":
                self.idle = True
        elif msg_type.endswith("_reply"):
            self.replied = True

    def result(self) -> Execution:
        return Execution(
            self.last - self.started, self.iopub_messages, self.stream_bytes, self.idle
        )


def request(msg_type: str, content: dict[str, Any], channel: str = "shell") -> dict[str, Any]:
    """A client frame with a full header, as Positron and JupyterLab send them."""
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": CLIENT_SESSION,
            "username": "bench",
            "date": datetime.now(UTC).isoformat(),
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": channel,
        "buffers": [],
    }


def execute_request(code: str) -> dict[str, Any]:
    return request(
        "execute_request",
        {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
    )


class QuickAckStream(trio.abc.Stream):
    """A TCP stream that asks for an immediate ACK (TCP_QUICKACK) before every read.

    Linux clears the flag by itself, so it has to be set again each time.
    """

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.socket = inner.socket

    def _quickack(self) -> None:
        # (The reader task may call once more after the connection was closed.)
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self._quickack()
        data = await self.inner.receive_some(max_bytes)
        self._quickack()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class Channels:
    """A channels WebSocket of one kernel, through whichever server."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, done: trio.Event) -> None:
        self.ws = ws
        self._done = done

    @classmethod
    async def connect_tcp(
        cls,
        nursery: trio.Nursery,
        port: int,
        resource: str,
        *,
        quickack: bool = False,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> Channels:
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if quickack:
            stream = QuickAckStream(cast(trio.SocketStream, stream))
        return await cls._wrap(nursery, stream, f"127.0.0.1:{port}", resource, headers)

    @classmethod
    async def connect_unix(
        cls,
        nursery: trio.Nursery,
        path: str,
        resource: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> Channels:
        stream = await trio.open_unix_socket(path)
        return await cls._wrap(nursery, stream, "localhost", resource, headers)

    @classmethod
    async def _wrap(
        cls,
        nursery: trio.Nursery,
        stream: trio.abc.Stream,
        host: str,
        resource: str,
        headers: list[tuple[bytes, bytes]] | None,
    ) -> Channels:
        done = trio.Event()
        started = False

        async def hold(*, task_status: trio.TaskStatus[trio_websocket.WebSocketConnection]) -> None:
            """Own the connection's reader task, so that its failure ends this connection
            (later calls see ConnectionClosed) rather than the whole run."""
            try:
                async with trio.open_nursery() as own:
                    with trio.fail_after(TIMEOUT):
                        ws = await trio_websocket.wrap_client_stream(
                            own,
                            cast(trio.SocketStream, stream),
                            host,
                            resource,
                            extra_headers=headers or [],
                            message_queue_size=MESSAGE_QUEUE,
                            max_message_size=MAX_MESSAGE_BYTES,
                            receive_buffer_size=RECEIVE_BUFFER_BYTES,
                        )
                    task_status.started(ws)
                    nonlocal started
                    started = True
                    await done.wait()
                    own.cancel_scope.cancel()
            except* Exception as group:
                if not started:
                    raise
                log(f"a WebSocket to {resource} failed: {group.exceptions[0]!r}")
                with contextlib.suppress(Exception):
                    await stream.aclose()

        ws: trio_websocket.WebSocketConnection = await nursery.start(hold)
        return cls(ws, done)

    async def send(self, frame: dict[str, Any]) -> str:
        await self.ws.send_message(json.dumps(frame))
        return str(frame["header"]["msg_id"])

    async def _follow(self, tally: Tally) -> None:
        with trio.fail_after(TIMEOUT):
            while not tally.done:
                text = None
                with trio.move_on_after(QUIET_SECONDS if tally.replied else TIMEOUT):
                    text = await self.ws.get_message()
                if text is None:
                    return
                frame = json.loads(text)
                parent = frame.get("parent_header")
                if parent and parent.get("msg_id") == tally.msg_id:
                    header = frame["header"]
                    tally.add(frame.get("channel"), header["msg_type"], frame["content"])

    async def execute(self, code: str) -> Execution:
        tally = Tally()
        tally.msg_id = await self.send(execute_request(code))
        await self._follow(tally)
        return tally.result()

    async def kernel_info(self) -> None:
        """Ask for kernel_info and wait for the reply."""
        tally = Tally()
        tally.msg_id = await self.send(request("kernel_info_request", {}))
        with trio.fail_after(TIMEOUT):
            while not tally.replied:
                frame = json.loads(await self.ws.get_message())
                parent = frame.get("parent_header")
                if parent and parent.get("msg_id") == tally.msg_id:
                    tally.add(frame.get("channel"), frame["header"]["msg_type"], frame["content"])

    async def aclose(self) -> None:
        # (Quick, unless the run is being torn down and the reader task is gone.)
        with trio.move_on_after(1):
            await self.ws.aclose()
        self._done.set()
