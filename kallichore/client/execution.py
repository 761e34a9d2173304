"""One execution's outcome, gathered from the events that follow its execute_request (sans-io).

An execution is over when both its execute_reply (shell) and the iopub `idle` status whose
parent it is have arrived; they race, so either may come first. Everything received meanwhile
is kept in order; the outputs are read from the messages whose parent is the request.
"""

from __future__ import annotations

from typing import Any

import attrs

from kallichore.client.errors import ApiError
from kallichore.client.events import ChannelEvent, KernelMessage, MessageRefused


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
    reply: KernelMessage
    # Every event received from sending the request to its end, in order (other clients'
    # requests and supervisor events included).
    events: tuple[ChannelEvent, ...]
    # False if the iopub idle never came (the caller gave up waiting for it).
    idle: bool
    # From sending the request to the last message of the execution.
    seconds: float

    @property
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


class Execution:
    """Follows one execution: feed it every event received after sending the request."""

    def __init__(self, msg_id: str, started: float) -> None:
        self.msg_id = msg_id
        self.started = started
        self.last = started
        self.events: list[ChannelEvent] = []
        self.reply: KernelMessage | None = None
        self.idle = False

    @property
    def done(self) -> bool:
        return self.idle and self.reply is not None

    def add(self, event: ChannelEvent, now: float) -> None:
        """Take one event received at `now`; raises `ApiError` if the server refused the request."""
        self.events.append(event)
        if isinstance(event, KernelMessage):
            parent = event.parent_header
            if parent is None or parent.get("msg_id") != self.msg_id:
                return
            self.last = now
            if event.channel == "shell":
                if event.header["msg_type"] == "execute_reply":
                    self.reply = event
            elif (
                event.channel == "iopub"
                and event.header["msg_type"] == "status"
                and event.content["execution_state"] == "idle"
            ):
                self.idle = True
        elif isinstance(event, MessageRefused) and event.msg_id == self.msg_id:
            raise ApiError(event.message, code=event.code)

    def result(self) -> ExecuteResult:
        """The outcome, once the reply is in (with or without the idle)."""
        assert self.reply is not None, "no execute_reply yet"
        return ExecuteResult(
            self.msg_id, self.reply, tuple(self.events), self.idle, self.last - self.started
        )
