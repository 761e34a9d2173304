"""One execution's outcome, gathered from the frames that follow its execute_request (sans-io).

An execution is over when both its execute_reply (shell) and the iopub `idle` status whose
parent it is have arrived; they race, so either may come first. Everything received meanwhile
is kept in order; the outputs are read from the messages whose parent is the request.

Following an execution looks at a frame's parent header and nothing else: events are built
only when the result is read, so that a round trip costs the client no more than the JSON.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import attrs

from kallichore.client.errors import ApiError
from kallichore.client.events import JSON, ChannelEvent, KernelMessage, decode_frame


@attrs.frozen
class ExecutionError:
    """The exception an execution raised, as the kernel reported it."""

    name: str
    value: str
    traceback: list[str]


@attrs.frozen
class ExecuteResult:
    """What running one piece of code produced."""

    msg_id: str
    # Every frame received from sending the request to its end, in order (other clients'
    # requests and supervisor events included), as decoded JSON.
    frames: tuple[JSON, ...]
    reply_frame: JSON
    # False if the iopub idle never came (the caller gave up waiting for it).
    idle: bool
    # From sending the request to the last message of the execution.
    seconds: float

    @cached_property
    def events(self) -> tuple[ChannelEvent, ...]:
        """Every event received meanwhile, typed."""
        return tuple(decode_frame(frame) for frame in self.frames)

    @cached_property
    def reply(self) -> KernelMessage:
        reply = decode_frame(self.reply_frame)
        assert isinstance(reply, KernelMessage)
        return reply

    @cached_property
    def messages(self) -> list[KernelMessage]:
        """The kernel messages whose parent is this execution's request."""
        own = self.msg_id
        return [e for e in self.events if isinstance(e, KernelMessage) and e.parent_msg_id == own]

    @property
    def status(self) -> str:
        """The reply's status: `ok`, `error` or `aborted`."""
        return str(self.reply.content.get("status"))

    @property
    def execution_count(self) -> int | None:
        count: int | None = self.reply.content.get("execution_count")
        return count

    def stream(self, name: str = "stdout") -> str:
        """All the text of one output stream (`stdout` or `stderr`)."""
        return "".join(
            m.content["text"]
            for m in self.messages
            if m.msg_type == "stream" and m.content.get("name") == name
        )

    @property
    def stdout(self) -> str:
        return self.stream("stdout")

    @property
    def stderr(self) -> str:
        return self.stream("stderr")

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The mime bundles of display_data and execute_result, in order."""
        return [
            m.content["data"]
            for m in self.messages
            if m.msg_type in ("display_data", "execute_result", "update_display_data")
        ]

    @property
    def error(self) -> ExecutionError | None:
        """The exception it raised (from the iopub `error` message, else the reply), if any."""
        for m in self.messages:
            if m.msg_type == "error":
                return _execution_error(m.content)
        if self.status == "error":
            return _execution_error(self.reply.content)
        return None


def _execution_error(content: dict[str, Any]) -> ExecutionError:
    return ExecutionError(
        str(content.get("ename", "")),
        str(content.get("evalue", "")),
        list(content.get("traceback", [])),
    )


class ExecutionTracker:
    """Follows one execution: feed it every frame received after sending the request."""

    def __init__(self, msg_id: str, started: float) -> None:
        self.msg_id = msg_id
        self.started = started
        self.last = started
        self.frames: list[JSON] = []
        self.reply: JSON | None = None
        self.idle = False

    @property
    def done(self) -> bool:
        return self.idle and self.reply is not None

    def add(self, frame: JSON, now: float) -> None:
        """Take one frame received at `now`; raises `ApiError` if the server refused ours."""
        parent = frame.get("parent_header")
        own = parent is not None and parent.get("msg_id") == self.msg_id
        self.keep(frame, own)
        if own:
            self.last = now
            channel = frame["channel"]
            if channel == "shell":
                if frame["header"]["msg_type"] == "execute_reply":
                    self.reply = frame
            elif (
                channel == "iopub"
                and frame["header"]["msg_type"] == "status"
                and frame["content"]["execution_state"] == "idle"
            ):
                self.idle = True
        elif frame.get("kind") == "kernel" and "error" in frame:
            error = frame["error"]
            if error.get("msg_id") == self.msg_id:
                raise ApiError(error["message"], code=error["code"])

    def keep(self, frame: JSON, own: bool) -> None:
        """Store a frame for the result (`own`: its parent is the request).

        A caller that only counts can keep less: keeping every frame of a flood of output
        costs memory and time.
        """
        self.frames.append(frame)

    def result(self) -> ExecuteResult:
        """The outcome, once the reply is in (with or without the idle)."""
        assert self.reply is not None, "no execute_reply yet"
        return ExecuteResult(
            self.msg_id, tuple(self.frames), self.reply, self.idle, self.last - self.started
        )
