"""Single-kernel mode: the agent-sandbox routes (`/health`, `/kernel/*`) on the session `default`.

Agent sandboxes wrap one kernel in a small web server; these routes give that shape over our
sessions, so an agent written for one works here, while the same kernel stays reachable
through every other API (a person's Positron, JupyterLab, a `jupyter console --existing`).
`kallichore --default-kernel NAME` creates and starts the session before the daemon serves;
without it the routes act on a session somebody created with the id `default`, if any.

What the sandboxes got wrong is not copied: every `/kernel/*` route needs the bearer token
(`/health` alone is open, as a probe must be), a request from a web page of another origin is
refused (as by every route: `routes.refuse_cross_origin`), so that a page cannot drive the
kernel of a daemon started with `--token none`, and no route answers with CORS headers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from kallichore.api.agent import AGENT_ROUTES, execute
from kallichore.api.exchange import ApiRequest, ApiResponse
from kallichore.api.jupyter import KernelConnections
from kallichore.api.models import ActiveSession, ErrorBody, ExecuteCode, StartupErrorBody
from kallichore.api.routes import Failure, Refused, Reply, RouteTable, json_response
from kallichore.api.single_kernel_models import (
    Health,
    KernelAction,
    KernelConnection,
    KernelReset,
    KernelStatus,
)
from kallichore.channels.kallichore_framing import wire_status
from kallichore.errors import ErrorCode, KallichoreError
from kallichore.jupyter.connection import write_json_file
from kallichore.jupyter.kernelspec import KernelSpec
from kallichore.session.kernel_session import KernelSession
from kallichore.session.model import SessionSpec, Status
from kallichore.supervisor import Supervisor

DEFAULT_SESSION_ID = "default"
# The statuses of a kernel that answers: `/health` is 200 for these alone.
_ALIVE = (Status.IDLE, Status.BUSY)


async def start_default_kernel(
    supervisor: Supervisor, kernelspec: KernelSpec, working_directory: Path
) -> KernelSession:
    """The session `default` running `kernelspec`, started (raises `StartupError` if it
    cannot be). A session of that id taken up again from a state directory is kept as it is,
    and started if its kernel is gone."""
    try:
        session = supervisor.get(DEFAULT_SESSION_ID)
    except KallichoreError:
        spec = SessionSpec.from_kernelspec(
            DEFAULT_SESSION_ID, kernelspec, working_directory=str(working_directory)
        )
        session = await supervisor.create_session(spec)
    await session.start()
    return session


@attrs.define
class ConnectionFiles:
    """The connection files handed out by `/kernel/connection`: `kernel_name` and where the
    default kernel listens now, written 0600 in the supervisor's runtime directory (0700),
    rewritten when a restart moved the kernel's ports, removed once the kernel is found gone
    and when the server stops."""

    supervisor: Supervisor
    _written: dict[Path, dict[str, Any]] = attrs.field(factory=dict, init=False)

    def current(self, session: KernelSession) -> tuple[Path, dict[str, Any]] | None:
        """The file of `session`'s kernel and what it holds; None while no kernel runs."""
        path = self.supervisor.runtime_dir / f"connection-{session.session_id}.json"
        info = session.connection_info
        if info is None or not session.is_running:
            self._remove(path)
            return None
        config = {**info.to_dict(), "kernel_name": session.spec.kernel_name}
        if self._written.get(path) != config:
            write_json_file(path, config)
            if path not in self._written:
                self.supervisor.footprint.add_path(path)
            self._written[path] = config
        return path, config

    def of_running(self, session: KernelSession) -> tuple[Path, dict[str, Any]]:
        """As `current`, for a kernel that must be running (else `KS-3`)."""
        found = self.current(session)
        if found is None:
            raise KallichoreError(
                ErrorCode.SESSION_NOT_RUNNING, f"session {session.session_id} is not running"
            )
        return found

    def remove_all(self) -> None:
        for path in list(self._written):
            self._remove(path)

    def _remove(self, path: Path) -> None:
        if self._written.pop(path, None) is not None:
            path.unlink(missing_ok=True)
            self.supervisor.footprint.discard_path(path)


@attrs.frozen
class SingleKernelApi:
    """What the handlers work on. `describe` is the Kallichore API's view of a session
    (`/kernel/debug`); `connections` counts a kernel's Jupyter channel connections."""

    supervisor: Supervisor
    describe: Callable[[KernelSession], ActiveSession]
    connections: KernelConnections
    files: ConnectionFiles

    def default_session(self) -> KernelSession | None:
        try:
            return self.supervisor.get(DEFAULT_SESSION_ID)
        except KallichoreError:
            return None

    def session(self) -> KernelSession:
        """The default session, or a 404 that says how to have one."""
        session = self.default_session()
        if session is None:
            raise Refused(
                ErrorBody(
                    ErrorCode.SESSION_NOT_FOUND.wire,
                    f"there is no session {DEFAULT_SESSION_ID!r}: start the daemon with "
                    "--default-kernel NAME, or create a session with that id",
                ),
                404,
            )
        return session


def alive(session: KernelSession | None) -> bool:
    return session is not None and session.is_running and session.status in _ALIVE


SINGLE_KERNEL_ROUTES = RouteTable("single")

_NO_SESSION = Reply(ErrorBody, "There is no session `default` (`KS-1`).")


def _route(method: str, path: str, **fields: Any) -> Callable[..., Any]:
    """A `/kernel/*` route: it needs the token, and may find no default session."""
    replies = {404: _NO_SESSION, **fields.pop("replies", {})}
    return SINGLE_KERNEL_ROUTES.route(
        method, path, tag="single-kernel", protected=True, replies=replies, **fields
    )


@SINGLE_KERNEL_ROUTES.route(
    "GET",
    "/health",
    operation_id="health",
    tag="single-kernel",
    summary="Is the default kernel alive?",
    description=(
        "Open (no token), for probes. Healthy while the session `default` has a kernel that "
        "answers (`idle` or `busy`); unhealthy while it starts, has missed heartbeats, has "
        "exited (a killed kernel is seen at once), or while there is no such session."
    ),
    ok=Reply(Health, "The kernel is alive."),
    replies={503: Reply(Health, "The kernel is not alive (`status` is `unhealthy`).")},
)
async def health(api: SingleKernelApi) -> ApiResponse | Health:
    session = api.default_session()
    if alive(session):
        assert session is not None
        return Health("healthy", True, session.process_id)
    pid = session.process_id if session is not None else None
    # Probes ask every few seconds: their answer is not a failure to log each time.
    return attrs.evolve(json_response(Health("unhealthy", False, pid), 503), quiet=True)


# The agent API's execute route, whose body, answers and handler `/kernel/execute` shares.
_EXECUTE = next(route for route in AGENT_ROUTES.routes if route.handler is execute)


@_route(
    "POST",
    "/kernel/execute",
    operation_id="singleKernelExecute",
    summary="Run code on the default kernel and get its outcome",
    description=(
        "As `POST /sessions/default/execute`: through the session's execution queue, with "
        "its timeout, and an ndjson stream when asked with `Accept: application/x-ndjson`."
    ),
    takes_request=True,
    body=_EXECUTE.body,
    ok=_EXECUTE.ok,
    failure=_EXECUTE.failure,
)
async def kernel_execute(api: SingleKernelApi, body: ExecuteCode, request: ApiRequest) -> Any:
    return await execute(api, api.session(), body, request)


@_route(
    "POST",
    "/kernel/reset",
    operation_id="singleKernelReset",
    summary="Restart the default kernel: its state is gone",
    description=(
        "As `POST /sessions/default/restart` (a kernel that is not running is started), "
        "answered with the old and new pids and the connection file of the new kernel."
    ),
    ok=Reply(KernelReset, "The new kernel is connected and ready."),
    failure=Failure(
        500,
        "The new kernel could not be started, or a start or restart is already in progress "
        "(`KS-13`).",
        StartupErrorBody,
    ),
)
async def reset_kernel(api: SingleKernelApi) -> KernelReset:
    session = api.session()
    old_pid = session.process_id
    await session.restart()
    path, _ = api.files.of_running(session)
    return KernelReset(
        "success",
        "the kernel was restarted: its variables and imports are gone",
        old_pid,
        session.process_id,
        str(path),
    )


@_route(
    "POST",
    "/kernel/interrupt",
    operation_id="singleKernelInterrupt",
    summary="Interrupt the default kernel",
    description="As `POST /sessions/default/interrupt`: by signal or message, per its spec.",
    ok=Reply(KernelAction, "The signal or `interrupt_request` was sent."),
    failure=Failure(
        400,
        "The kernel is not running or cannot be reached (`KS-10`).",
        code=ErrorCode.SESSION_INTERRUPT_FAILED,
    ),
)
async def interrupt_kernel(api: SingleKernelApi) -> KernelAction:
    await api.session().interrupt()
    return KernelAction("success", "the kernel was interrupted")


@_route(
    "GET",
    "/kernel/connection",
    operation_id="singleKernelConnection",
    summary="A connection file for the default kernel",
    description=(
        "A real connection file (mode 0600, in the daemon's private runtime directory) of the "
        "running kernel, for `jupyter console --existing PATH` or jupyter_client beside us. "
        "Such clients talk to the kernel directly: their executions bypass the session's "
        "queue. A restart may move the kernel's ports: ask again after one."
    ),
    ok=Reply(KernelConnection, "The file's path and contents (the signing key included)."),
    failure=Failure(400, "The kernel is not running (`KS-3`)."),
)
async def kernel_connection(api: SingleKernelApi) -> KernelConnection:
    path, config = api.files.of_running(api.session())
    return KernelConnection(str(path), config)


@_route(
    "GET",
    "/kernel/status",
    operation_id="singleKernelStatus",
    summary="The default kernel at a glance",
    description=(
        "`client_connected`: a client is attached to the session's Kallichore channels, or "
        "to its Jupyter channels. `connection_file` is left out while no kernel runs."
    ),
    ok=Reply(KernelStatus, "The kernel's state."),
)
async def kernel_status(api: SingleKernelApi) -> KernelStatus:
    session = api.session()
    found = api.files.current(session)
    return KernelStatus(
        alive=alive(session),
        pid=session.process_id,
        status=wire_status(session.status),
        client_connected=session.connected or api.connections.connections(session) > 0,
        connection_file=None if found is None else str(found[0]),
    )


@_route(
    "GET",
    "/kernel/debug",
    operation_id="singleKernelDebug",
    summary="The default session's details",
    description="As `GET /sessions/default` with the token.",
    ok=Reply(ActiveSession, "The session."),
)
async def kernel_debug(api: SingleKernelApi) -> ActiveSession:
    return api.describe(api.session())
