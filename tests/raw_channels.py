"""A channels WebSocket client that can misbehave: send any frame (empty, not UTF-8, not JSON)
and drop the connection without a closing handshake, as a crashed or unplugged frontend does.

kallichore.client's `Channels` is a well-behaved client and cannot do either; this one speaks
wsproto over a plain loopback TCP stream so the fuzz and fault suites control every byte.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import trio
import wsproto
import wsproto.events

from tests.conftest import TIMEOUT


class Refused(Exception):
    """The server refused the WebSocket handshake."""


class RawChannels:
    """One connection to `/sessions/{id}/channels`; `connect` opens it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self._text: list[str] = []
        self.closed = False

    @classmethod
    async def connect(
        cls, port: int, session_id: str, token: str | None, query: str = ""
    ) -> RawChannels:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        channels = cls(stream)
        headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
        target = f"/sessions/{session_id}/channels" + (f"?{query}" if query else "")
        await channels._send(
            wsproto.events.Request(host="localhost", target=target, extra_headers=headers)
        )
        event = await channels._next_event()
        if not isinstance(event, wsproto.events.AcceptConnection):
            await stream.aclose()
            raise Refused(repr(event))
        return channels

    async def _send(self, event: wsproto.events.Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_text(self, text: str) -> None:
        await self._send(wsproto.events.TextMessage(text))

    async def send_bytes_as_text(self, payload: bytes) -> None:
        """A text frame whose payload is `payload` as is, valid UTF-8 or not: wsproto refuses
        to build one that is not, so the frame is written by hand (masked, as a client must)."""
        mask = b"\x01\x02\x03\x04"
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x81, 0x80 | size)
        elif size < 2**16:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self.stream.send_all(head + mask + masked)

    async def send_message(self, frame: dict[str, Any]) -> None:
        await self.send_text(json.dumps(frame))

    async def _next_event(self) -> wsproto.events.Event:
        with trio.fail_after(TIMEOUT):
            while True:
                for event in self.ws.events():
                    return event
                data = await self.stream.receive_some()
                self.ws.receive_data(data or None)

    async def receive(self) -> dict[str, Any] | None:
        """The next frame as JSON, or None once the server has closed the connection."""
        while not self.closed:
            event = await self._next_event()
            if isinstance(event, wsproto.events.TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    text, self._text = "".join(self._text), []
                    frame: dict[str, Any] = json.loads(text)
                    return frame
            elif isinstance(event, wsproto.events.Ping):
                await self._send(event.response())
            elif isinstance(event, wsproto.events.CloseConnection):
                self.closed = True
        return None

    async def close(self) -> None:
        """A clean close: the closing handshake, then the socket."""
        if not self.closed:
            with trio.move_on_after(5):
                await self._send(wsproto.events.CloseConnection(code=1000))
                while await self.receive() is not None:
                    pass
        await self.stream.aclose()

    async def abort(self) -> None:
        """An unclean drop: no closing handshake, and a TCP reset (SO_LINGER 0), as when a
        frontend's process dies or its network goes away."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()
