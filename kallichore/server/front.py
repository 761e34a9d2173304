"""The TCP front door: channels WebSockets are served here, every other request by hypercorn.

The channels WebSocket is the hot path of every kernel's output. Behind hypercorn each frame
costs two trips through the scheduler, permessage-deflate is negotiated whenever a client
offers it, and the app cannot see pongs, so a hung client is never noticed. The front door
therefore reads each request head with h11: a WebSocket upgrade of `/sessions/<id>/channels`
is answered here (`kallichore.channels.websocket`, the same shell as the per-session Unix
sockets); any other request is relayed, with its body, to hypercorn on a private Unix socket,
and its response relayed back, after which the connection goes on to its next request. The
decision is per request, so a client that keeps its connection alive may upgrade it after any
number of plain requests. The API keeps one port, as Kallichore's clients expect.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, unquote

import h11
import trio
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as WebSocketHandshakeError

from kallichore.api.app import ServerState, check_token, log_response
from kallichore.api.routes import CROSS_ORIGIN_REFUSAL, cross_origin, jupyter_token_matches
from kallichore.channels.broker import ChannelBroker
from kallichore.channels.jupyter_framing import negotiate, offered_subprotocols
from kallichore.channels.jupyter_hub import JupyterHubs
from kallichore.channels.kallichore_framing import requested_resume
from kallichore.channels.websocket import (
    PING_INTERVAL_SECONDS,
    accept,
    handshake_for,
    serve_channels,
)
from kallichore.errors import ErrorCode, KallichoreError
from kallichore.server.h11_stream import RECEIVE_BYTES, next_event, respond, server_connection
from kallichore.supervisor import Supervisor

logger = logging.getLogger(__name__)

# How long a connection may wait for its next request head (idle keep-alive included).
HEAD_TIMEOUT_SECONDS = 10.0
# How long a Jupyter channels upgrade waits for a starting kernel (jupyter_server's
# `kernel_info_timeout`).
KERNEL_READY_TIMEOUT_SECONDS = 60.0
# hypercorn closes a connection left idle for its keep_alive_timeout (5 s): a connection to it
# idle for longer than this is replaced rather than reused, so no request races that close.
BACKEND_REUSE_SECONDS = 2.0


class FrontDoor:
    """Accepts API connections on TCP; see the module docstring."""

    def __init__(
        self,
        supervisor: Supervisor,
        state: ServerState,
        broker: ChannelBroker,
        backend: Path,
        *,
        hubs: JupyterHubs | None = None,
        ping_interval: float = PING_INTERVAL_SECONDS,
    ) -> None:
        self._supervisor = supervisor
        self._state = state
        self._broker = broker
        self._hubs = hubs or JupyterHubs()
        self._backend = backend
        self._ping_interval = ping_interval
        # Requests being relayed: a shutdown lets them finish (its own answer among them).
        self._relaying = 0
        self._settled = trio.Event()
        self._settled.set()

    async def settled(self) -> None:
        """Return once no request is being relayed."""
        await self._settled.wait()

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on host:port (0: any free port); reports the bound port when listening."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        client = server_connection()
        try:
            async with _Backend(self._backend) as backend:
                await self._serve_requests(stream, client, backend)
        except* h11.RemoteProtocolError as errors:
            # Not HTTP/1.1: tell the client, if no response has begun, and hang up.
            error = errors.exceptions[0]
            if client.our_state in (h11.IDLE, h11.SEND_RESPONSE) and isinstance(
                error, h11.RemoteProtocolError
            ):
                status = error.error_status_hint
                logger.info("a request that is not HTTP/1.1 -> %d", status)
                with trio.move_on_after(HEAD_TIMEOUT_SECONDS):
                    await respond(stream, client, status)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            logger.debug("an API connection went away")
        except* Exception:
            logger.exception("an API connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_requests(
        self, stream: trio.SocketStream, client: h11.Connection, backend: _Backend
    ) -> None:
        """Request after request, until the client or hypercorn ends the connection."""
        while True:
            event: h11.Event | type[h11.PAUSED] | None = None
            with trio.move_on_after(HEAD_TIMEOUT_SECONDS):
                event = await next_event(stream, client)
            if not isinstance(event, h11.Request):
                return  # the client hung up, or kept the connection idle too long
            session_id = _channels_session(event)
            kernel_id = _jupyter_channels_kernel(event)
            if (session_id or kernel_id) is not None and _from_another_origin(event):
                # A page must not open a channel to a kernel (cross-site WebSocket hijacking).
                body = json.dumps({"code": "403", "message": CROSS_ORIGIN_REFUSAL}).encode()
                await respond(stream, client, 403, body)
                return
            if session_id is not None:
                await self._serve_channels(stream, client, event, session_id)
                return
            if kernel_id is not None:
                await self._serve_jupyter_channels(stream, client, event, kernel_id)
                return
            if not self._relaying:
                self._settled = trio.Event()
            self._relaying += 1
            try:
                await backend.relay(event, stream, client)
            finally:
                self._relaying -= 1
                if not self._relaying:
                    self._settled.set()
            if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                return  # `Connection: close`, or a request body left unread
            client.start_next_cycle()

    async def _serve_channels(
        self,
        stream: trio.SocketStream,
        client: h11.Connection,
        request: h11.Request,
        session_id: str,
    ) -> None:
        if not await _read_to_end(stream, client):
            return
        path = request.target.partition(b"?")[0].decode("latin-1")
        authorization = dict(request.headers).get(b"authorization")
        if not check_token(self._state, authorization.decode("latin-1") if authorization else None):
            log_response("GET", path, 401)
            await respond(stream, client, 401)
            return
        try:
            session = self._supervisor.get(session_id)
        except KallichoreError:
            log_response("GET", path, 400)
            error = {
                "code": ErrorCode.SESSION_NOT_FOUND.wire,
                "message": f"session {session_id} not found",
                "details": "establishing a websocket requires a valid session id",
            }
            await respond(stream, client, 400, json.dumps(error).encode())
            return
        try:
            resume = requested_resume(request.target, session.events.last_seq)
        except KallichoreError as error:
            log_response("GET", path, 400)
            body = {"code": error.code.wire, "message": error.message}
            await respond(stream, client, 400, json.dumps(body).encode())
            return
        handshake = await _handshake(stream, client, request, path)
        if handshake is None:
            return
        websocket = await accept(stream, handshake, client.trailing_data[0])
        self._supervisor.note_activity()
        await serve_channels(
            self._broker, session, websocket, resume=resume, ping_interval=self._ping_interval
        )

    async def _serve_jupyter_channels(
        self,
        stream: trio.SocketStream,
        client: h11.Connection,
        request: h11.Request,
        kernel_id: str,
    ) -> None:
        """The Jupyter Server API's channels: `/api/kernels/<id>/channels?session_id=S`."""
        if not await _read_to_end(stream, client):
            return
        path = request.target.partition(b"?")[0].decode("latin-1")
        query = parse_qs(request.target.partition(b"?")[2].decode("latin-1"))
        headers = request.headers
        authorization = next((v for n, v in headers if n == b"authorization"), None)
        if not jupyter_token_matches(
            self._state.token,
            authorization.decode("latin-1") if authorization is not None else None,
            query["token"][-1] if "token" in query else None,
        ):
            log_response("GET", path, 401)
            body = {"message": "Forbidden: a token is required", "reason": None}
            await respond(stream, client, 401, json.dumps(body).encode())
            return
        try:
            session = self._supervisor.by_kernel_id(kernel_id)
        except KallichoreError:
            log_response("GET", path, 404)
            body = {"message": f"Kernel does not exist: {kernel_id}", "reason": None}
            await respond(stream, client, 404, json.dumps(body).encode())
            return
        handshake = await _handshake(stream, client, request, path)
        if handshake is None:
            return
        protocol = negotiate(
            offered_subprotocols(v for n, v in headers if n == b"sec-websocket-protocol")
        )
        # A client without a session_id still gets one: it is just never resumed.
        client_session = query.get("session_id", [""])[-1] or uuid.uuid4().hex
        with trio.move_on_after(KERNEL_READY_TIMEOUT_SECONDS):
            # A kernel POST /api/kernels starts in the background may not be launched yet.
            await self._supervisor.settled(session)
            await session.wait_ready(KERNEL_READY_TIMEOUT_SECONDS)
        websocket = await accept(
            stream,
            handshake,
            client.trailing_data[0],
            subprotocol=protocol.subprotocol,
            binary=True,
        )
        self._supervisor.note_activity()
        await self._hubs.serve(
            session, websocket, client_session, protocol, ping_interval=self._ping_interval
        )


async def _handshake(
    stream: trio.SocketStream, client: h11.Connection, request: h11.Request, path: str
) -> H11Handshake | None:
    """wsproto's handshake for the upgrade; None once a 400 has told the client why not."""
    try:
        return handshake_for(request)
    except WebSocketHandshakeError as error:
        log_response("GET", path, 400)
        await respond(stream, client, 400, str(error).encode(), b"text/plain")
        return None


async def _read_to_end(stream: trio.SocketStream, client: h11.Connection) -> bool:
    """Read an upgrade request's (empty) body; False if the client hung up first. The end of
    the request leaves h11 paused, holding whatever followed its head."""
    while isinstance(event := await next_event(stream, client), h11.Data):
        pass
    return isinstance(event, h11.EndOfMessage)


def _from_another_origin(request: h11.Request) -> bool:
    headers = {name: value.decode("latin-1") for name, value in request.headers}
    return cross_origin(headers.get(b"origin"), headers.get(b"host"))


def _upgrade_path(request: h11.Request) -> list[bytes] | None:
    """The path's segments if `request` asks to upgrade to a WebSocket."""
    if request.method != b"GET" or not any(
        name == b"upgrade" and value.lower() == b"websocket" for name, value in request.headers
    ):
        return None
    return request.target.partition(b"?")[0].split(b"/")


def _channels_session(request: h11.Request) -> str | None:
    """The session id if `request` asks to upgrade `/sessions/<id>/channels` to a WebSocket."""
    parts = _upgrade_path(request)
    if parts is None or len(parts) != 4 or parts[:2] != [b"", b"sessions"]:
        return None
    if parts[3] != b"channels":
        return None
    return unquote(parts[2].decode("ascii")) if parts[2] else None


def _jupyter_channels_kernel(request: h11.Request) -> str | None:
    """The kernel id if `request` asks to upgrade `/api/kernels/<id>/channels`."""
    parts = _upgrade_path(request)
    if parts is None or len(parts) != 5 or parts[:3] != [b"", b"api", b"kernels"]:
        return None
    if parts[4] != b"channels":
        return None
    return unquote(parts[3].decode("ascii")) if parts[3] else None


class _Backend:
    """The connection to hypercorn that one client's requests are relayed on.

    Opened on the first relayed request and reused while both sides of h11 agree that it can
    be (and while it is fresh); otherwise closed and replaced for the next request.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stream: trio.SocketStream | None = None
        self._connection = h11.Connection(h11.CLIENT)
        self._idle_since = 0.0

    async def __aenter__(self) -> _Backend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)
            self._stream = None

    async def _connect(self) -> trio.SocketStream:
        if self._stream is not None and (
            trio.current_time() - self._idle_since > BACKEND_REUSE_SECONDS
        ):
            await self._close()
        if self._stream is None:
            self._stream = await trio.open_unix_socket(str(self._path))
            self._connection = h11.Connection(h11.CLIENT)
        return self._stream

    async def relay(
        self, request: h11.Request, client_stream: trio.SocketStream, client: h11.Connection
    ) -> None:
        """Send `request` and its body to hypercorn, and its response back to the client."""
        stream = await self._connect()
        backend = self._connection
        head = h11.Request(
            method=request.method, target=request.target, headers=request.headers.raw_items()
        )
        await stream.send_all(backend.send(head) or b"")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay_body, client_stream, client, stream, backend)
            await _relay_response(stream, backend, client_stream, client)
        if backend.our_state is h11.DONE and backend.their_state is h11.DONE:
            backend.start_next_cycle()
            self._idle_since = trio.current_time()
        else:
            await self._close()


async def _relay_body(
    client_stream: trio.SocketStream,
    client: h11.Connection,
    stream: trio.SocketStream,
    backend: h11.Connection,
) -> None:
    """The client's request body to hypercorn. Should hypercorn hang up first (it answered
    without reading it all), the rest is read and dropped, so the connection can go on."""
    forwarding = True
    while True:
        event = await next_event(client_stream, client)
        if not isinstance(event, h11.Data | h11.EndOfMessage):
            return  # the client hung up: the connection ends after the response
        if forwarding:
            try:
                await stream.send_all(backend.send(event) or b"")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                forwarding = False
        if isinstance(event, h11.EndOfMessage):
            return


async def _relay_response(
    stream: trio.SocketStream,
    backend: h11.Connection,
    client_stream: trio.SocketStream,
    client: h11.Connection,
) -> None:
    """hypercorn's response to the client, written as it arrives, in as few writes as it
    arrives in."""
    pending = b""
    while True:
        try:
            event = backend.next_event()
        except h11.RemoteProtocolError as error:
            raise trio.BrokenResourceError(f"hypercorn's response: {error}") from error
        if event is h11.NEED_DATA:
            if pending:
                await client_stream.send_all(pending)
                pending = b""
            backend.receive_data(await stream.receive_some(RECEIVE_BYTES))
            continue
        if not isinstance(
            event, h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage
        ):
            raise trio.BrokenResourceError("hypercorn closed the connection mid-response")
        pending += client.send(event) or b""
        if isinstance(event, h11.EndOfMessage):
            await client_stream.send_all(pending)
            return
