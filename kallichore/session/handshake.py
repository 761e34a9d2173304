"""The supervisor's side of the JEP 66 kernel registration handshake.

A kernel that speaks protocol 5.5 or later may pick its own ports: instead of a connection file
it is given a registration file naming a REP socket of ours, binds its five sockets wherever it
likes, and sends a signed `handshake_request` listing the ports. We answer with a
`handshake_reply` and connect to those ports as we would to a classic kernel's.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import trio
import zmq

from kallichore.jupyter.connection import ConnectionInfo, CurveKeys
from kallichore.jupyter.wire import (
    SIGNATURE_SCHEME,
    Message,
    Signer,
    WireError,
    deserialize,
    dumps,
    new_msg_id,
    serialize,
)
from kallichore.trio_zmq import TrioSocket

__all__ = ["HandshakeError", "Registration", "wants_handshake"]

logger = logging.getLogger(__name__)

REGISTRATION_IP = "127.0.0.1"
_PORT_FIELDS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
# How long the closed socket keeps trying to deliver our reply. A kernel that has just sent its
# request reads the reply at once, so this only bounds a context termination in the worst case.
_REPLY_LINGER_MS = 1000


def wants_handshake(protocol_version: str | None) -> bool:
    """Whether a kernel declaring `protocol_version` registers its ports by JEP 66 (>= 5.5).

    Kallichore parses only "major.minor", so it treats "5.5.0" as an old kernel; we also accept
    further numeric parts.
    """
    if not protocol_version:
        return False
    parts = protocol_version.split(".")
    if len(parts) < 2 or not all(part.isascii() and part.isdecimal() for part in parts):
        return False
    return (int(parts[0]), int(parts[1])) >= (5, 5)


class HandshakeError(Exception):
    """The kernel's registration request was invalid; the kernel has been told why."""


class Registration:
    """A REP socket bound on tcp://127.0.0.1:<random port> that accepts exactly one
    `handshake_request`.

    Bound on construction, so the port can go into the registration file before the kernel
    starts. After `wait` has answered a request (whether it accepted it or not) the socket is
    closed; `close` may always be called, and must be if `wait` never ran to completion.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        key: str,
        *,
        ip: str = REGISTRATION_IP,
        remote: bool = False,
        curve: CurveKeys | None = None,
    ) -> None:
        """`ip`: where to listen. A `remote` kernel (our shim, on another machine) says which
        address of its own to connect to; with `curve`, its sockets are CurveZMQ servers with
        that key pair."""
        self._key = key
        self._ip = ip
        self._curve = curve
        self._remote = remote
        # What our remote shim said of where the kernel runs (its `kallichore` block).
        self.announced: dict[str, Any] = {}
        self._signer = Signer(key.encode())
        # Our replies' header.session: any id that stays the same for this registration.
        self._session = new_msg_id()
        sock = context.socket(zmq.REP)
        try:
            self._port = sock.bind_to_random_port(f"tcp://{ip}")
        except BaseException:
            sock.close(linger=0)
            raise
        self._socket = TrioSocket(sock)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"tcp://{self._ip}:{self._port}"

    def file_contents(self) -> dict[str, Any]:
        """The registration file's JSON object; its path replaces ``{connection_file}``."""
        return {
            "transport": "tcp",
            "signature_scheme": SIGNATURE_SCHEME,
            "ip": REGISTRATION_IP,
            "key": self._key,
            "registration_port": self._port,
        }

    async def wait(self) -> ConnectionInfo:
        """Receive the kernel's request, answer it, and return where the kernel listens.

        Raises `HandshakeError` (after telling the kernel, with a plain-JSON error frame) if the
        request is not a correctly signed `handshake_request` with five valid ports. Cancelling
        before a request has arrived leaves the socket ready for another call; once a request
        has been taken off the socket it is answered even if the caller's deadline passes
        meanwhile, because the kernel is blocked until it hears back.
        """
        while True:
            frames = await self._socket.recv_multipart()
            try:
                request, info = self._accept(frames)
            except HandshakeError as exc:
                error = [dumps({"status": "error", "error": str(exc)})]
                if not self._remote:
                    await self._reply(error)
                    raise
                # Anybody on the network can reach this socket: only our kernel's signed
                # request counts, and a stranger's cannot fail its start.
                await self._reply(error, last=False)
                logger.warning("ignored an invalid registration: %s", exc)
                continue
            break
        reply = Message.build(
            "handshake_reply",
            {"status": "ok", "capabilities": {}},
            session=self._session,
            parent=request.header,
        )
        await self._reply(serialize(reply, self._signer))
        return info

    def _accept(self, frames: list[bytes]) -> tuple[Message, ConnectionInfo]:
        """The request and the kernel's ports; raises `HandshakeError` saying what is wrong."""
        try:
            _, request = deserialize(frames, self._signer)
            content = request.content
        except WireError as exc:
            raise HandshakeError(f"invalid registration message: {exc}") from None
        if request.msg_type != "handshake_request":
            raise HandshakeError(
                f"expected a handshake_request, got a message of type {request.msg_type!r}"
            )
        missing = [name for name in _PORT_FIELDS if name not in content]
        if missing:
            raise HandshakeError(f"handshake_request content is missing {', '.join(missing)}")
        ip = content.get("ip", self._ip) if self._remote else REGISTRATION_IP
        try:
            info = ConnectionInfo(
                **{name: content[name] for name in _PORT_FIELDS},
                key=self._key,
                transport="tcp",
                ip=ip,
                curve_publickey=None if self._curve is None else self._curve.public,
                curve_secretkey=None if self._curve is None else self._curve.secret,
            )
        except ValueError as exc:
            raise HandshakeError(f"invalid handshake_request: {exc}") from None
        announced = content.get("kallichore")
        self.announced = announced if isinstance(announced, dict) else {}
        return request, info

    async def _reply(self, frames: list[bytes], *, last: bool = True) -> None:
        """Send the one reply and close the socket, making sure the reply still goes out.

        A REP socket that has just received never blocks on sending (the reply is queued, or
        dropped if the kernel has gone), so shielding the send cannot hang. `TrioSocket.close`
        discards queued messages, so we close the socket ourselves first, with a linger; no
        other task can be waiting on it, as REP serves one request at a time.
        """
        with trio.CancelScope(shield=True):
            await self._socket.send_multipart(frames)
        if not last:
            return
        self._socket.socket.close(linger=_REPLY_LINGER_MS)
        self._socket.close()

    def close(self) -> None:
        """Close the socket, without waiting for anything. Idempotent."""
        self._socket.close()

    def __enter__(self) -> Registration:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
