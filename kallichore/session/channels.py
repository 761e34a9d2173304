"""The ZeroMQ sockets that connect the supervisor to one kernel.

shell, control and stdin are DEALERs that share one identity, so the kernel's stdin ROUTER can
address `input_request`s to the client whose shell request asked for input. iopub is a SUB
subscribed to everything; the heartbeat is a REQ that may resend after a missed reply.

stdin is connected only once the kernel has answered on shell: ipykernel 7 never routes an
`input_request` to a stdin DEALER that connected before its sockets were all set up (measured:
an early connection gets nothing, the same connection made after kernel_info works). And the
kernel is ready only once that connection's ZeroMQ handshake is done: the kernel's stdin ROUTER
drops an `input_request` for a peer it does not know yet, so code asking for input right after
start would wait forever (1 in 10 starts on a busy 2-core machine).
"""

from __future__ import annotations

from types import TracebackType

import trio
import zmq

from kallichore.jupyter.connection import ConnectionInfo, CurveKeys
from kallichore.jupyter.wire import (
    Channel,
    Message,
    Signer,
    check_spliceable,
    deserialize,
    serialize,
)
from kallichore.session.events import DEFAULT_MAX_BYTES, EVENT_OVERHEAD_BYTES
from kallichore.trio_zmq import TrioSocket

# The kernel's iopub PUB silently drops what it cannot hand on once this queue is full (and its
# own, ZeroMQ's default of 1,000 messages): ZeroMQ's thread fills it while the event loop is busy.
# At 10,000 a burst the event log would have taken was lost unannounced (with the loop held up,
# 10,006 of 25,000; docs/benchmarks.md, "The Jupyter channels"). It holds as many small
# messages as the event log's byte bound does, so that bound, which announces what it drops, is
# the one that decides; a runaway kernel is still held to that many messages here.
IOPUB_QUEUE_MESSAGES = DEFAULT_MAX_BYTES // EVENT_OVERHEAD_BYTES


class KernelChannels:
    """One kernel's sockets, connected (ZeroMQ connects lazily, so this never blocks)."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], info: ConnectionInfo, identity: bytes
    ) -> None:
        self.signer: Signer = info.signer()
        self._context = context
        self._info = info
        self._identity = identity
        # Ours as a CurveZMQ client of an encrypting kernel: a fresh pair (the kernel accepts
        # any client key; the messages' HMAC is what authenticates us).
        self._client_keys = None if info.curve is None else CurveKeys.new()
        self._sockets: dict[Channel, TrioSocket] = {}
        try:
            for channel in (Channel.SHELL, Channel.CONTROL):
                self._sockets[channel] = self._open(zmq.DEALER, info.address(channel), identity)
            iopub = self._open(zmq.SUB, info.address(Channel.IOPUB))
            iopub.socket.setsockopt(zmq.SUBSCRIBE, b"")
            self._sockets[Channel.IOPUB] = iopub
            heartbeat = self._open(zmq.REQ, info.address(Channel.HEARTBEAT))
            self._sockets[Channel.HEARTBEAT] = heartbeat
        except BaseException:
            self.close()
            raise

    def _open(
        self,
        socket_type: int,
        address: str,
        identity: bytes | None = None,
        *,
        connect: bool = True,
    ) -> TrioSocket:
        sock = self._context.socket(socket_type)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            if self._client_keys is not None:
                assert self._info.curve_publickey is not None
                sock.setsockopt(zmq.CURVE_SERVERKEY, self._info.curve_publickey.encode())
                sock.setsockopt(zmq.CURVE_PUBLICKEY, self._client_keys.public.encode())
                sock.setsockopt(zmq.CURVE_SECRETKEY, self._client_keys.secret.encode())
            if identity is not None:
                sock.setsockopt(zmq.IDENTITY, identity)
            if socket_type == zmq.SUB:
                sock.setsockopt(zmq.RCVHWM, IOPUB_QUEUE_MESSAGES)
            if socket_type == zmq.REQ:
                # A missed heartbeat must not wedge the REQ state machine: allow resending, and
                # drop the late reply to an abandoned request.
                sock.setsockopt(zmq.REQ_RELAXED, 1)
                sock.setsockopt(zmq.REQ_CORRELATE, 1)
            if connect:
                sock.connect(address)
        except BaseException:
            sock.close(linger=0)
            raise
        return TrioSocket(sock)

    async def connect_stdin(self) -> TrioSocket:
        """Connect the stdin DEALER and wait until its handshake with the kernel is done; call
        once the kernel has answered a kernel_info_request."""
        address = self._info.address(Channel.STDIN)
        sock = self._open(zmq.DEALER, address, self._identity, connect=False)
        self._sockets[Channel.STDIN] = sock
        monitor = sock.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        with TrioSocket(monitor) as events:
            sock.socket.connect(address)
            await events.recv_multipart()
            sock.socket.disable_monitor()
        return sock

    def socket(self, channel: Channel) -> TrioSocket:
        return self._sockets[channel]

    async def send(self, channel: Channel, message: Message) -> None:
        sock = self._sockets.get(channel)
        if sock is None:
            raise trio.ClosedResourceError(f"the {channel} channel is not connected")
        await sock.send_multipart(serialize(message, self.signer))

    def parse(self, frames: list[bytes]) -> Message:
        """Verify and parse frames received on any of the channels (raises `WireError`), and
        check that what clients get spliced from them is JSON."""
        message = deserialize(frames, self.signer)[1]
        check_spliceable(message)
        return message

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def __enter__(self) -> KernelChannels:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
