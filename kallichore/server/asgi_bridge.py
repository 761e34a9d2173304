"""One HTTP request the front door has parsed, served by the ASGI app in the same task.

The request head h11 has already read becomes the ASGI scope; its body is read from the same
h11 connection as the app asks for it, and the app's response is written back through it. No
second parse, no relay over a Unix socket, no server in between: on TCP this is how every
request that is not a channels WebSocket reaches the routes.

What a server owes the app is kept: the body as it arrives (a `100 Continue` first if the
client waits for one), `http.disconnect` when the client hangs up while its response is being
made (a streamed execution notices a caller that went away), a response written in one piece
unless it is streamed, and the rest of a body the app did not read drained, so the connection
can carry the next request or close without resetting the client.
"""

from __future__ import annotations

from urllib.parse import unquote

import h11
import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveEvent,
    ASGISendEvent,
    ConnectionState,
    HTTPScope,
)

from kallichore.server.h11_stream import RECEIVE_BYTES, next_event


class _Exchange:
    """The ASGI `receive` and `send` of one request on an h11 connection."""

    def __init__(
        self, stream: trio.SocketStream, connection: h11.Connection, method: bytes
    ) -> None:
        self._stream = stream
        self._connection = connection
        self._method = method
        # HEAD, 204 and 304 answers have no body, whatever the app sends (h11 refuses one).
        self._bodiless = False
        self._head: h11.Response | None = None
        self._pending = b""
        # A response that says how long it is goes out in one write, however it is sent.
        self._sized = False
        self._body_done = False
        self.responded = False

    async def receive(self) -> ASGIReceiveEvent:
        connection = self._connection
        if self._body_done:
            return await self._disconnected()
        if connection.they_are_waiting_for_100_continue and self._head is None:
            await self._stream.send_all(
                connection.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
            )
        event = await next_event(self._stream, connection)
        if isinstance(event, h11.Data):
            return {"type": "http.request", "body": bytes(event.data), "more_body": True}
        if isinstance(event, h11.EndOfMessage):
            self._body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}  # the client hung up mid-body

    async def _disconnected(self) -> ASGIReceiveEvent:
        """Wait for the client to hang up (the app cancels this once it has answered).

        A pipelined next request is left with h11, which holds it until the next cycle; the
        client is not read further meanwhile, so what it may send ahead stays bounded."""
        data = await self._stream.receive_some(RECEIVE_BYTES)
        if data:
            self._connection.receive_data(data)
            await trio.sleep_forever()
        return {"type": "http.disconnect"}

    async def send(self, message: ASGISendEvent) -> None:
        connection = self._connection
        if message["type"] == "http.response.start":
            headers = [(bytes(name), bytes(value)) for name, value in message["headers"]]
            self._sized = any(name.lower() == b"content-length" for name, _ in headers)
            self._head = h11.Response(status_code=message["status"], headers=headers)
            self._bodiless = self._method == b"HEAD" or message["status"] in (204, 304)
            return
        if message["type"] != "http.response.body" or self._head is None:
            return  # nothing else (trailers, pushes) is asked of an HTTP/1.1 server here
        if not self.responded:
            self.responded = True
            self._pending = connection.send(self._head) or b""
        body = message.get("body", b"")
        if body and not self._bodiless:
            self._pending += connection.send(h11.Data(data=body)) or b""
        more = message.get("more_body", False)
        if not more:
            self._pending += connection.send(h11.EndOfMessage()) or b""
        if not more or not self._sized:
            data, self._pending = self._pending, b""
            await self._stream.send_all(data)


async def serve_request(
    app: ASGIFramework, request: h11.Request, stream: trio.SocketStream, connection: h11.Connection
) -> None:
    """`request` (its head read by `connection`) answered by `app` on `stream`."""
    path, _, query = request.target.partition(b"?")
    scope: HTTPScope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.http_version.decode("ascii"),
        "method": request.method.decode("ascii"),
        "scheme": "http",
        "path": unquote(path.decode("ascii")),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": list(request.headers),
        "client": stream.socket.getpeername(),
        "server": stream.socket.getsockname(),
        "state": ConnectionState({}),
        "extensions": {},
    }
    exchange = _Exchange(stream, connection, request.method)
    await app(scope, exchange.receive, exchange.send)
    if not exchange.responded:
        raise trio.BrokenResourceError("the app ended without a response")
    if connection.their_state is h11.SEND_BODY:
        # Answered before the body was read (a 413): drop the rest, so the client is not reset.
        while isinstance(await next_event(stream, connection), h11.Data):
            pass
