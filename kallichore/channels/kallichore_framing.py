"""Kallichore's channel envelope: session events -> WebSocket text, client text -> messages.

Towards the client every frame is a JSON object tagged by `kind`: `"jupyter"` for a kernel
message (headers trimmed to `msg_id`/`msg_type`, buffers as base64) and `"kernel"` for a
supervisor event with one camelCase key. A kernel message's content and metadata are spliced in
as the bytes the kernel sent: this is the hot path, and re-encoding content is what it avoids.

Our extension, for clients that ask for it with a `resume` query parameter (Positron never
does, so its frames are Kallichore's byte for byte): each event's frame ends with its `seq` in
the session's log, and `?resume=<seq>` on a later connection continues after that event.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import parse_qs

import attrs

from kallichore.errors import ErrorCode, KallichoreError
from kallichore.jupyter.wire import Channel, JSONObject, Message, dumps, loads
from kallichore.session.events import (
    Event,
    EventsDropped,
    ExecutionQueuedEvent,
    ExecutionRequestedEvent,
    ExitedEvent,
    HandshakeCompletedEvent,
    JupyterEvent,
    OutputEvent,
    ResourceUsageEvent,
    StatusEvent,
    WorkingDirChangedEvent,
)
from kallichore.session.model import Status

CLIENT_CHANNELS = {"shell": Channel.SHELL, "control": Channel.CONTROL, "stdin": Channel.STDIN}


def wire_status(status: Status) -> str:
    """A never-started session reads `idle` on the wire, as Kallichore's clients expect."""
    return Status.IDLE.value if status is Status.UNINITIALIZED else status.value


def trimmed_header(header: JSONObject) -> JSONObject | None:
    if not header:
        return None
    return {"msg_id": header.get("msg_id"), "msg_type": header.get("msg_type")}


def jupyter_frame(message: Message, channel: Channel) -> bytes:
    """A kernel message as the client's `jupyter` frame, built around the kernel's own bytes."""
    parent = trimmed_header(message.parent_header)
    buffers = ",".join(f'"{base64.b64encode(b).decode()}"' for b in message.buffers)
    return b"".join(
        (
            b'{"kind":"jupyter","header":',
            dumps(trimmed_header(message.header)),
            b',"parent_header":',
            dumps(parent) if parent else b"null",
            b',"channel":"',
            channel.value.encode(),
            b'","content":',
            message.content_json or b"{}",
            b',"metadata":',
            message.metadata_json or b"{}",
            b',"buffers":[',
            buffers.encode(),
            b"]}",
        )
    )


def queued_message(message: Message) -> JSONObject:
    """An execution-queue entry as ActiveSession shows it: the channel message without `kind`."""
    parsed: JSONObject = loads(jupyter_frame(message, Channel.SHELL))
    del parsed["kind"]
    return parsed


def kernel_event(key: str, payload: Any) -> bytes:
    return b'{"kind":"kernel","' + key.encode() + b'":' + dumps(payload) + b"}"


def encode_event(event: Event) -> bytes:
    """One text frame for the client, as UTF-8."""
    match event:
        case JupyterEvent(channel=channel, message=message):
            frame = jupyter_frame(message, channel)
            # A text frame must be valid UTF-8, whatever the kernel sent.
            return frame if frame.isascii() else frame.decode(errors="replace").encode()
        case StatusEvent(status=status, reason=reason):
            return kernel_event("status", {"status": wire_status(status), "reason": reason})
        case OutputEvent(stream=stream, text=text):
            return kernel_event("output", [stream, text])
        case ExecutionQueuedEvent(msg_id=msg_id):
            return kernel_event("executionQueued", msg_id)
        case ExecutionRequestedEvent(msg_id=msg_id, code=code, source=source):
            return kernel_event(
                "executionRequested", {"msg_id": msg_id, "code": code, "source": source}
            )
        case ExitedEvent(exit_code=exit_code):
            return kernel_event("exited", exit_code)
        case WorkingDirChangedEvent(path=path):
            return kernel_event("workingDirChanged", path)
        case ResourceUsageEvent(usage=usage):
            return kernel_event("resourceUsage", usage.to_dict())
        case HandshakeCompletedEvent(session_id=session_id, connection=connection):
            return kernel_event("handshakeCompleted", [session_id, connection.to_dict()])
        case EventsDropped(count=count):
            return kernel_event("eventsDropped", count)
    raise TypeError(f"unknown event {event!r}")


def numbered(frame: bytes, seq: int) -> bytes:
    """An event's frame with its `seq` for a resuming client (every frame is a JSON object)."""
    return b'%s,"seq":%d}' % (frame[:-1], seq)


@attrs.frozen
class Resume:
    """A client that asked for numbered frames, continuing after `seq` if it gave one."""

    seq: int | None = None


# Longer is no seq of ours (2**63 events); refusing it early keeps int() cheap.
MAX_SEQ_DIGITS = 19


def requested_resume(target: bytes, last_seq: int) -> Resume | None:
    """What a channels request's `resume` query parameter asks for (None if it has none):
    `?resume` numbers the frames, `?resume=<seq>` also continues after that event.

    Raises `KallichoreError` for a value that is not a seq of a log whose last is `last_seq`.
    """
    query = target.partition(b"?")[2]
    if b"resume" not in query:
        return None
    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("resume")
    if not values:
        return None
    value = values[-1]
    if not value:
        return Resume()
    if not (value.isascii() and value.isdigit() and len(value) <= MAX_SEQ_DIGITS):
        raise KallichoreError(
            ErrorCode.SESSION_CONNECTION_FAILED,
            f"resume must be a sequence number, got {value[:40]!r}",
        )
    seq = int(value)
    if seq > last_seq:
        raise KallichoreError(
            ErrorCode.SESSION_CONNECTION_FAILED,
            f"cannot resume after event {seq}: the session's last event is {last_seq}",
        )
    return Resume(seq)


def client_error(error: KallichoreError, msg_id: str | None = None) -> bytes:
    """Our extension: a `kernel` event telling one client that its message was refused."""
    body: JSONObject = {"code": error.code.wire, "message": error.message}
    if msg_id is not None:
        body["msg_id"] = msg_id
    return kernel_event("error", body)


class FrameError(KallichoreError):
    """A client frame that is not a channel message; the message says what is wrong."""

    def __init__(self, message: str, msg_id: str | None = None) -> None:
        super().__init__(ErrorCode.ZMQ_PROXY_ERROR, message)
        self.msg_id = msg_id


def parse_client_frame(text: str) -> tuple[Channel, JSONObject]:
    """Validate a client's channel message; returns its channel and the parsed object."""
    try:
        data = loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError: not JSON (an empty frame too), or an integer past Python's digit limit.
        raise FrameError(f"the frame is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FrameError("the frame must be a JSON object")
    header = data.get("header")
    if not isinstance(header, dict):
        raise FrameError("the message has no header object")
    msg_id = header.get("msg_id")
    if not isinstance(msg_id, str) or not isinstance(header.get("msg_type"), str):
        raise FrameError("the header needs string msg_id and msg_type")
    channel = CLIENT_CHANNELS.get(data.get("channel"))  # type: ignore[arg-type]
    if channel is None:
        raise FrameError(f"cannot send on channel {data.get('channel')!r}", msg_id)
    for key in ("content", "metadata"):
        if not isinstance(data.get(key, {}), dict):
            raise FrameError(f"{key} must be a JSON object", msg_id)
    parent = data.get("parent_header")
    if parent is not None and not isinstance(parent, dict):
        raise FrameError("parent_header must be an object or null", msg_id)
    buffers = data.get("buffers", [])
    if not isinstance(buffers, list) or not all(isinstance(b, str) for b in buffers):
        raise FrameError("buffers must be an array of base64 strings", msg_id)
    return channel, data


def decode_buffers(data: JSONObject) -> list[bytes]:
    try:
        return [base64.b64decode(b, validate=True) for b in data.get("buffers", [])]
    except binascii.Error as exc:
        raise FrameError(f"a buffer is not valid base64: {exc}", data["header"]["msg_id"]) from None
