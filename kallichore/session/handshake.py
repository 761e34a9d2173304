"""The supervisor's side of the JEP 66 kernel registration handshake.

A kernel that speaks protocol 5.5 or later may pick its own ports: instead of a connection file
it is given a registration file naming a REP socket of ours, binds its five sockets wherever it
likes, and sends a signed `handshake_request` listing the ports. We answer with a
`handshake_reply` and connect to those ports as we would to a classic kernel's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import trio
import zmq

from kallichore.jupyter.connection import ConnectionInfo, CurveKeys
from kallichore.jupyter.wire import (
    DELIMITER,
    SIGNATURE_SCHEME,
    Message,
    Signer,
    WireError,
    deserialize,
    dumps,
    loads,
    new_msg_id,
    serialize,
)
from kallichore.session.launch.remote_shim import request_digest
from kallichore.trio_zmq import TrioSocket

__all__ = ["HandshakeError", "Registration", "RemoteRegistration", "wants_handshake"]

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
        self, context: zmq.Context[zmq.Socket[bytes]], key: str, ip: str = REGISTRATION_IP
    ) -> None:
        self._key = key
        self._ip = ip
        self._signer = Signer(key.encode())
        # Our replies' header.session: any id that stays the same for this registration.
        self._session = new_msg_id()
        sock = context.socket(zmq.REP)
        try:
            self._prepare(sock)
            self._port = sock.bind_to_random_port(f"tcp://{ip}")
        except BaseException:
            sock.close(linger=0)
            raise
        self._socket = TrioSocket(sock)

    def _prepare(self, sock: zmq.Socket[bytes]) -> None:
        """Socket options to set before binding."""

    @property
    def url(self) -> str:
        return f"tcp://{self._ip}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

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
        frames = await self._socket.recv_multipart()
        try:
            request, info = self._accept(frames)
        except HandshakeError as exc:
            await self._reply([dumps({"status": "error", "error": str(exc)})])
            raise
        await self._answer(request)
        return info

    async def _answer(self, request: Message) -> None:
        """Accept `request`: the signed `handshake_reply`, and the socket closed."""
        reply = Message.build(
            "handshake_reply",
            {"status": "ok", "capabilities": {}},
            session=self._session,
            parent=request.header,
        )
        await self._reply(serialize(reply, self._signer))

    def _accept(self, frames: list[bytes]) -> tuple[Message, ConnectionInfo]:
        """The request and the kernel's ports; raises `HandshakeError` saying what is wrong."""
        request = self._verified(frames)
        try:
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
        try:
            info = ConnectionInfo(
                **{name: content[name] for name in _PORT_FIELDS},
                transport="tcp",
                **self._where(content),
            )
        except (ValueError, TypeError) as exc:
            raise HandshakeError(f"invalid handshake_request: {exc}") from None
        return request, info

    def _verified(self, frames: list[bytes]) -> Message:
        """The request, its signature checked."""
        try:
            return deserialize(frames, self._signer)[1]
        except WireError as exc:
            raise HandshakeError(f"invalid registration message: {exc}") from None

    def _where(self, content: dict[str, Any]) -> dict[str, Any]:
        """The connection info's fields besides the ports: the kernel is on loopback, with
        our key."""
        return {"key": self._key, "ip": REGISTRATION_IP}

    async def _reply(self, frames: list[bytes]) -> None:
        """Send the one reply and close the socket, making sure the reply still goes out.

        A REP socket that has just received never blocks on sending (the reply is queued, or
        dropped if the kernel has gone), so shielding the send cannot hang. `TrioSocket.close`
        discards queued messages, so we close the socket ourselves first, with a linger; no
        other task can be waiting on it, as REP serves one request at a time.
        """
        with trio.CancelScope(shield=True):
            await self._socket.send_multipart(frames)
        self._socket.socket.close(linger=_REPLY_LINGER_MS)
        self._socket.close()

    def close(self) -> None:
        """Close the socket, without waiting for anything. Idempotent."""
        self._socket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# What the shim tells us besides the ports, in its request's content.
_KERNEL_SECRETS = ("key", "curve_publickey", "curve_secretkey")


class RemoteRegistration(Registration):
    """Where our remote shim registers a kernel it started on another machine.

    Anybody on the network can reach this socket, and the launch order that told the shim
    where it is crossed that network as the launcher carried it (srun forwards stdin
    unencrypted), so nothing secret went that way. The socket is a CurveZMQ server whose public
    key was in the order: the request is encrypted on the wire, and it brings the secrets the
    shim made for the kernel (its HMAC key and CurveZMQ key pair) with the ports and the
    kernel's address. A request counts only once the shim has vouched for it, by its digest,
    on the launcher's own output, which nobody else can write to; any other is refused and the
    socket goes on waiting.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], ip: str) -> None:
        self._server = CurveKeys.new()
        # What the shim said of where the kernel runs (its `kallichore` block).
        self.announced: dict[str, Any] = {}
        super().__init__(context, "", ip)

    def _prepare(self, sock: zmq.Socket[bytes]) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._server.secret.encode())

    @property
    def public_key(self) -> str:
        """The server's CurveZMQ public key, for the launch order."""
        return self._server.public

    async def wait_vouched(self, vouched: Callable[[str], Awaitable[bool]]) -> ConnectionInfo:
        """The first request that is valid and that `vouched(digest)` confirms, answered."""
        while True:
            frames = await self._socket.recv_multipart()
            try:
                request, info = self._accept(frames)
                if not await vouched(request_digest(frames)):
                    raise HandshakeError("no launcher of ours vouched for this registration")
            except HandshakeError as exc:
                logger.warning("refused a registration: %s", exc)
                with trio.CancelScope(shield=True):
                    await self._socket.send_multipart(
                        [dumps({"status": "error", "error": str(exc)})]
                    )
                continue
            self._signer = Signer(info.key.encode())
            await self._answer(request)
            return info

    def _verified(self, frames: list[bytes]) -> Message:
        try:
            key = _content(frames).get("key")
            if not isinstance(key, str) or not key:
                raise HandshakeError("the registration request brings no key")
            return deserialize(frames, Signer(key.encode()))[1]
        except WireError as exc:
            raise HandshakeError(f"invalid registration message: {exc}") from None

    def _where(self, content: dict[str, Any]) -> dict[str, Any]:
        announced = content.get("kallichore")
        self.announced = announced if isinstance(announced, dict) else {}
        return {"ip": content.get("ip"), **{name: content.get(name) for name in _KERNEL_SECRETS}}


def _content(frames: list[bytes]) -> dict[str, Any]:
    """The content of a message's frames, unverified (it holds the key to verify them with)."""
    try:
        content = loads(frames[frames.index(DELIMITER) + 5])
    except (ValueError, IndexError, WireError) as exc:
        raise HandshakeError(f"invalid registration message: {exc}") from None
    if not isinstance(content, dict):
        raise HandshakeError("invalid registration message: its content is not an object")
    return content
