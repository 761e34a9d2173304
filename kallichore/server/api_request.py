"""One API request the front door has parsed, answered by the dispatcher in the same task.

The request head h11 has already read and the body read after it (a `100 Continue` first if
the client waits for one) become an `ApiRequest`; the dispatcher's `ApiResponse` is written
back through the same h11 connection: in one write when it is whole, chunk by chunk when it is
streamed. No ASGI, no framework, no task per request: on TCP this is how every request that is
not a channels WebSocket reaches the routes.

A body past the limit is answered with a 413 that closes the connection, after the rest of it
is read (so the client is not reset), or at once if the client waits for a `100 Continue`. A
streamed response stops when the client hangs up: what makes it (a running execution) is
cancelled, as it is on the Unix socket.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote

import h11
import trio

from kallichore.api.dispatch import MAX_BODY_BYTES, Dispatcher, too_large
from kallichore.api.exchange import ApiRequest, ApiResponse, StreamedBody
from kallichore.server.h11_stream import RECEIVE_BYTES, next_event

# Answers that never have a body, whatever their length says.
_BODILESS = (204, 304)


async def serve_request(
    dispatcher: Dispatcher, head: h11.Request, stream: trio.SocketStream, connection: h11.Connection
) -> None:
    """`head` (read by `connection`), its body and its answer by `dispatcher`, on `stream`."""
    method = head.method.decode("ascii")
    body = await _read_body(stream, connection, head)
    if body is None:
        await _send(stream, connection, method, too_large())
        return
    path, _, query = head.target.partition(b"?")
    headers: dict[str, str] = {}
    for name, value in head.headers:  # h11 gives the names lower-case
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    request = ApiRequest(
        method,
        unquote(path.decode("latin-1")),
        headers,
        parse_qs(query.decode("latin-1"), keep_blank_values=True),
        body,
    )
    await _send(stream, connection, method, await dispatcher.respond(request))


async def _read_body(
    stream: trio.SocketStream, connection: h11.Connection, head: h11.Request
) -> bytes | None:
    """The request's body; None if it is larger than `MAX_BODY_BYTES`."""
    if connection.they_are_waiting_for_100_continue:
        length = next((v for n, v in head.headers if n == b"content-length"), b"0")
        if int(length) > MAX_BODY_BYTES:
            return None  # never sent: the 413 closes the connection
        continue_ = h11.InformationalResponse(status_code=100, headers=[])
        await stream.send_all(connection.send(continue_) or b"")
    chunks: list[bytes | bytearray] = []
    size = 0
    while isinstance(event := await next_event(stream, connection), h11.Data):
        size += len(event.data)
        if size <= MAX_BODY_BYTES:
            chunks.append(event.data)
    if not isinstance(event, h11.EndOfMessage):
        raise trio.BrokenResourceError("the client hung up before the end of its request")
    return b"".join(chunks) if size <= MAX_BODY_BYTES else None


async def _send(
    stream: trio.SocketStream, connection: h11.Connection, method: str, response: ApiResponse
) -> None:
    headers = [
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in response.headers
    ]
    if response.content_type is not None:
        headers.append((b"content-type", response.content_type.encode("latin-1")))
    if response.stream is not None:
        await stream.send_all(
            connection.send(h11.Response(status_code=response.status, headers=headers)) or b""
        )
        await _stream_body(stream, connection, response.stream)
        return
    bodiless = response.status in _BODILESS
    if not bodiless:
        headers.append((b"content-length", str(len(response.body)).encode()))
    data = connection.send(h11.Response(status_code=response.status, headers=headers)) or b""
    if response.body and not bodiless and method != "HEAD":
        data += connection.send(h11.Data(data=response.body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _stream_body(
    stream: trio.SocketStream, connection: h11.Connection, body: StreamedBody
) -> None:
    """`body`'s chunks as they come (chunked encoding), until it ends or the client hangs up."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_hangup, stream, connection, nursery.cancel_scope)
        async with body as chunks:
            async for chunk in chunks:
                await stream.send_all(connection.send(h11.Data(data=chunk)) or b"")
        await stream.send_all(connection.send(h11.EndOfMessage()) or b"")
        nursery.cancel_scope.cancel()


async def _cancel_on_hangup(
    stream: trio.SocketStream, connection: h11.Connection, scope: trio.CancelScope
) -> None:
    """Cancel `scope` if the client hangs up. A pipelined next request is left with h11, which
    holds it until the next cycle; the client is not read further meanwhile, so what it may
    send ahead stays bounded."""
    data = await stream.receive_some(RECEIVE_BYTES)
    if data:
        connection.receive_data(data)
    else:
        scope.cancel()
