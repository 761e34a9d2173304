"""h11 over a trio stream: the two things both listeners need before a WebSocket takes over."""

from __future__ import annotations

from typing import cast

import h11
import trio

RECEIVE_BYTES = 64 * 1024
# A request head larger than this is not a client of ours (h11's own default is 16 KiB).
MAX_HEAD_BYTES = 64 * 1024


def server_connection() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)


async def next_event(
    stream: trio.SocketStream, connection: h11.Connection
) -> h11.Event | type[h11.PAUSED]:
    """The connection's next event, reading from `stream` as long as h11 needs data.

    Raises `h11.RemoteProtocolError` on what is not HTTP/1.1; returns `h11.PAUSED` once a
    request or response is complete and the next cycle has not started.
    """
    while (event := connection.next_event()) is h11.NEED_DATA:
        connection.receive_data(await stream.receive_some(RECEIVE_BYTES))
    return cast(h11.Event | type[h11.PAUSED], event)


async def respond(
    stream: trio.SocketStream,
    connection: h11.Connection,
    status: int,
    body: bytes = b"",
    content_type: bytes = b"application/json",
) -> None:
    """A whole response, after which the connection closes."""
    headers = [(b"Content-Length", str(len(body)).encode()), (b"Connection", b"close")]
    if body:
        headers.append((b"Content-Type", content_type))
    data = connection.send(h11.Response(status_code=status, headers=headers)) or b""
    if body:
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
