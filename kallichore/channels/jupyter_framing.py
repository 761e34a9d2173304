"""The Jupyter channels WebSocket's framing, both protocols, as pure functions.

jupyter_server speaks two framings on `/api/kernels/{id}/channels`, chosen by subprotocol:

* `v1.kernel.websocket.jupyter.org` (JupyterLab 4 offers it): binary frames both ways, a list of
  little-endian uint64 offsets then the channel name and the message's parts (header, parent
  header, metadata, content, buffers) as the kernel sent them.
* legacy (no subprotocol; jupyter_server as a gateway client, nbclient): a JSON text frame with
  the channel and top-level `msg_id`/`msg_type`, or, when the message has buffers, a binary frame
  of big-endian uint32 offsets, that JSON and the buffers.

Kernel to client is the hot path: both framings are built around the bytes the kernel sent
(`Message.header_json` etc.), never parsed and dumped again.
"""

from __future__ import annotations

import base64
import binascii
import functools
import itertools
import json
import logging
import struct
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

import attrs

from kallichore.jupyter.wire import Channel, JSONObject, Message, dumps

logger = logging.getLogger(__name__)

V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
CLIENT_CHANNELS = {"shell": Channel.SHELL, "control": Channel.CONTROL, "stdin": Channel.STDIN}
# Per message, an Enum's `.value` and a struct format built from a count cost more than the rest.
_CHANNEL_NAMES = {channel: channel.value.encode() for channel in Channel}


class Protocol(Enum):
    """The framing of one connection."""

    V1 = V1_SUBPROTOCOL
    LEGACY = "legacy"

    @property
    def subprotocol(self) -> str | None:
        """What the server answers in `Sec-WebSocket-Protocol` (legacy: nothing)."""
        return V1_SUBPROTOCOL if self is Protocol.V1 else None


@attrs.frozen(slots=True)
class Binary:
    """A frame to be sent as a binary WebSocket message (a plain `bytes` frame is text)."""

    payload: bytes

    def __len__(self) -> int:
        return len(self.payload)


# A frame for the client: UTF-8 text, or binary.
Frame = bytes | Binary


class JupyterFrameError(ValueError):
    """A client frame that is not a Jupyter message."""


@attrs.frozen
class ClientFrame:
    """A message a client sent: headers parsed (to route and fill them), the rest as bytes."""

    channel: Channel
    header: JSONObject
    parent_header: JSONObject
    metadata_json: bytes = b"{}"
    content_json: bytes = b"{}"
    buffers: tuple[bytes, ...] = ()


def negotiate(offered: Iterable[str]) -> Protocol:
    """v1 if the client offers it (as jupyter_server's `select_subprotocol`), else legacy."""
    return Protocol.V1 if V1_SUBPROTOCOL in offered else Protocol.LEGACY


def offered_subprotocols(values: Iterable[bytes]) -> list[str]:
    """The subprotocols named by `Sec-WebSocket-Protocol` header values (comma-separated)."""
    return [name.strip() for value in values for name in value.decode("latin-1").split(",") if name]


# -- kernel to client ----------------------------------------------------------------------------


def _raw_parts(message: Message) -> tuple[bytes, bytes]:
    header = message.header_json or dumps(message.header)
    parent = message.parent_json
    if parent is None or len(parent) < 2:
        parent = dumps(message.parent_header) if message.parent_header else b"{}"
    return header, parent


def encode(message: Message, channel: Channel, protocol: Protocol) -> Frame:
    """One frame of `message` from `channel` for a client speaking `protocol`."""
    header, parent = _raw_parts(message)
    if protocol is Protocol.V1:
        return Binary(
            pack_v1(
                (
                    _CHANNEL_NAMES[channel],
                    header,
                    parent,
                    message.metadata_json or b"{}",
                    message.content_json or b"{}",
                    *message.buffers,
                )
            )
        )
    body = b"".join(
        (
            b'{"header":',
            header,
            b',"msg_id":',
            dumps(message.msg_id),
            b',"msg_type":',
            dumps(message.msg_type),
            b',"parent_header":',
            parent,
            b',"metadata":',
            message.metadata_json or b"{}",
            b',"content":',
            message.content_json or b"{}",
            b',"channel":"',
            _CHANNEL_NAMES[channel],
            b'"',
        )
    )
    if message.buffers:
        return Binary(pack_legacy([body + b"}", *message.buffers]))
    text = body + b',"buffers":[]}'
    # A text frame must be valid UTF-8, whatever the kernel sent.
    return text if text.isascii() else text.decode(errors="replace").encode()


def pack_v1(parts: Sequence[bytes]) -> bytes:
    """v1: the offset count, the offsets (LE uint64; the last is the end), then the parts."""
    count = len(parts) + 1
    offsets = itertools.accumulate(map(len, parts), initial=8 * (count + 1))
    return b"".join((_structs(f"<{count + 1}Q").pack(count, *offsets), *parts))


@functools.cache
def _structs(layout: str) -> struct.Struct:
    """A frame's offsets' layout, compiled once."""
    return struct.Struct(layout)


def pack_legacy(parts: Sequence[bytes]) -> bytes:
    """legacy binary: the part count, each part's start (BE uint32), then the parts."""
    count = len(parts)
    offsets = [4 * (count + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    return b"".join((struct.pack(f"!{count + 1}I", count, *offsets), *parts))


def status_message(execution_state: str, session: str) -> Message:
    """The iopub `status` jupyter_server makes up when the kernel restarts or dies."""
    return Message.build("status", {"execution_state": execution_state}, session=session)


def loss_notice(count: int, session: str) -> Message:
    """What a client is shown when the session's buffer overflowed and it missed `count`
    messages: a `stream` to stderr (with no parent, so no cell claims it), marked in its
    metadata for programs."""
    return Message.build(
        "stream",
        {
            "name": "stderr",
            "text": f"[kallichore] {count} kernel messages were lost: this client fell "
            "behind the session's buffer\n",
        },
        session=session,
        metadata={"kallichore": {"events_dropped": count}},
    )


# -- client to kernel ----------------------------------------------------------------------------


def decode(frame: str | bytes, protocol: Protocol) -> ClientFrame | None:
    """A client's frame as a message for the kernel; None (logged) for an unknown channel.

    Raises `JupyterFrameError` for a frame that is not a message of `protocol`.
    """
    if protocol is Protocol.V1:
        if isinstance(frame, str):
            raise JupyterFrameError("v1 frames are binary")
        parts = unpack_v1(frame)
        if len(parts) < 5:
            raise JupyterFrameError(f"a v1 frame needs at least 5 parts, got {len(parts)}")
        channel_name = _text(parts[0], "channel")
        return _client_frame(
            channel_name,
            _object(parts[1], "header"),
            _object(parts[2], "parent_header") if len(parts[2]) > 2 else {},
            parts[3],
            parts[4],
            tuple(parts[5:]),
        )
    if isinstance(frame, str):
        data = _object(frame, "message")
        buffers = _base64_buffers(data.get("buffers"))
    else:
        first, *rest = unpack_legacy(frame)
        data = _object(first, "message")
        buffers = tuple(rest)
    header = data.get("header")
    parent = data.get("parent_header") or {}
    if not isinstance(header, dict) or not isinstance(parent, dict):
        raise JupyterFrameError("header and parent_header must be objects")
    return _client_frame(
        data.get("channel", "shell"),
        header,
        parent,
        _dumped(data.get("metadata"), "metadata"),
        _dumped(data.get("content"), "content"),
        buffers,
    )


def unpack_v1(frame: bytes) -> list[bytes]:
    """The parts of a v1 frame. Raises `JupyterFrameError` if the offsets do not fit."""
    offsets = _offsets(frame, "<", "Q", "a v1 frame", minimum=2)
    return _slices(frame, offsets)


def unpack_legacy(frame: bytes) -> list[bytes]:
    """The parts of a legacy binary frame (JSON first, then the buffers)."""
    offsets = _offsets(frame, "!", "I", "a binary frame", minimum=1)
    return _slices(frame, [*offsets, len(frame)])


def _offsets(frame: bytes, order: str, kind: str, what: str, *, minimum: int) -> list[int]:
    """A count then that many offsets, and the first offset is where they end."""
    width = struct.calcsize(kind)
    if len(frame) < width:
        raise JupyterFrameError(f"{what} starts with its offset count")
    (count,) = struct.unpack_from(order + kind, frame)
    if count < minimum or width * (count + 1) > len(frame):
        raise JupyterFrameError(f"{what}'s offset count does not fit the frame")
    offsets = list(_structs(f"{order}{count}{kind}").unpack_from(frame, width))
    if offsets[0] != width * (count + 1):
        raise JupyterFrameError(f"{what}'s first part does not follow its offsets")
    return offsets


def _slices(frame: bytes, offsets: list[int]) -> list[bytes]:
    if offsets[-1] != len(frame) or offsets != sorted(offsets):
        raise JupyterFrameError("a frame's offsets are out of order or out of bounds")
    return [frame[a:b] for a, b in itertools.pairwise(offsets)]


def _client_frame(  # noqa: PLR0917
    channel_name: object,
    header: JSONObject,
    parent: JSONObject,
    metadata_json: bytes,
    content_json: bytes,
    buffers: tuple[bytes, ...],
) -> ClientFrame | None:
    if not isinstance(header.get("msg_id"), str) or not isinstance(header.get("msg_type"), str):
        raise JupyterFrameError("the header needs string msg_id and msg_type")
    channel = CLIENT_CHANNELS.get(channel_name) if isinstance(channel_name, str) else None
    if channel is None:
        logger.info(
            "dropped a %s from a Jupyter client on channel %r",
            header["msg_type"],
            str(channel_name)[:40],
        )
        return None
    return ClientFrame(channel, header, parent, metadata_json, content_json, buffers)


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise JupyterFrameError(f"the {what} is not UTF-8") from None


def _object(data: bytes | str, what: str) -> JSONObject:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise JupyterFrameError(f"the {what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise JupyterFrameError(f"the {what} is not a JSON object")
    return value


def _dumped(value: Any, what: str) -> bytes:
    if value is None:
        return b"{}"
    if not isinstance(value, dict):
        raise JupyterFrameError(f"{what} must be a JSON object")
    return dumps(value)


def _base64_buffers(value: Any) -> tuple[bytes, ...]:
    """A text frame's buffers: absent, `[]` or `{}` (KG's own tests send that), or base64."""
    if not value:
        return ()
    if not isinstance(value, list) or not all(isinstance(b, str) for b in value):
        raise JupyterFrameError("buffers must be a list of base64 strings")
    try:
        return tuple(base64.b64decode(b, validate=True) for b in value)
    except binascii.Error as exc:
        raise JupyterFrameError(f"a buffer is not valid base64: {exc}") from None
