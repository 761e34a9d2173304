"""The agent API: run code in one call and get its outcome (`/sessions/{id}/execute`), and see
what ran on a session lately, whoever ran it (`/sessions/{id}/history`).

The routes are thin: `KernelSession.run_code` does the work (queue, timeout, interrupt,
restart) and says what became of the execution; they parse the body, and answer with the
outcome as one JSON object, or, when asked with `Accept: application/x-ndjson`, with each
output item as it comes and the outcome last. Errors are the Kallichore API's (bearer token,
empty 401/404, the error object for 400).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

import trio

from kallichore.api.exchange import ApiRequest, ApiResponse
from kallichore.api.models import ErrorBody, ExecuteCode
from kallichore.api.routes import (
    Empty,
    Failure,
    NotFound,
    PathParameter,
    Refused,
    Reply,
    RouteTable,
    bad_body,
)
from kallichore.errors import ErrorCode, KallichoreError
from kallichore.session.history import MAX_EXECUTIONS, MAX_TEXT
from kallichore.session.kernel_session import KernelSession
from kallichore.session.outputs import ExecutionOutcome, Item
from kallichore.supervisor import Supervisor

NDJSON = "application/x-ndjson"


class HasSupervisor(Protocol):
    """A route table's context that can find sessions."""

    @property
    def supervisor(self) -> Supervisor: ...


def session_by_id(api: HasSupervisor, session_id: str) -> KernelSession:
    """The session a path names (a 404 if there is none)."""
    try:
        return api.supervisor.get(session_id)
    except KallichoreError:
        raise NotFound(session_id) from None


SESSION_PARAMETER = PathParameter(
    "session",
    "The id the session was created with.",
    session_by_id,
    missing=Reply(Empty, "There is no session with this id (empty body)."),
)

AGENT_ROUTES = RouteTable("agent", parameters={"session_id": SESSION_PARAMETER})

_ITEM = {
    "type": "object",
    "description": (
        "One output item, by `type`: `stream` (`stream_name`, `text`; consecutive chunks of "
        "one stream merged), `display_data` and `execute_result` (`data`, `metadata`: MIME "
        "bundles, binary types base64 as the kernel sent them), `error` (`error_name`, "
        "`error_message`, `error_traceback`). When streamed, streams are not merged, and "
        "`clear_output` (`wait`) items say when to clear what came before."
    ),
    "required": ["type"],
    "properties": {
        "type": {
            "type": "string",
            "enum": ["stream", "display_data", "execute_result", "error", "clear_output"],
        }
    },
}
_OUTCOME_FIELDS: dict[str, Any] = {
    "status": {"type": "string", "enum": ["ok", "error", "timeout", "aborted"]},
    "execution_count": {"type": "integer", "nullable": True},
    "data": {"type": "object", "description": "The execute_result's MIME bundle."},
    "error_name": {"type": "string"},
    "error_message": {"type": "string"},
    "error_traceback": {"type": "array", "items": {"type": "string"}},
    "restarted": {
        "type": "boolean",
        "description": "Only when true: the timeout restarted the kernel (its state is gone).",
    },
}
OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "What became of the execution.",
    "required": ["status", "execution_count", "output"],
    "properties": {**_OUTCOME_FIELDS, "output": {"type": "array", "items": _ITEM}},
}

_EXECUTE_DESCRIPTION = """\
Runs `code` through the session's execution queue (so it never interleaves with another
client's executions) and answers when it has ended. A client attached to the session's
channels sees it: an `executionRequested` event (`msg_id`, `code`, `source: "api"`), then the
kernel's messages. The kernel may not ask for input.

`status` is the kernel's (`ok`, `error`, `aborted`), `aborted` also when the kernel exited or an
interrupt dropped the queued execution, or `timeout`: after `timeout_seconds`, an execution
still queued is withdrawn; one running is interrupted and, if it has not ended within the
server's interrupt grace period (5 s by default), the kernel is restarted (`restarted`).

With `Accept: application/x-ndjson` the answer is a stream of JSON lines: each output item as
it comes, then `{"type": "result", ...}`, the outcome without `output`."""


@AGENT_ROUTES.route(
    "POST",
    "/sessions/{session_id}/execute",
    operation_id="executeCode",
    tag="agent",
    summary="Run code and get its outcome",
    description=_EXECUTE_DESCRIPTION,
    protected=True,
    takes_request=True,
    body=ExecuteCode,
    ok=Reply(OUTCOME_SCHEMA, "The execution's outcome (or its ndjson stream)."),
    failure=Failure(
        400,
        bad_body(ExecuteCode) + ", `timeout_seconds` is not positive (code `400`), or the "
        "session's kernel is not running or still starting (`KS-3`).",
    ),
)
async def execute(
    api: HasSupervisor, session: KernelSession, body: ExecuteCode, request: ApiRequest
) -> Any:
    body.check()
    if NDJSON in (request.header("accept") or ""):
        if not session.is_running:
            raise KallichoreError(
                ErrorCode.SESSION_NOT_RUNNING, f"session {session.session_id} is not running"
            )
        return ApiResponse(200, content_type=NDJSON, stream=StreamedExecution(session, body))
    outcome = await run(session, body)
    return outcome.to_json()


async def run(
    session: KernelSession, body: ExecuteCode, on_item: Callable[[Item], None] | None = None
) -> ExecutionOutcome:
    """`body` run on `session`."""
    return await session.run_code(
        body.code,
        silent=body.silent,
        store_history=body.store_history,
        stop_on_error=body.stop_on_error,
        timeout=body.timeout_seconds,
        on_item=on_item,
    )


class StreamedExecution:
    """An ndjson body: the execution runs in a nursery the body opens and closes (in the task
    that sends the response), its items passed on as lines as they come."""

    def __init__(self, session: KernelSession, body: ExecuteCode) -> None:
        self._session = session
        self._body = body
        self._stack = contextlib.AsyncExitStack()
        self._lines: trio.MemoryReceiveChannel[bytes]

    async def __aenter__(self) -> trio.MemoryReceiveChannel[bytes]:
        send, self._lines = trio.open_memory_channel[bytes](math.inf)
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(self._run, send)
        return self._lines

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lines.close()
        await self._stack.__aexit__(exc_type, exc, tb)

    async def _run(self, send: trio.MemorySendChannel[bytes]) -> None:
        def line(item: Item) -> None:
            # The reader is gone (the client hung up): the execution goes on regardless.
            with contextlib.suppress(trio.BrokenResourceError):
                send.send_nowait(json.dumps(item).encode() + b"\n")

        async with send:
            try:
                outcome = await run(self._session, self._body, line)
            except KallichoreError as error:
                # The kernel went away between the check and the run: too late for a 400.
                line(
                    {
                        "type": "result",
                        "status": "aborted",
                        "execution_count": None,
                        "message": error.message,
                    }
                )
                return
            line({"type": "result", **outcome.to_json(with_output=False)})


_HISTORY_ENTRY = {
    "type": "object",
    "description": (
        "One execution: `started` is when it was asked for (ISO 8601, UTC), `duration_ms` how "
        "long it ran at the kernel (null until it ended), `status` also `running`; `output` "
        f"is clipped to {MAX_TEXT} characters of text, other MIME data (images) shown as a "
        "placeholder (`output_clipped` says if anything was left out)."
    ),
    "required": [
        "msg_id",
        "code",
        "status",
        "execution_count",
        "started",
        "duration_ms",
        "source",
        "output",
        "output_clipped",
    ],
    "properties": {
        "msg_id": {"type": "string"},
        "code": {"type": "string"},
        "status": {"type": "string", "enum": ["ok", "error", "timeout", "aborted", "running"]},
        "execution_count": {"type": "integer", "nullable": True},
        "started": {"type": "string", "format": "date-time"},
        "duration_ms": {"type": "integer", "nullable": True},
        "source": {
            "type": "string",
            "description": "`api` (this API's execute) or `client` (over a channels API).",
        },
        "output": {"type": "array", "items": _ITEM},
        "output_clipped": {"type": "boolean"},
    },
}


@AGENT_ROUTES.route(
    "GET",
    "/sessions/{session_id}/history",
    operation_id="executionHistory",
    tag="agent",
    summary="List the session's last executions",
    description=(
        f"The last executions (at most {MAX_EXECUTIONS} are kept), most recent last: those of "
        "`execute` and those clients sent over the channels (both APIs)."
    ),
    protected=True,
    takes_request=True,
    ok=Reply({"type": "array", "items": _HISTORY_ENTRY}, "The executions, oldest first."),
    replies={400: Reply(ErrorBody, f"`limit` is not an integer from 1 to {MAX_EXECUTIONS}.")},
    extensions={
        "parameters": [
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "description": "Only the last `limit` executions.",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_EXECUTIONS},
            }
        ]
    },
)
async def history(api: HasSupervisor, session: KernelSession, request: ApiRequest) -> Any:
    limit = request.argument("limit")
    if limit is None:
        return session.history.entries()
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_EXECUTIONS:
        raise Refused(
            ErrorBody("400", f"limit must be an integer from 1 to {MAX_EXECUTIONS}, not {limit!r}")
        )
    return session.history.entries(int(limit))
