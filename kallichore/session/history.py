"""A session's recent executions, whoever asked for them: the agent API's history.

Sans-io and cheap on the hot path: an execution is recorded by keeping references to its
request and to the kernel's messages about it (bounded by their bytes, never parsed); what a
client reads (`ExecutionHistory.entries`) is decoded only when asked, through the same
`OutputCollector` as a live execution, then clipped: so much text per execution, and in place
of images and other bulky MIME data a short placeholder.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs

from kallichore.jupyter.wire import JSONObject, Message, WireError
from kallichore.session.outputs import Item, OutcomeStatus, OutputCollector

# Executions kept per session.
MAX_EXECUTIONS = 100
# Bytes of the kernel's messages kept per execution (content and buffers as they came).
MAX_KEPT_BYTES = 32 * 1024
# Characters of output text shown per execution.
MAX_TEXT = 4096
# A request larger than this is not kept: its code is, clipped to this many characters.
MAX_REQUEST_BYTES = 64 * 1024
# MIME types shown as text (clipped); every other one becomes a placeholder.
_TEXT_MIME = ("text/", "application/json")


@attrs.define
class _Execution:
    msg_id: str
    # The request (decoded when asked), or the clipped code of a large one.
    request: Message | str
    source: str
    requested: float
    # When it reached the kernel, and when it ended (monotonic seconds).
    began: float | None = None
    ended: float | None = None
    messages: list[Message] = attrs.Factory(list)
    kept_bytes: int = 0
    clipped: bool = False
    replied: bool = False
    # Set by whoever knows better than the kernel's reply (a timeout, a drop from the queue).
    status: OutcomeStatus | None = None


class ExecutionHistory:
    """The last `max_executions` executions of one session, oldest first."""

    def __init__(
        self,
        max_executions: int = MAX_EXECUTIONS,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._max = max_executions
        self._clock = clock
        self._wall_clock = wall_clock
        self._executions: OrderedDict[str, _Execution] = OrderedDict()
        # Those whose messages are still to come, by msg_id (queued, running, or ended but with
        # the reply still on its way: shell and iopub race).
        self.open: dict[str, _Execution] = {}

    def __len__(self) -> int:
        return len(self._executions)

    @property
    def max_executions(self) -> int:
        return self._max

    def requested(self, request: Message, source: str) -> None:
        """An `execute_request` was sent or queued on behalf of `source` (`api`, `client`)."""
        msg_id = request.msg_id
        kept: Message | str = request
        if len(request.content_json) > MAX_REQUEST_BYTES:
            kept = _code(request)[:MAX_REQUEST_BYTES]
        execution = _Execution(msg_id, kept, source, self._wall_clock())
        self._executions[msg_id] = execution
        self.open[msg_id] = execution
        while len(self._executions) > self._max:
            old_id, _ = self._executions.popitem(last=False)
            self.open.pop(old_id, None)

    def began(self, msg_id: str) -> None:
        """The execution reached the kernel."""
        if (execution := self.open.get(msg_id)) is not None:
            execution.began = self._clock()

    def note(self, message: Message) -> None:
        """A message of the kernel whose parent is open (the caller checked `open`)."""
        msg_id = message.parent_msg_id or ""
        execution = self.open[msg_id]
        if message.msg_type == "execute_reply":
            execution.messages.append(message)
            execution.replied = True
            if execution.ended is not None:
                del self.open[msg_id]
            return
        size = len(message.content_json) + sum(len(buffer) for buffer in message.buffers)
        if execution.kept_bytes + size <= MAX_KEPT_BYTES:
            execution.messages.append(message)
            execution.kept_bytes += size
        elif message.msg_type != "status":
            execution.clipped = True

    def ended(self, msg_id: str, status: OutcomeStatus | None = None) -> None:
        """The execution is over (its idle came, its kernel exited, or it was dropped);
        `status` if the kernel's reply will not say it (`aborted`): then its reply is not
        waited for."""
        execution = self.open.get(msg_id)
        if execution is None:
            return
        if execution.ended is None:
            execution.ended = self._clock()
        if status is not None and execution.status is None:
            execution.status = status
        if execution.replied or status is not None:
            del self.open[msg_id]

    def mark(self, msg_id: str, status: OutcomeStatus) -> None:
        """What became of the execution, as its caller saw it (a `timeout`)."""
        if (execution := self._executions.get(msg_id)) is not None:
            execution.status = status

    def end_all(self) -> None:
        """The kernel is gone: whatever was open ended with it."""
        for msg_id in list(self.open):
            self.ended(msg_id, "aborted")

    def entries(self, limit: int | None = None) -> list[JSONObject]:
        """The last `limit` executions (all by default), most recent last, decoded now."""
        executions = list(self._executions.values())
        if limit is not None:
            executions = executions[-limit:] if limit > 0 else []
        return [self._entry(execution) for execution in executions]

    def _entry(self, execution: _Execution) -> JSONObject:
        collector = OutputCollector()
        for message in execution.messages:
            try:
                collector.feed(message.msg_type, message.content)
            except WireError:
                continue
        status = execution.status
        if status is None and execution.ended is not None and not execution.replied:
            status = "aborted"
        outcome = collector.outcome(status)
        request = execution.request
        code = request if isinstance(request, str) else _code(request)
        output, clipped = _clipped(outcome.output)
        entry: JSONObject = {
            "msg_id": execution.msg_id,
            "code": code,
            "status": "running" if status is None and execution.ended is None else outcome.status,
            "execution_count": outcome.execution_count,
            "started": datetime.fromtimestamp(execution.requested, UTC).isoformat(),
            "duration_ms": None,
            "source": execution.source,
            "output": output,
            "output_clipped": clipped or execution.clipped,
        }
        if execution.began is not None and execution.ended is not None:
            entry["duration_ms"] = round((execution.ended - execution.began) * 1000)
        return entry


def _code(request: Message) -> str:
    try:
        return str(request.content.get("code", ""))
    except WireError:
        return ""


def _clipped(output: list[Item]) -> tuple[list[Item], bool]:
    """`output` within `MAX_TEXT` characters of text, bulky MIME data as placeholders; every
    item but streams stays (clipped), so that what was displayed and what failed is seen."""
    budget = MAX_TEXT
    clipped = False
    kept: list[Item] = []

    def text(value: str) -> str:
        nonlocal budget, clipped
        if len(value) > budget:
            clipped = True
            value = value[:budget]
        budget -= len(value)
        return value

    for item in output:
        kind = item["type"]
        if kind == "stream":
            if shown := text(item["text"]):
                kept.append({**item, "text": shown})
        elif kind == "error":
            lines = [text(line) for line in item["error_traceback"]]
            kept.append({**item, "error_traceback": [line for line in lines if line]})
        else:
            kept.append({**item, "data": {k: _shown(k, v, text) for k, v in item["data"].items()}})
    return kept, clipped


def _shown(mime: str, value: Any, text: Callable[[str], str]) -> Any:
    if mime.startswith(_TEXT_MIME) and isinstance(value, str):
        return text(value)
    size = len(value) if isinstance(value, str) else None
    return f"[{mime} omitted{'' if size is None else f', {size} characters'}]"
