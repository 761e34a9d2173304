"""What a channels connection carries: typed events from the server, messages to the kernel.

Every frame from the server is a JSON object. `"kind": "kernel"` frames are supervisor events
with one camelCase key (`status`, `output`, `exited`, ...), each decoded into its own class;
every other frame is a kernel message (Kallichore tags them `"kind": "jupyter"`; Jupyter
Server's JSON protocol, which has the same shape, does not tag them at all).
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from kallichore.jupyter.connection import ConnectionInfo
from kallichore.jupyter.wire import PROTOCOL_VERSION, new_msg_id, utc_now

JSON = dict[str, Any]

# One Jupyter session id per client process, as jupyter_client uses one per client.
CLIENT_SESSION = uuid.uuid4().hex


@attrs.frozen
class KernelMessage:
    """A message from the kernel (headers as the server sent them; buffers decoded)."""

    channel: str
    header: JSON
    parent_header: JSON | None
    content: JSON
    metadata: JSON
    buffers: tuple[bytes, ...] = ()

    @property
    def msg_type(self) -> str:
        return str(self.header["msg_type"])

    @property
    def msg_id(self) -> str:
        return str(self.header["msg_id"])

    @property
    def parent_msg_id(self) -> str | None:
        """The msg_id of the request this answers, if any."""
        return self.parent_header.get("msg_id") if self.parent_header else None


class SupervisorEvent:
    """An event of the supervisor about the session (a `"kind": "kernel"` frame)."""


@attrs.frozen
class StatusChanged(SupervisorEvent):
    """`status`: the session's status changed (`idle`, `busy`, `exited`, ...) and why."""

    status: str
    reason: str | None


@attrs.frozen
class KernelOutput(SupervisorEvent):
    """`output`: a line the kernel process wrote to its own stdout or stderr."""

    stream: str
    text: str


@attrs.frozen
class ExecutionQueued(SupervisorEvent):
    """`executionQueued`: an execute_request waits in the session's queue."""

    msg_id: str


@attrs.frozen
class ExecutionRequested(SupervisorEvent):
    """`executionRequested`: code is about to run on behalf of `source` (`api`: the agent
    API's execute), not this client's."""

    msg_id: str
    code: str
    source: str


@attrs.frozen
class WorkingDirChanged(SupervisorEvent):
    """`workingDirChanged`: the kernel's working directory after an execution."""

    path: str


@attrs.frozen
class ResourceUsage(SupervisorEvent):
    """`resourceUsage`: a sample of the kernel's process tree."""

    cpu_percent: int
    memory_bytes: int
    thread_count: int
    sampling_period_ms: int
    timestamp: int


@attrs.frozen
class KernelExited(SupervisorEvent):
    """`exited`: the kernel process ended with this exit code."""

    exit_code: int


@attrs.frozen
class ClientDisconnected(SupervisorEvent):
    """`clientDisconnected`: another client took the session over; the server closes this one."""

    reason: str


@attrs.frozen
class HandshakeCompleted(SupervisorEvent):
    """`handshakeCompleted`: a JEP 66 kernel registered its ports."""

    session_id: str
    connection_info: ConnectionInfo


@attrs.frozen
class EventsDropped(SupervisorEvent):
    """`eventsDropped`: the server dropped this many events this client was too slow for."""

    count: int


@attrs.frozen
class MessageRefused(SupervisorEvent):
    """`error`: the server refused a message this client sent (`msg_id` None: unreadable)."""

    code: str
    message: str
    msg_id: str | None


@attrs.frozen
class UnknownEvent(SupervisorEvent):
    """An event this client does not know (a newer server), as sent."""

    name: str
    payload: Any


ChannelEvent = KernelMessage | SupervisorEvent

_SUPERVISOR_EVENTS: dict[str, Callable[[Any], SupervisorEvent]] = {
    "status": lambda p: StatusChanged(p["status"], p.get("reason")),
    "output": lambda p: KernelOutput(p[0], p[1]),
    "executionQueued": ExecutionQueued,
    "executionRequested": lambda p: ExecutionRequested(p["msg_id"], p["code"], p["source"]),
    "workingDirChanged": WorkingDirChanged,
    "resourceUsage": lambda p: ResourceUsage(**p),
    "exited": KernelExited,
    "clientDisconnected": ClientDisconnected,
    "handshakeCompleted": lambda p: HandshakeCompleted(p[0], ConnectionInfo.from_dict(p[1])),
    "eventsDropped": EventsDropped,
    "error": lambda p: MessageRefused(p["code"], p["message"], p.get("msg_id")),
}


def decode_frame(frame: JSON) -> ChannelEvent:
    """The typed event of one decoded frame."""
    if frame.get("kind") != "kernel":
        buffers = frame.get("buffers")
        return KernelMessage(
            frame["channel"],
            frame["header"],
            frame.get("parent_header") or None,
            frame["content"],
            frame.get("metadata") or {},
            tuple(base64.b64decode(b) for b in buffers) if buffers else (),
        )
    [(name, payload)] = [(key, value) for key, value in frame.items() if key != "kind"]
    decode = _SUPERVISOR_EVENTS.get(name)
    return decode(payload) if decode else UnknownEvent(name, payload)


def message(
    msg_type: str,
    content: Mapping[str, Any],
    channel: str = "shell",
    *,
    parent_header: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> JSON:
    """A message for the kernel, as a client frame (a full header, as Positron sends it)."""
    return {
        "header": {
            "msg_id": new_msg_id(),
            "msg_type": msg_type,
            "session": CLIENT_SESSION,
            "username": os.environ.get("USER", ""),
            "date": utc_now(),
            "version": PROTOCOL_VERSION,
        },
        "parent_header": dict(parent_header) if parent_header else {},
        "channel": channel,
        "content": dict(content),
        "metadata": dict(metadata or {}),
        "buffers": [],
    }


def execute_request(code: str, *, allow_stdin: bool = False, silent: bool = False) -> JSON:
    return message(
        "execute_request",
        {
            "code": code,
            "silent": silent,
            "store_history": not silent,
            "user_expressions": {},
            "allow_stdin": allow_stdin,
            "stop_on_error": True,
        },
    )
