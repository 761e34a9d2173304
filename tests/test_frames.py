"""What the channels WebSocket writes: our own text frames and the events inside them."""

from __future__ import annotations

import json
import os

import pytest
import trio
from wsproto.frame_protocol import FrameProtocol, Opcode

from kallichore.channels.kallichore_framing import encode_event
from kallichore.jupyter.wire import Channel, Message
from kallichore.server.websocket import ReplayStream, text_frame_header
from kallichore.session.events import JupyterEvent, OutputEvent


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_a_client_reads_our_text_frames_of_every_length_class(size: int) -> None:
    payload = (b"0123456789" * (size // 10 + 1))[:size]
    client = FrameProtocol(client=True, extensions=[])
    client.receive_bytes(text_frame_header(size) + payload + text_frame_header(2) + b"ok")
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
    stream = ReplayStream(trio.SocketStream(ours), b"")
    client = trio.SocketStream(theirs)
    big = os.urandom(8 * 2**20)  # far more than a socket buffer holds
    assert stream.write_now(big)
    assert stream.owes
    assert not stream.write_now(b"x"), "nothing may overtake the unwritten part"
    received = bytearray()
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            while len(received) < len(big) + 4:
                received.extend(await client.receive_some())

        nursery.start_soon(read)
        await stream.send_all(b"tail")
    assert received == big + b"tail"
    assert not stream.owes
    await stream.aclose()
    assert not stream.write_now(b"x"), "a closed socket takes nothing"
    await client.aclose()
