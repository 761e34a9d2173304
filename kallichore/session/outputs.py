"""One execution's outcome, from the kernel's messages: the agent API's output items.

`OutputCollector` is sans-io: it is fed the iopub messages of one `execute_request` and its
`execute_reply` (type and parsed content) and keeps the output as an agent wants it, in order,
with consecutive chunks of one stream merged and `clear_output` honoured (with `wait`, when the
next output arrives). Each `feed` also returns the item as it came (unmerged), for callers
that stream. `ExecutionOutcome` is the JSON every API (HTTP, MCP, command line) answers with.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from kallichore.jupyter.wire import JSONObject

Item = dict[str, Any]
OutcomeStatus = Literal["ok", "error", "timeout", "aborted"]

# The message types an execution's output is made of.
_DISPLAYED = frozenset(("display_data", "execute_result"))


@attrs.define
class ExecutionOutcome:
    """What became of one execution (Contract 1 of the agent API)."""

    status: OutcomeStatus
    execution_count: int | None = None
    output: list[Item] = attrs.Factory(list)
    # The execute_result's MIME bundle.
    data: JSONObject | None = None
    error_name: str | None = None
    error_message: str | None = None
    error_traceback: list[str] | None = None
    # A timeout had to restart the kernel: its state is gone.
    restarted: bool = False

    def to_json(self, *, with_output: bool = True) -> JSONObject:
        body: JSONObject = {"status": self.status, "execution_count": self.execution_count}
        if with_output:
            body["output"] = self.output
        if self.data is not None:
            body["data"] = self.data
        if self.error_name is not None:
            body["error_name"] = self.error_name
            body["error_message"] = self.error_message or ""
            body["error_traceback"] = self.error_traceback or []
        if self.restarted:
            body["restarted"] = True
        return body


class OutputCollector:
    """Collects one execution's output; see the module docstring."""

    def __init__(self) -> None:
        self.output: list[Item] = []
        self.data: JSONObject | None = None
        self.reply: JSONObject | None = None
        self._clear_when_next = False

    def feed(self, msg_type: str, content: JSONObject) -> Item | None:
        """Take one message of the execution; the output item it makes, as it came (None for
        messages that make none: status, execute_input, the reply)."""
        if msg_type == "execute_reply":
            self.reply = content
            return None
        if msg_type == "clear_output":
            wait = bool(content.get("wait"))
            if wait:
                self._clear_when_next = True
            else:
                self.output.clear()
            return {"type": "clear_output", "wait": wait}
        item = output_item(msg_type, content)
        if item is None:
            return None
        if self._clear_when_next:
            self.output.clear()
            self._clear_when_next = False
        last = self.output[-1] if self.output else None
        if (
            item["type"] == "stream"
            and last is not None
            and last["type"] == "stream"
            and last["stream_name"] == item["stream_name"]
        ):
            self.output[-1] = {**last, "text": last["text"] + item["text"]}
        else:
            self.output.append(item)
        if msg_type == "execute_result":
            self.data = item["data"]
        return item

    def outcome(self, status: OutcomeStatus | None = None) -> ExecutionOutcome:
        """The outcome: `status` if given (timeout, aborted), else the reply's."""
        reply = self.reply or {}
        error = next((i for i in reversed(self.output) if i["type"] == "error"), None)
        if status is None:
            replied = reply.get("status")
            status = replied if replied in ("ok", "error", "aborted") else "error"
        count = reply.get("execution_count")
        outcome = ExecutionOutcome(
            status=status,
            execution_count=count if isinstance(count, int) else None,
            output=list(self.output),
            data=self.data,
        )
        if reply.get("status") == "error" and "ename" in reply:
            outcome.error_name = str(reply["ename"])
            outcome.error_message = str(reply.get("evalue", ""))
            outcome.error_traceback = _strings(reply.get("traceback"))
        elif error is not None:
            outcome.error_name = error["error_name"]
            outcome.error_message = error["error_message"]
            outcome.error_traceback = error["error_traceback"]
        return outcome


def output_item(msg_type: str, content: JSONObject) -> Item | None:
    """The output item of one iopub message, or None if it is no output."""
    if msg_type == "stream":
        return {
            "type": "stream",
            "stream_name": str(content.get("name", "stdout")),
            "text": str(content.get("text", "")),
        }
    if msg_type in _DISPLAYED:
        return {
            "type": msg_type,
            "data": _object(content.get("data")),
            "metadata": _object(content.get("metadata")),
        }
    if msg_type == "error":
        return {
            "type": "error",
            "error_name": str(content.get("ename", "")),
            "error_message": str(content.get("evalue", "")),
            "error_traceback": _strings(content.get("traceback")),
        }
    return None


def _object(value: Any) -> JSONObject:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> list[str]:
    return [str(line) for line in value] if isinstance(value, list) else []
