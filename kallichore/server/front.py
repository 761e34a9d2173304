"""The TCP front door: channels WebSockets are served here, every other request by hypercorn.

The channels WebSocket is the hot path of every kernel's output. Behind hypercorn each frame
costs two trips through the scheduler, permessage-deflate is negotiated whenever a client
offers it, and the app cannot see pongs, so a hung client is never noticed. The front door
therefore reads the head of each new connection: a WebSocket upgrade of
`/sessions/<id>/channels` is answered here with trio-websocket (the same code that serves the
per-session Unix sockets); any other connection is spliced, byte for byte, to hypercorn
listening on a private Unix socket. The API keeps one port, as Kallichore's clients expect.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from urllib.parse import unquote

import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from kallichore.api.app import ServerState, check_token
from kallichore.channels.broker import ChannelBroker
from kallichore.errors import ErrorCode, KallichoreError
from kallichore.server.websocket import (
    MAX_MESSAGE_BYTES,
    PING_INTERVAL_SECONDS,
    ReplayStream,
    serve_channel_client,
)
from kallichore.supervisor import Supervisor

logger = logging.getLogger(__name__)

# A request head larger than this, or slower than this, is not a client of ours.
MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_SECONDS = 10.0
SPLICE_CHUNK_BYTES = 64 * 1024

_CHANNELS_REQUEST = re.compile(rb"GET /sessions/([^/?# ]+)/channels(?:\?[^ ]*)? HTTP/1\.1\r\n")
_UPGRADE_HEADER = re.compile(rb"\r\nupgrade:[ \t]*websocket[ \t]*\r\n", re.IGNORECASE)


class FrontDoor:
    """Accepts API connections on TCP; see the module docstring."""

    def __init__(
        self,
        supervisor: Supervisor,
        state: ServerState,
        broker: ChannelBroker,
        backend: Path,
        *,
        ping_interval: float = PING_INTERVAL_SECONDS,
    ) -> None:
        self._supervisor = supervisor
        self._state = state
        self._broker = broker
        self._backend = backend
        self._ping_interval = ping_interval

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on host:port (0: any free port); reports the bound port when listening."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            head = await _read_head(stream)
            if head is None:
                return
            request = _CHANNELS_REQUEST.match(head)
            if request is not None and _UPGRADE_HEADER.search(head.partition(b"\r\n\r\n")[0]):
                await self._serve_channels(stream, head, unquote(request.group(1).decode()))
            else:
                await self._splice(stream, head)
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            logger.debug("an API connection went away")
        except* Exception:
            logger.exception("an API connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_channels(
        self, stream: trio.SocketStream, head: bytes, session_id: str
    ) -> None:
        async with trio.open_nursery() as nursery:  # trio-websocket's reader task runs here
            replay = ReplayStream(stream, head)
            request = await trio_websocket.wrap_server_stream(
                nursery, replay, max_message_size=MAX_MESSAGE_BYTES
            )
            headers = {name.lower(): value for name, value in request.headers}
            authorization = headers.get(b"authorization")
            if not check_token(self._state, authorization.decode() if authorization else None):
                await request.reject(401)
                return
            try:
                session = self._supervisor.get(session_id)
            except KallichoreError:
                error = {
                    "code": ErrorCode.SESSION_NOT_FOUND.wire,
                    "message": f"session {session_id} not found",
                    "details": "establishing a websocket requires a valid session id",
                }
                await request.reject(
                    400,
                    extra_headers=[(b"Content-Type", b"application/json")],
                    body=json.dumps(error).encode(),
                )
                return
            ws = await request.accept()
            self._supervisor.note_activity()
            await serve_channel_client(
                self._broker, session, ws, replay, ping_interval=self._ping_interval
            )
            nursery.cancel_scope.cancel()

    async def _splice(self, stream: trio.SocketStream, head: bytes) -> None:
        """Relay the connection to hypercorn until hypercorn is done with it."""
        backend = await trio.open_unix_socket(str(self._backend))
        async with backend:
            await backend.send_all(head)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_relay_requests, stream, backend)
                await _relay(backend, stream)
                nursery.cancel_scope.cancel()


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """What the client sent up to the end of its first request head (and perhaps beyond)."""
    head = b""
    with trio.move_on_after(HEAD_TIMEOUT_SECONDS):
        while b"\r\n\r\n" not in head and len(head) < MAX_HEAD_BYTES:
            chunk = await stream.receive_some(SPLICE_CHUNK_BYTES)
            if not chunk:
                break
            head += chunk
        return head or None
    return None


async def _relay(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream) -> None:
    while chunk := await source.receive_some(SPLICE_CHUNK_BYTES):
        await sink.send_all(chunk)


async def _relay_requests(client: trio.SocketStream, backend: trio.SocketStream) -> None:
    """Client to hypercorn; the client's end of input is passed on, the response still flows."""
    await _relay(client, backend)
    await backend.send_eof()
