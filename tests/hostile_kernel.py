"""A kernel that answers just enough to be adopted, then sends whatever a test tells it to.

The kernel is the hostile party in these tests, so a fake one is fair: what is under test is
the supervisor's real receive path (its ZeroMQ sockets, `kallichore.jupyter.wire`, the
session's pumps), reached over real loopback TCP sockets. The kernel binds the ports that the
session's `connection_info` hands out and the session adopts it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import zmq

from kallichore.client import Channels, KallichoreClient, KernelExited, message
from kallichore.jupyter.connection import ConnectionInfo
from kallichore.jupyter.wire import Channel, Message, WireError, deserialize, serialize
from kallichore.trio_zmq import TrioSocket
from tests.conftest import TIMEOUT, new_session_body, served_client, stream_text

KERNEL_INFO = {
    "status": "ok",
    "protocol_version": "5.3",
    "implementation": "hostile",
    "implementation_version": "0",
    "language_info": {"name": "python", "version": "3", "file_extension": ".py"},
    "banner": "",
}


class HostileKernel:
    """The kernel's five bound sockets and what it has learnt of its peer."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], info: ConnectionInfo) -> None:
        self.signer = info.signer()
        kinds = {
            Channel.SHELL: zmq.ROUTER,
            Channel.CONTROL: zmq.ROUTER,
            Channel.STDIN: zmq.ROUTER,
            Channel.IOPUB: zmq.PUB,
            Channel.HEARTBEAT: zmq.REP,
        }
        self.sockets: dict[Channel, TrioSocket] = {}
        for channel, kind in kinds.items():
            sock = context.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(info.address(channel))
            self.sockets[channel] = TrioSocket(sock)
        # The supervisor's shell identity, learnt from its first request.
        self.peer: bytes | None = None
        # Shell requests other than kernel_info (and kernel_info too while `hold_kernel_info`),
        # for the test to answer (or not).
        self.hold_kernel_info = False
        self._held_send, self.held = trio.open_memory_channel[tuple[list[bytes], Message]](math.inf)

    async def serve(self) -> None:
        """Answer kernel_info and shutdown requests (shell and control) and heartbeats until
        cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._answer, Channel.SHELL)
            nursery.start_soon(self._answer, Channel.CONTROL)
            nursery.start_soon(self._echo_heartbeat)

    async def _answer(self, channel: Channel) -> None:
        sock = self.sockets[channel]
        while True:
            frames = await sock.recv_multipart()
            try:
                identities, request = deserialize(frames, self.signer)
            except WireError:
                continue
            if channel is Channel.SHELL:
                self.peer = identities[0]
            if request.msg_type == "kernel_info_request" and not (
                channel is Channel.SHELL and self.hold_kernel_info
            ):
                await self.answer_kernel_info(channel, identities, request)
            elif request.msg_type == "shutdown_request":
                await self.reply(channel, identities, request, "shutdown_reply", request.content)
            elif channel is Channel.SHELL:
                self._held_send.send_nowait((identities, request))

    async def _echo_heartbeat(self) -> None:
        sock = self.sockets[Channel.HEARTBEAT]
        while True:
            await sock.send_multipart(await sock.recv_multipart())

    async def reply(
        self,
        channel: Channel,
        identities: Sequence[bytes],
        request: Message,
        msg_type: str,
        content: Mapping[str, Any],
    ) -> None:
        reply = Message.build(msg_type, content, session="hostile", parent=request.header)
        await self.send_raw(channel, serialize(reply, self.signer, identities))

    async def send_raw(self, channel: Channel, frames: Sequence[bytes]) -> None:
        """Frames as they are, on `channel` (shell and control need the peer's identity first)."""
        await self.sockets[channel].send_multipart(frames)

    async def answer_kernel_info(
        self, channel: Channel, identities: Sequence[bytes], request: Message
    ) -> None:
        await self.reply(channel, identities, request, "kernel_info_reply", KERNEL_INFO)
        # As a real kernel does, and how the supervisor learns its iopub is live.
        for state in ("busy", "idle"):
            await self.publish_status(request, state)

    async def publish_status(self, parent: Message, state: str) -> None:
        """The kernel's `busy` or `idle` for `parent`, on iopub."""
        status = Message.build(
            "status", {"execution_state": state}, session="hostile", parent=parent.header
        )
        await self.send_raw(Channel.IOPUB, serialize(status, self.signer))

    async def publish_stream(self, text: str) -> None:
        """A well-formed, correctly signed `stream` message on iopub."""
        message = Message.build("stream", {"name": "stdout", "text": text}, session="hostile")
        await self.send_raw(Channel.IOPUB, serialize(message, self.signer))

    async def published(self, channels: Channels, text: str, timeout: float = TIMEOUT) -> bool:
        """Publish `text` until the client sees it: true once it has, false after `timeout`.

        Publishing again covers ZeroMQ's slow joiner (a SUB's subscription takes a moment to
        reach the PUB, which drops what it has no subscriber for).
        """
        with trio.move_on_after(timeout):
            while True:
                await self.publish_stream(text)
                with trio.move_on_after(0.2):
                    while True:
                        frame = await channels.receive_frame()
                        if text in stream_text([frame]):
                            return True
        return False


@asynccontextmanager
async def adopted_hostile_kernel(
    client: KallichoreClient, session_id: str = "hostile"
) -> AsyncIterator[HostileKernel]:
    """A session of `client`'s server that has adopted a `HostileKernel`."""
    await client.create_session(**new_session_body(session_id, argv=[]))
    info = await client.connection_info(session_id)
    # Destroyed whatever happens, the kernel's sockets with it: a context left to the garbage
    # collector waits for ever on what its sockets still hold.
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    context.setsockopt(zmq.LINGER, 0)
    try:
        kernel = HostileKernel(context, info)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.serve)
            await client.adopt(session_id, info)
            yield kernel
            await shut_down(client, session_id)
            nursery.cancel_scope.cancel()
    finally:
        context.destroy(linger=0)


async def shut_down(client: KallichoreClient, session_id: str) -> None:
    """Ask the adopted kernel to shut down, as a frontend does, so that the supervisor need
    not wait out its grace period for a kernel that is gone."""
    with trio.move_on_after(10):
        async with client.channels(session_id) as channels:
            await channels.send(message("shutdown_request", {"restart": False}, "control"))
            async for event in channels:
                if isinstance(event, KernelExited):
                    return


@asynccontextmanager
async def served_hostile_kernel(
    runtime_dir: Path,
) -> AsyncIterator[tuple[KallichoreClient, int, HostileKernel]]:
    """A server of its own (see `served_client`), a client of it, the port it listens on, and
    a session `hostile` that has adopted a `HostileKernel`."""
    async with (
        served_client(runtime_dir) as (client, server),
        adopted_hostile_kernel(client) as kernel,
    ):
        yield client, server.port, kernel
