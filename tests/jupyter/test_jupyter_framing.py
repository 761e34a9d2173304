"""The Jupyter channels framing, v1 and legacy, against jupyter_server's own functions.

The golden frames were made by jupyter_server 2.21.1's `serialize_msg_to_ws_v1` and
`serialize_binary_message` (services/kernels/connection/base.py) for the same message; its
`deserialize_*` functions read our frames back as the message we encoded.
"""

from __future__ import annotations

import json
import logging
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kallichore.channels.jupyter_framing import (
    Binary,
    ClientFrame,
    JupyterFrameError,
    Protocol,
    decode,
    encode,
    loss_notice,
    negotiate,
    offered_subprotocols,
    pack_legacy,
    pack_v1,
    status_message,
)
from kallichore.jupyter.wire import Channel, Message, Signer, deserialize, serialize

HEADER = (
    b'{"msg_id":"m1","msg_type":"comm_msg","session":"s1","username":"u",'
    b'"date":"2026-01-01T00:00:00.000Z","version":"5.3"}'
)
CONTENT = b'{"comm_id":"c1","data":{}}'
BUFFERS = (b"\x00\x01\x02", b"xyz")
# jupyter_server's v1 frame of that message on iopub.
GOLDEN_V1 = bytes.fromhex(
    "080000000000000048000000000000004d00000000000000c200000000000000c400000000000000"
    "c600000000000000e000000000000000e300000000000000e600000000000000696f707562"
    + HEADER.hex()
    + "7b7d7b7d"
    + CONTENT.hex()
    + "00010278797a"
)
# jupyter_server's legacy binary frame of that message on shell (its JSON has spaces).
GOLDEN_LEGACY = bytes.fromhex(
    "0000000300000010000000ff000001027b22686561646572223a207b226d73675f6964223a20226d31"
    "222c20226d73675f74797065223a2022636f6d6d5f6d7367222c202273657373696f6e223a202273"
    "31222c2022757365726e616d65223a202275222c202264617465223a2022323032362d30312d3031"
    "5430303a30303a30302e3030305a222c202276657273696f6e223a2022352e33227d2c2022706172"
    "656e745f686561646572223a207b7d2c20226d65746164617461223a207b7d2c2022636f6e74656e"
    "74223a207b22636f6d6d5f6964223a20226331222c202264617461223a207b7d7d2c20226368616e"
    "6e656c223a20227368656c6c227d00010278797a"
)


def kernel_message(
    header: bytes = HEADER, content: bytes = CONTENT, buffers: tuple[bytes, ...] = BUFFERS
) -> Message:
    """A message as `deserialize` makes it from a kernel's frames (raw headers kept)."""
    signer = Signer(b"")
    parsed = Message(json.loads(header), {}, b"{}", content, buffers)
    frames = serialize(parsed, signer)
    frames[2] = header  # the kernel's own bytes, not our dump
    return deserialize(frames, signer)[1]


def test_negotiation() -> None:
    assert negotiate(["v1.kernel.websocket.jupyter.org"]) is Protocol.V1
    assert negotiate(["x", "v1.kernel.websocket.jupyter.org"]) is Protocol.V1
    assert negotiate([]) is Protocol.LEGACY
    assert negotiate(["v2.kernel.websocket.jupyter.org"]) is Protocol.LEGACY
    assert Protocol.V1.subprotocol == "v1.kernel.websocket.jupyter.org"
    assert Protocol.LEGACY.subprotocol is None
    assert offered_subprotocols([b"a, v1.kernel.websocket.jupyter.org", b"b"]) == [
        "a",
        "v1.kernel.websocket.jupyter.org",
        "b",
    ]


def test_v1_is_jupyter_servers_frame_byte_for_byte() -> None:
    frame = encode(kernel_message(), Channel.IOPUB, Protocol.V1)
    assert frame == Binary(GOLDEN_V1)


def test_jupyter_servers_frames_decode() -> None:
    v1 = GOLDEN_V1.replace(b"iopub", b"shell")  # same length: same offsets
    assert decode(v1, Protocol.V1) == ClientFrame(
        Channel.SHELL, json.loads(HEADER), {}, b"{}", CONTENT, BUFFERS
    )
    legacy = decode(GOLDEN_LEGACY, Protocol.LEGACY)
    assert legacy is not None
    assert (legacy.channel, legacy.header, legacy.buffers) == (
        Channel.SHELL,
        json.loads(HEADER),
        BUFFERS,
    )
    assert json.loads(legacy.content_json) == json.loads(CONTENT)


def test_legacy_text_has_top_level_ids_and_full_headers() -> None:
    message = kernel_message(buffers=())
    frame = encode(message, Channel.IOPUB, Protocol.LEGACY)
    assert isinstance(frame, bytes)
    data = json.loads(frame)
    assert data == {
        "header": json.loads(HEADER),
        "msg_id": "m1",
        "msg_type": "comm_msg",
        "parent_header": {},
        "metadata": {},
        "content": json.loads(CONTENT),
        "buffers": [],
        "channel": "iopub",
    }


def test_legacy_binary_with_buffers() -> None:
    frame = encode(kernel_message(), Channel.IOPUB, Protocol.LEGACY)
    assert isinstance(frame, Binary)
    count, *offsets = struct.unpack_from("!4I", frame.payload)
    assert count == 3
    assert offsets[0] == 16
    body = json.loads(frame.payload[offsets[0] : offsets[1]])
    assert (body["channel"], body["msg_id"]) == ("iopub", "m1")
    assert "buffers" not in body
    assert frame.payload[offsets[1] :] == b"".join(BUFFERS)


def test_legacy_client_frames_tolerated_as_kernel_gateway_sends_them() -> None:
    # No channel (shell), `"buffers": {}`, no date in the header: KG's own test message.
    text = json.dumps(
        {
            "header": {
                "msg_id": "a",
                "msg_type": "execute_request",
                "username": "",
                "session": "s",
            },
            "parent_header": {},
            "metadata": {},
            "content": {"code": "6*7"},
            "buffers": {},
        }
    )
    frame = decode(text, Protocol.LEGACY)
    assert frame is not None
    assert frame.channel is Channel.SHELL
    assert frame.buffers == ()
    assert frame.header == {
        "msg_id": "a",
        "msg_type": "execute_request",
        "username": "",
        "session": "s",
    }


def test_unknown_channel_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    text = json.dumps({"header": {"msg_id": "a", "msg_type": "x"}, "channel": "iopub"})
    assert decode(text, Protocol.LEGACY) is None
    assert "dropped a x from a Jupyter client on channel 'iopub'" in caplog.text


@pytest.mark.parametrize(
    ("frame", "protocol"),
    [
        ("not json", Protocol.LEGACY),
        ("[]", Protocol.LEGACY),
        ('{"header": {"msg_id": 1, "msg_type": "x"}}', Protocol.LEGACY),
        ('{"header": {"msg_id": "a", "msg_type": "x"}, "content": []}', Protocol.LEGACY),
        ('{"header": {"msg_id": "a", "msg_type": "x"}, "buffers": ["!"]}', Protocol.LEGACY),
        (b"\x00\x00\x00\x05abc", Protocol.LEGACY),
        ("text", Protocol.V1),
        (b"\x01", Protocol.V1),
        (b"\xff" * 16, Protocol.V1),
        (pack_v1([b"shell", b"{}", b"{}", b"{}"]), Protocol.V1),
        (struct.pack("<3Q", 2, 24, 99) + b"shell", Protocol.V1),
    ],
)
def test_malformed_frames_are_refused(frame: str | bytes, protocol: Protocol) -> None:
    with pytest.raises(JupyterFrameError):
        decode(frame, protocol)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)


@given(
    content=objects,
    metadata=objects,
    buffers=st.lists(st.binary(max_size=40), max_size=4),
    parent=st.none() | st.text(min_size=1, max_size=8),
    channel=st.sampled_from([Channel.SHELL, Channel.CONTROL, Channel.STDIN]),
    protocol=st.sampled_from(list(Protocol)),
)
def test_round_trip(  # noqa: PLR0917
    content: dict[str, object],
    metadata: dict[str, object],
    buffers: list[bytes],
    parent: str | None,
    channel: Channel,
    protocol: Protocol,
) -> None:
    """What we encode decodes to the same message, whatever it holds (the same functions
    serve both directions, as the frames are the same shape each way)."""
    parent_header = {"msg_id": parent, "msg_type": "execute_request"} if parent else {}
    message = Message.build(
        "comm_msg", content, session="s", parent=parent_header, metadata=metadata, buffers=buffers
    )
    frame = encode(message, channel, protocol)
    # What the client's WebSocket reads: bytes from a binary frame, text from a text frame.
    wire = frame.payload if isinstance(frame, Binary) else frame.decode()
    decoded = decode(wire, protocol)
    assert decoded is not None
    assert decoded.channel is channel
    assert decoded.header == message.header
    assert decoded.parent_header == parent_header
    assert json.loads(decoded.content_json) == content
    assert json.loads(decoded.metadata_json) == metadata
    assert decoded.buffers == tuple(buffers)


def test_synthetic_messages() -> None:
    status = status_message("restarting", "sess")
    assert status.content == {"execution_state": "restarting"}
    assert status.parent_header == {}
    notice = loss_notice(3, "sess")
    assert (notice.msg_type, notice.content["name"]) == ("stream", "stderr")
    assert notice.metadata == {"kallichore": {"events_dropped": 3}}
    assert "3 kernel messages were lost" in notice.content["text"]
    assert pack_legacy([b"{}"]) == b"\x00\x00\x00\x01\x00\x00\x00\x08{}"
