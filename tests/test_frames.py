"""What the channels WebSocket writes: our own text frames and the events inside them."""

from __future__ import annotations

import json
import os

import pytest
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.frame_protocol import FrameProtocol, Opcode

from kallichore.channels.kallichore_framing import encode_event
from kallichore.channels.websocket import DIRECT_WRITE_MAX_BYTES, WebSocket, data_frames
from kallichore.jupyter.wire import Channel, Message
from kallichore.session.events import JupyterEvent, OutputEvent


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_a_client_reads_our_text_frames_of_every_length_class(size: int) -> None:
    payload = (b"0123456789" * (size // 10 + 1))[:size]
    client = FrameProtocol(client=True, extensions=[])
    client.receive_bytes(data_frames([payload, b"ok"]))
    frames = list(client.received_frames())
    assert [frame.opcode for frame in frames] == [Opcode.TEXT, Opcode.TEXT]
    assert frames[0].payload == payload.decode()
    assert frames[0].frame_finished
    assert frames[0].message_finished
    assert frames[1].payload == "ok"


def test_an_event_with_bytes_that_are_not_utf8_still_makes_a_valid_text_frame() -> None:
    message = Message(
        header={"msg_id": "m", "msg_type": "stream"},
        parent_header={},
        metadata_json=b"{}",
        content_json=b'{"name":"stdout","text":"caf\xe9 \xe2\x82\xac"}',
    )
    frame = encode_event(JupyterEvent(Channel.IOPUB, message))
    parsed = json.loads(frame.decode("utf-8"))
    assert parsed["content"]["text"] == "caf\ufffd \u20ac"
    assert parsed["kind"] == "jupyter"


def test_non_ascii_text_is_sent_as_utf8() -> None:
    frame = encode_event(OutputEvent("stdout", "é€😀\n"))
    assert json.loads(frame.decode("utf-8")) == {"kind": "kernel", "output": ["stdout", "é€😀\n"]}


async def test_what_the_socket_cannot_take_at_once_is_written_before_anything_else() -> None:
    ours, theirs = trio.socket.socketpair()
    ours.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    websocket = WebSocket(trio.SocketStream(ours), Connection(ConnectionType.SERVER), b"")
    client_stream = trio.SocketStream(theirs)
    big = [os.urandom(DIRECT_WRITE_MAX_BYTES // 2).hex().encode()]  # more than the buffer holds
    assert websocket.send_now(big, 1)
    assert websocket.owes
    assert not websocket.send_now([b"x"], 2), "nothing may overtake the unwritten part"
    client = FrameProtocol(client=True, extensions=[])
    received: list[str] = []
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            parts: list[str] = []
            while len(received) < 2:
                client.receive_bytes(await client_stream.receive_some())
                for frame in client.received_frames():
                    parts.append(str(frame.payload))
                    if frame.message_finished:
                        received.append("".join(parts))
                        parts.clear()

        nursery.start_soon(read)
        await websocket.send(b"tail")
    assert received == [big[0].decode(), "tail"]
    assert not websocket.owes
    await websocket.aclose()
    assert not websocket.send_now([b"x"], 2), "a closed socket takes nothing"
    await client_stream.aclose()
