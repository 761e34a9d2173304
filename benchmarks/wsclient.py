"""The benchmark's side of the channels: what one execution measured, and a connection that
outlives the task that opened it.

Every WebSocket configuration goes through kallichore.client's channels connection: Kallichore's
envelope and the Jupyter servers' legacy JSON protocol share the frame shape it reads (frames
without `kind` are kernel messages), so the same code sends the same frames to all of them and
decodes what comes back the same way. What is left here is the benchmark's own: the record of
one execution, a tally that counts an execution's output instead of keeping it (for every
configuration alike), TCP_QUICKACK for the tornado-based servers, which removes their
~40 ms delayed-ACK stall, and the Jupyter servers' v1 subprotocol (binary frames) decoded to
that same frame shape.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import trio

from benchmarks.environment import log
from kallichore.channels.jupyter_framing import pack_v1, unpack_v1
from kallichore.client import Channels, ExecutionTracker, execute_request

# Once the execute_reply is in, this long without a message means the rest (the idle included)
# was lost on the way: a server that drops messages under load.
QUIET_SECONDS = 2.0
TIMEOUT = 120.0


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


class Counting(ExecutionTracker):
    """An execution followed by kallichore.client that counts what its result needs instead of
    keeping every frame (as the floor's tally does: the client's cost must not grow with the
    output)."""

    def __init__(self, msg_id: str, started: float) -> None:
        super().__init__(msg_id, started)
        self.tally = Tally()

    def keep(self, frame: dict[str, Any], own: bool) -> None:
        if own:
            self.tally.add(frame["channel"], frame["header"]["msg_type"], frame["content"])

    def measured(self) -> Execution:
        tally = self.tally
        return Execution(
            self.last - self.started, tally.iopub_messages, tally.stream_bytes, self.idle
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


def v1_message(frame: bytes) -> dict[str, Any]:
    """A v1 frame as the legacy JSON frame's dict (buffers as bytes). The four JSON parts are
    parsed in one `json.loads` (four cost twice as much): the client's cost per frame is part
    of what the throughput workload measures."""
    channel, header, parent, metadata, content, *buffers = unpack_v1(frame)
    parts = (b'{"header":', header, b',"parent_header":', parent, b',"metadata":', metadata)
    message: dict[str, Any] = json.loads(b"".join((*parts, b',"content":', content, b"}")))
    message["channel"] = channel.decode()
    message["buffers"] = buffers
    return message


class V1Channels(Channels):
    """A channels connection speaking the v1 subprotocol (`v1.kernel.websocket.jupyter.org`, as
    JupyterLab does): binary frames, each decoded into the legacy JSON frame's shape so the
    same tallies read them. Decoding parses what the legacy JSON holds: a like-for-like cost."""

    def _decode(self, frame: str | bytes) -> dict[str, Any]:
        assert isinstance(frame, bytes), "a v1 server sends binary frames"
        return v1_message(frame)

    async def send(self, frame: Mapping[str, Any]) -> str:
        parts = [frame["channel"].encode()]
        parts += [json.dumps(frame[k]).encode() for k in ("header", "parent_header", "metadata")]
        parts += [json.dumps(frame["content"]).encode()]
        await self.websocket.send_message(pack_v1(parts))
        return str(frame["header"]["msg_id"])


class Connection:
    """A channels connection held open by a task of the run's nursery until `aclose()`.

    Sessions are opened and closed by different tasks; and a connection that fails after it
    was opened ends itself (later calls see it closed) rather than the whole run.
    """

    def __init__(self, channels: Channels, done: trio.Event, closed: trio.Event) -> None:
        self.channels = channels
        self._done = done
        self._closed = closed

    @classmethod
    async def open(
        cls, nursery: trio.Nursery, connect: Callable[[], AbstractAsyncContextManager[Channels]]
    ) -> Connection:
        done = trio.Event()
        closed = trio.Event()

        async def hold(*, task_status: trio.TaskStatus[Channels]) -> None:
            started = False
            try:
                async with connect() as channels:
                    task_status.started(channels)
                    started = True
                    await done.wait()
            except Exception as error:
                if not started:
                    raise
                log(f"a WebSocket failed: {error!r}")
            finally:
                closed.set()

        channels: Channels = await nursery.start(hold)
        return cls(channels, done, closed)

    async def execute(self, code: str) -> Execution:
        started = time.perf_counter()
        msg_id = await self.channels.send(execute_request(code))
        execution = Counting(msg_id, started)
        with trio.fail_after(TIMEOUT):
            await self.channels.follow(execution, idle_timeout=QUIET_SECONDS)
        return execution.measured()

    async def kernel_info(self) -> None:
        """Ask for kernel_info and wait for the reply."""
        with trio.fail_after(TIMEOUT):
            await self.channels.request("kernel_info_request", {})

    async def aclose(self) -> None:
        self._done.set()
        await self._closed.wait()
