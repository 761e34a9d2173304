"""Per-session Unix sockets that speak WebSocket: the channels stream of the socket transport.

With `--transport socket`, `GET /sessions/{id}/channels` answers with the path of a socket that
belongs to that session alone. A client connects to it and starts an ordinary HTTP WebSocket
handshake (Positron asks for `/api/channels/<id>`; the path is ignored and no token is checked:
the socket's 0600 mode is the protection, and the directory it is given, private to the server,
keeps others from squatting its name). From then on the connection is served by the same
`ChannelBroker` as the TCP WebSocket, so displacement and delivery work the same on both.

Deliberate deviations from Kallichore: the full session id (or a hash of it) names the socket, so
two sessions never share a path; a connection that does not start with `GET ` is closed instead
of being spoken to in raw WebSocket frames.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from functools import partial
from pathlib import Path

import attrs
import h11
import trio
from wsproto.utilities import RemoteProtocolError as WebSocketHandshakeError

from kallichore.api.dispatch import log_response
from kallichore.channels.broker import ChannelBroker
from kallichore.channels.kallichore_framing import Resume, requested_resume
from kallichore.channels.websocket import (
    PING_INTERVAL_SECONDS,
    WebSocket,
    accept,
    handshake_for,
    serve_channels,
)
from kallichore.errors import KallichoreError
from kallichore.server.h11_stream import next_event, respond, server_connection
from kallichore.session.kernel_session import KernelSession

logger = logging.getLogger(__name__)

# Kallichore's limit (macOS's sun_path); Linux allows 107 bytes.
MAX_SOCKET_PATH_BYTES = 104

# How long a new connection has to send its first 4 bytes, and then to finish the handshake.
SNIFF_TIMEOUT_SECONDS = 5.0
HANDSHAKE_TIMEOUT_SECONDS = 5.0
LISTEN_BACKLOG = 16


class SocketPathTooLong(ValueError):
    """No socket path for the session fits in MAX_SOCKET_PATH_BYTES: the socket dir is too long."""


def session_socket_path(socket_dir: Path, session_id: str, server_pid: int) -> Path:
    """Where the channels socket of `session_id` lives.

    `kc-<pid>-<session id>.sock` when that fits, else `kc-<hash of both>.sock`; either way the
    whole session id decides the name, so distinct sessions get distinct paths.
    """
    path = socket_dir / f"kc-{server_pid}-{session_id}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
        return path
    digest = hashlib.sha256(f"{session_id}\0{server_pid}".encode()).hexdigest()[:16]
    path = socket_dir / f"kc-{digest}.sock"
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH_BYTES:
        raise SocketPathTooLong(
            f"the channels socket path {str(path)!r} is {length} bytes long; "
            f"the limit is {MAX_SOCKET_PATH_BYTES} bytes: use a shorter socket directory"
        )
    return path


@attrs.define
class _Listener:
    path: Path
    scope: trio.CancelScope


class SessionSockets:
    """The per-session channel sockets of one server.

    `close()` only stops listening (and removes the file): clients already attached stay until
    they leave, are displaced by a newer client, their session's events end (delete), the broker
    stops, or `run()` is cancelled. A re-`open()` therefore keeps the current client attached
    until someone connects to the new socket.
    """

    def __init__(
        self,
        broker: ChannelBroker,
        socket_dir: Path,
        server_pid: int,
        *,
        ping_interval: float = PING_INTERVAL_SECONDS,
    ) -> None:
        self._broker = broker
        self._socket_dir = socket_dir
        self._server_pid = server_pid
        self._ping_interval = ping_interval
        self._listeners: dict[str, _Listener] = {}
        self._nursery: trio.Nursery | None = None
        self._opening = trio.Lock()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the listeners and connections until cancelled; then remove every socket file."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.close_all()

    async def open(self, session: KernelSession) -> Path:
        """(Re)create the listening socket of `session`; returns its path.

        The new socket replaces the file of the previous one (the path depends only on the
        session), and the previous listener stops. Opens are serialized, so concurrent calls
        for one session leave exactly one listener, the one whose file is in place.
        """
        session_id = session.session_id
        path = session_socket_path(self._socket_dir, session_id, self._server_pid)
        async with self._opening:
            listener = await _listen_privately(path)
            if self._nursery is None:
                listener.socket.close()
                path.unlink()
                raise RuntimeError("SessionSockets.open() needs SessionSockets.run() to be running")
            previous = self._listeners.get(session_id)
            if previous is not None:
                previous.scope.cancel()
            scope = trio.CancelScope()
            self._listeners[session_id] = _Listener(path, scope)
            self._nursery.start_soon(self._accept, session, listener, scope, self._nursery)
        logger.info("session %s: channels socket at %s", session_id, path)
        return path

    def path(self, session_id: str) -> Path | None:
        listener = self._listeners.get(session_id)
        return listener.path if listener is not None else None

    def close(self, session_id: str) -> None:
        """Stop listening for `session_id` and remove its socket file; attached clients stay."""
        listener = self._listeners.pop(session_id, None)
        if listener is not None:
            listener.scope.cancel()
            listener.path.unlink(missing_ok=True)

    def close_all(self) -> None:
        for session_id in list(self._listeners):
            self.close(session_id)

    async def _accept(
        self,
        session: KernelSession,
        listener: trio.SocketListener,
        scope: trio.CancelScope,
        nursery: trio.Nursery,
    ) -> None:
        """Accept until `scope` is cancelled; connections run in `nursery`, outliving this."""
        with scope:
            await trio.serve_listeners(
                partial(self._serve_connection, session), [listener], handler_nursery=nursery
            )

    async def _serve_connection(self, session: KernelSession, stream: trio.SocketStream) -> None:
        """Serve one accepted connection; its failures are logged and end only that connection."""
        try:
            accepted = await _accept_websocket(stream, session)
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            logger.info("session %s: a channels client went away", session.session_id)
            accepted = None
        except Exception:
            logger.exception("session %s: a channels connection failed", session.session_id)
            accepted = None
        if accepted is None:
            await trio.aclose_forcefully(stream)
            return
        websocket, resume = accepted
        try:
            await serve_channels(
                self._broker, session, websocket, resume=resume, ping_interval=self._ping_interval
            )
        except* Exception:
            logger.exception("session %s: a channels connection failed", session.session_id)
            await trio.aclose_forcefully(stream)


async def _listen_privately(path: Path) -> trio.SocketListener:
    """A listener at `path` that only our user can connect to.

    The mode is set between bind and listen: until listen, connecting is refused anyway, so there
    is no moment when others could connect, and no process-wide umask change is needed.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # a stale socket, from an earlier open() or a dead server
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    try:
        os.chmod(path, 0o600)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        path.unlink()
        raise
    return trio.SocketListener(sock)


async def _accept_websocket(
    stream: trio.SocketStream, session: KernelSession
) -> tuple[WebSocket, Resume | None] | None:
    """Complete the client's HTTP WebSocket handshake, with what it asks to resume; None (after
    logging) if there is none."""
    session_id = session.session_id
    prefix = b""
    with trio.move_on_after(SNIFF_TIMEOUT_SECONDS):
        while len(prefix) < 4:
            chunk = await stream.receive_some()
            if not chunk:
                break
            prefix += chunk
    if not prefix.startswith(b"GET "):
        logger.info(
            "session %s: closing a channels connection that began with %r, not an HTTP WebSocket "
            "handshake (raw WebSocket frames are not supported)",
            session_id,
            prefix[:4],
        )
        return None
    client = server_connection()
    client.receive_data(prefix)
    with trio.move_on_after(HANDSHAKE_TIMEOUT_SECONDS):
        request = await next_event(stream, client)
        while isinstance(event := await next_event(stream, client), h11.Data):
            pass
        if isinstance(request, h11.Request) and isinstance(event, h11.EndOfMessage):
            try:
                resume = requested_resume(request.target, session.events.last_seq)
                handshake = handshake_for(request)
            except (KallichoreError, WebSocketHandshakeError) as error:
                path = request.target.partition(b"?")[0].decode("latin-1")
                log_response("GET", path, 400)
                await respond(stream, client, 400, str(error).encode(), b"text/plain")
                return None
            return await accept(stream, handshake, client.trailing_data[0]), resume
    logger.info("session %s: a channels WebSocket handshake did not complete", session_id)
    return None
