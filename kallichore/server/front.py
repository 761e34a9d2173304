"""The TCP front door: every request is read here, once, with h11.

The channels WebSocket is the hot path of every kernel's output. Behind hypercorn each frame
costs two trips through the scheduler, permessage-deflate is negotiated whenever a client
offers it, and the app cannot see pongs, so a hung client is never noticed. The front door
therefore reads each request head with h11: a WebSocket upgrade of `/sessions/<id>/channels`
is answered here (`kallichore.channels.websocket`, the same shell as the per-session Unix
sockets); any other request is answered, in the same task, by the API's dispatcher
(`kallichore.server.api_request`), after which the connection goes on to its next request.
The decision is per request, so a client that keeps its connection alive may upgrade it after
any number of plain requests. The API keeps one port, as Kallichore's clients expect.

An earlier shape relayed plain requests to hypercorn on a private Unix socket: two parses,
two more sockets and hypercorn's own tasks per request made a `GET /status` cost ~3 ms of CPU;
the next handed them to the Quart app in-task, whose request context and tasks per request
still cost more than the routes (~0.7 ms of CPU per `GET /status`).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, unquote

import h11
import trio
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as WebSocketHandshakeError

from kallichore.api.app import ServerState, check_token
from kallichore.api.dispatch import Dispatcher, log_response
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
from kallichore.server.api_request import serve_request
from kallichore.server.h11_stream import RECEIVE_BYTES, next_event, respond, server_connection
from kallichore.supervisor import Supervisor

logger = logging.getLogger(__name__)

# How long a connection may wait for its next request head (idle keep-alive included).
HEAD_TIMEOUT_SECONDS = 10.0
# How long a Jupyter channels upgrade waits for a starting kernel (jupyter_server's
# `kernel_info_timeout`).
KERNEL_READY_TIMEOUT_SECONDS = 60.0


class FrontDoor:
    """Accepts API connections on TCP; see the module docstring."""

    def __init__(
        self,
        supervisor: Supervisor,
        state: ServerState,
        broker: ChannelBroker,
        dispatcher: Dispatcher,
        *,
        hubs: JupyterHubs | None = None,
        ping_interval: float = PING_INTERVAL_SECONDS,
    ) -> None:
        self._supervisor = supervisor
        self._state = state
        self._broker = broker
        self._hubs = hubs or JupyterHubs()
        self._dispatcher = dispatcher
        self._ping_interval = ping_interval
        # Requests being answered: a shutdown lets them finish (its own answer among them).
        self._answering = 0
        self._settled = trio.Event()
        self._settled.set()

    async def settled(self) -> None:
        """Return once no request is being answered."""
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
            await self._serve_requests(stream, client)
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

    async def _serve_requests(self, stream: trio.SocketStream, client: h11.Connection) -> None:
        """Request after request, until the client or a response ends the connection."""
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
            if not self._answering:
                self._settled = trio.Event()
            self._answering += 1
            try:
                await serve_request(self._dispatcher, event, stream, client)
            finally:
                self._answering -= 1
                if not self._answering:
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
        asked = self._hubs.ask()

        async def kernel_ready() -> None:
            with trio.move_on_after(KERNEL_READY_TIMEOUT_SECONDS):
                # A kernel POST /api/kernels starts in the background may not be launched yet.
                await self._supervisor.settled(session)
                await session.wait_ready(KERNEL_READY_TIMEOUT_SECONDS)

        received = await _unless_hung_up(stream, kernel_ready)
        if received is None:
            return
        websocket = await accept(
            stream,
            handshake,
            client.trailing_data[0] + received,
            subprotocol=protocol.subprotocol,
            binary=True,
        )
        self._supervisor.note_activity()
        await self._hubs.serve(
            session,
            websocket,
            client_session,
            protocol,
            asked=asked,
            ping_interval=self._ping_interval,
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


async def _unless_hung_up(
    stream: trio.SocketStream, wait: Callable[[], Awaitable[None]]
) -> bytes | None:
    """`wait()`, watching the client meanwhile: None if it hung up first, else what it sent.

    A client that gave up on an upgrade must not be accepted later: jupyter_server's gateway
    client retries its channels connection with the same `session_id` while the kernel starts,
    and the abandoned attempt, accepted after the retry, would replace it as the newer
    connection. Reading stops at the first data (a client may send frames before the 101), so
    what is kept stays bounded.
    """
    received = b""
    hung_up = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal received, hung_up
            received = await stream.receive_some(RECEIVE_BYTES)
            if not received:
                hung_up = True
                nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await wait()
        nursery.cancel_scope.cancel()
    return None if hung_up else received


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
