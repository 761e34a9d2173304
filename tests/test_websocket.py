"""The channels WebSocket shell over a socket pair, against wsproto's client: no kernel needed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import h11
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from wsproto.extensions import PerMessageDeflate

from kallichore.channels import websocket
from kallichore.channels.websocket import WebSocket, accept, handshake_for

TIMEOUT = 30


class Client:
    """wsproto's client on the other end of the socket pair."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)

    async def send(self, event: wsproto.events.Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> wsproto.events.Event:
        with trio.fail_after(TIMEOUT):
            while True:
                for event in self.ws.events():
                    return event
                self.ws.receive_data(await self.stream.receive_some() or None)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[WebSocket, Client]]:
    """A server WebSocket accepted from a client that offered permessage-deflate."""
    ours, theirs = trio.socket.socketpair()
    server_stream, client = trio.SocketStream(ours), Client(trio.SocketStream(theirs))
    request = wsproto.events.Request(
        host="localhost", target="/api/channels/x", extensions=[PerMessageDeflate()]
    )
    await client.send(request)
    http = h11.Connection(h11.SERVER)
    http.receive_data(await server_stream.receive_some())
    head = http.next_event()
    assert isinstance(head, h11.Request)
    server = await accept(server_stream, handshake_for(head), http.trailing_data[0])
    accepted = await client.next_event()
    assert isinstance(accepted, wsproto.events.AcceptConnection)
    assert accepted.extensions == []  # no compression: the hot path writes its own frames
    yield server, client
    await server.aclose()
    await client.stream.aclose()


async def test_a_fragmented_text_message_arrives_whole(pair: tuple[WebSocket, Client]) -> None:
    server, client = pair
    await client.send(wsproto.events.TextMessage("hel", message_finished=False))
    await client.send(wsproto.events.TextMessage("lo"))
    assert await server.receive() == "hello"


async def test_pings_are_answered_and_binary_messages_ignored(
    pair: tuple[WebSocket, Client],
) -> None:
    server, client = pair
    await client.send(wsproto.events.Ping(b"1234"))
    await client.send(wsproto.events.BytesMessage(b"\x00"))
    await client.send(wsproto.events.TextMessage("after"))
    assert await server.receive() == "after"
    assert await client.next_event() == wsproto.events.Pong(b"1234")


async def test_a_message_too_big_closes_with_1009(
    pair: tuple[WebSocket, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(websocket, "MAX_MESSAGE_BYTES", 1000)
    server, client = pair
    await client.send(wsproto.events.TextMessage("x" * 600, message_finished=False))
    await client.send(wsproto.events.TextMessage("x" * 600))
    assert await server.receive() is None
    closed = await client.next_event()
    assert isinstance(closed, wsproto.events.CloseConnection)
    assert closed.code == 1009


async def test_the_clients_close_is_answered_and_ends_sending(
    pair: tuple[WebSocket, Client],
) -> None:
    server, client = pair
    await client.send(wsproto.events.CloseConnection(1000, "bye"))
    assert await server.receive() is None
    answer = await client.next_event()
    assert isinstance(answer, wsproto.events.CloseConnection)
    assert answer.code == 1000
    with pytest.raises(websocket.ConnectionClosed):
        await server.send(b'{"kind":"kernel"}')
    assert not server.send_now([b'{"kind":"kernel"}'], 1)
    assert server.closed_cleanly


async def test_our_close_waits_briefly_for_the_clients(
    pair: tuple[WebSocket, Client], autojump_clock: trio.testing.MockClock
) -> None:
    server, client = pair
    await server.send_batch([b"1", b"2"])
    await server.close(1001, "going away")
    await server.aclose()  # the client never answers: given up after CLOSE_TIMEOUT_SECONDS
    events = [await client.next_event() for _ in range(3)]
    assert [e.data for e in events[:2]] == ["1", "2"]  # type: ignore[attr-defined]
    assert events[2] == wsproto.events.CloseConnection(1001, "going away")
    assert await client.stream.receive_some() == b""  # and the socket is closed


async def test_pings_due_after_our_close_are_not_sent(
    pair: tuple[WebSocket, Client], autojump_clock: trio.testing.MockClock
) -> None:
    """The ping loop outlives our Close (a session deleted under a client): its pings are
    dropped, not an error that ends every connection of the listener."""
    server, client = pair
    await server.close(1001, "going away")
    with trio.move_on_after(5 * websocket.PING_INTERVAL_SECONDS):
        await server.ping_until_unanswered(websocket.PING_INTERVAL_SECONDS / 10)
    await server.close(1000, "again")  # a second Close is not sent either
    assert await client.next_event() == wsproto.events.CloseConnection(1001, "going away")
    await client.send(wsproto.events.CloseConnection(1001, "going away"))
    await server.aclose()
    assert await client.stream.receive_some() == b""  # nothing after the Close


async def test_a_pong_acknowledges_the_events_written_before_its_ping(
    pair: tuple[WebSocket, Client],
) -> None:
    server, client = pair
    acknowledged: list[int] = []
    server.on_acknowledged = acknowledged.append
    await server.send_batch([b'{"n":1}', b'{"n":2}'], through=2)
    await server._send_event(wsproto.events.Ping((1).to_bytes(8, "big")))
    assert server.send_now([b'{"n":3}'], 3)
    await server._send_event(wsproto.events.Ping((2).to_bytes(8, "big")))
    events = [await client.next_event() for _ in range(5)]
    assert [type(e).__name__ for e in events] == ["TextMessage"] * 2 + [
        "Ping",
        "TextMessage",
        "Ping",
    ]
    assert server.sent_through == 3
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.receive)
        await client.send(wsproto.events.Pong((1).to_bytes(8, "big")))
        with trio.fail_after(TIMEOUT):
            while acknowledged != [2]:
                await trio.sleep(0.01)
        await client.send(wsproto.events.Pong((2).to_bytes(8, "big")))
        with trio.fail_after(TIMEOUT):
            while acknowledged != [2, 3]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert not server.closed_cleanly


async def test_a_hang_up_is_not_a_clean_close(pair: tuple[WebSocket, Client]) -> None:
    server, client = pair
    await client.stream.aclose()
    assert await server.receive() is None
    assert not server.closed_cleanly


async def test_a_pong_is_written_after_the_slice_being_written_not_the_whole_batch(
    pair: tuple[WebSocket, Client],
) -> None:
    """A client that pings while a long batch waits for its socket (it reads slowly) gets its
    pong after the slice the server is writing, not behind the whole batch."""
    server, client = pair
    count = 64
    frames = [b'"%s"' % (b"x" * (websocket.WRITE_SLICE_BYTES // 2)) for _ in range(count)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_batch, frames, count)
        nursery.start_soon(server.receive)  # (answers pings)
        await trio.testing.wait_all_tasks_blocked()  # the socket is full
        await client.send(wsproto.events.Ping(b"1"))
        await trio.testing.wait_all_tasks_blocked()  # the ping was read
        before_pong = 0
        while not isinstance(event := await client.next_event(), wsproto.events.Pong):
            before_pong += isinstance(event, wsproto.events.TextMessage) and event.message_finished
        assert before_pong < count // 2, f"the pong came after {before_pong} of {count} frames"
        received = before_pong
        while received < count:
            event = await client.next_event()
            received += isinstance(event, wsproto.events.TextMessage) and event.message_finished
        assert server.sent_through == count
        nursery.cancel_scope.cancel()
