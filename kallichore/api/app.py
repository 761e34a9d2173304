"""The Kallichore HTTP API: its route table, and the dispatcher that serves every API.

Each route is one entry (`ROUTES`) holding what it does and what it answers; the handlers
call the supervisor or a session and return the model the spec says: `null` for actions, the
error object with `KS-n` codes for failures, StartupError for failed starts, empty 401/404
bodies. No route touches ZeroMQ or a process directly, nor the daemon: what the API may change
about the server's life goes through `ServerControl`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import attrs

from kallichore import __version__
from kallichore.api import models
from kallichore.api.agent import AGENT_ROUTES, SESSION_PARAMETER
from kallichore.api.dispatch import Dispatcher
from kallichore.api.exchange import ApiResponse
from kallichore.api.jupyter import (
    JUPYTER_ROUTES,
    JupyterApi,
    JupyterSettings,
    KernelConnections,
    NoConnections,
    kernelspecs,
)
from kallichore.api.models import (
    ActiveSession,
    BodyError,
    ClientHeartbeat,
    ErrorBody,
    ExecutionQueueBody,
    NewSession,
    NewSessionReply,
    RestartSession,
    ServerConfiguration,
    ServerConfigurationBody,
    ServerStatus,
    SessionList,
    StartupErrorBody,
)
from kallichore.api.openapi import openapi_document
from kallichore.api.routes import (
    Empty,
    Failure,
    Null,
    Refused,
    Reply,
    RouteTable,
    bad_body,
    bearer_token_matches,
)
from kallichore.api.single_kernel import (
    SINGLE_KERNEL_ROUTES,
    ConnectionFiles,
    SingleKernelApi,
)
from kallichore.channels.kallichore_framing import queued_message, wire_status
from kallichore.errors import ErrorCode, KallichoreError
from kallichore.jupyter.connection import ConnectionInfo
from kallichore.session.kernel_session import KernelSession
from kallichore.session.launch.options import LocalLauncher
from kallichore.session.model import SessionSpec, Status
from kallichore.supervisor import Supervisor

logger = logging.getLogger(__name__)


@attrs.define
class ServerState:
    """What the API knows about the server beyond its sessions."""

    token: str | None
    server_id: str = attrs.Factory(lambda: secrets.token_hex(8))
    started: float = attrs.Factory(time.time)
    started_monotonic: float = attrs.Factory(time.monotonic)
    log_level: str | None = "info"
    jupyter: JupyterSettings = attrs.Factory(JupyterSettings)


class ServerControl(Protocol):
    """What the daemon lets the API see and change of the server's life."""

    @property
    def idle_shutdown_hours(self) -> int | None:
        """The idle-shutdown period in hours; None while idle shutdown is off."""

    def set_idle_shutdown_hours(self, hours: int | None) -> None:
        """A new idle-shutdown period (None: off), counted from now."""

    def note_client(self, process_id: int) -> None:
        """The client process whose life keeps the server up."""

    def request_shutdown(self) -> None:
        """Stop every kernel, then the server."""


class ChannelSockets(Protocol):
    """Per-session channel sockets (the socket transport), provided by the server layer."""

    async def open(self, session: KernelSession) -> Path: ...

    def path(self, session_id: str) -> Path | None: ...

    def close(self, session_id: str) -> None: ...


@attrs.frozen
class KallichoreApi:
    """What the handlers work on."""

    supervisor: Supervisor
    state: ServerState
    control: ServerControl
    sockets: ChannelSockets | None = None

    def close_channel_socket(self, session: KernelSession) -> None:
        """A session that lost its kernel, or is gone, has no channel socket left open."""
        if self.sockets is not None:
            self.sockets.close(session.session_id)


def check_token(state: ServerState, authorization: str | None) -> bool:
    return bearer_token_matches(state.token, authorization)


def active_session(session: KernelSession, sockets: ChannelSockets | None) -> ActiveSession:
    queue = session.execution_queue
    now = time.monotonic()
    return ActiveSession(
        session_id=session.session_id,
        argv=list(session.spec.argv),
        process_id=session.process_id,
        launcher=session.location,
        username=session.spec.username,
        display_name=session.spec.display_name,
        language=session.spec.language,
        interrupt_mode=session.spec.interrupt_mode,
        initial_env=session.initial_env,
        connected=session.connected,
        started=models.rfc3339(session.created),
        session_mode=session.spec.session_mode,
        working_directory=session.working_directory,
        notebook_uri=session.spec.notebook_uri,
        input_prompt=session.input_prompt,
        continuation_prompt=session.continuation_prompt,
        execution_queue=ExecutionQueueBody(
            length=len(queue),
            pending=[queued_message(m) for m in queue.pending],
            active=queued_message(queue.active) if queue.active else None,
        ),
        status=wire_status(session.status),
        kernel_info=session.kernel_info,
        resource_usage=session.resource_usage.to_dict() if session.resource_usage else None,
        idle_seconds=int(now - session.idle_since) if session.idle_since is not None else 0,
        busy_seconds=int(now - session.busy_since) if session.busy_since is not None else 0,
        socket_path=_socket_path(session, sockets),
        kernel_id=session.spec.kernel_id,
    )


def public_view(session: ActiveSession) -> ActiveSession:
    """A session as anyone on the machine may see it, without the token: no environment,
    command line, paths or code, which may hold secrets; what identifies it and its state."""
    return attrs.evolve(
        session,
        argv=[],
        initial_env={},
        working_directory="",
        notebook_uri=None,
        execution_queue=ExecutionQueueBody(length=session.execution_queue.length, pending=[]),
        socket_path=None,
    )


def _socket_path(session: KernelSession, sockets: ChannelSockets | None) -> str | None:
    if sockets is None or not session.connected:
        return None
    path = sockets.path(session.session_id)
    return str(path) if path else None


def argv_problem(argv: list[str]) -> str | None:
    """Kallichore checks at creation that the kernel program exists."""
    if not argv:
        return None
    program = argv[0]
    if os.path.isabs(program):
        return None if os.path.isfile(program) else f"kernel program {program!r} does not exist"
    return None if shutil.which(program) else f"kernel program {program!r} was not found on PATH"


def launching_kernelspec(spec: SessionSpec, name: str, *, own_launcher: bool) -> SessionSpec:
    """`spec` made to launch the kernelspec `name`: a client that knows a kernel by name need
    not know the server's paths and interpreters (`python` in a kernelspec is the server's).
    `own_launcher`: the request chose the launcher, which overrides the kernelspec's."""
    if spec.argv:
        raise BodyError("give either argv or kernel_name, not both")
    specs = kernelspecs()
    kernelspec = specs.get(name.lower())
    if kernelspec is None:
        raise BodyError(f"no kernelspec is named {name!r}; there are: {', '.join(sorted(specs))}")
    requested = {"launcher": spec.launcher} if own_launcher else {}
    try:
        launched = SessionSpec.from_kernelspec(spec.session_id, kernelspec, **requested)
    except KallichoreError as exc:
        raise BodyError(f"kernelspec {name!r}: {exc.message}") from None
    return attrs.evolve(
        spec,
        argv=launched.argv,
        env=launched.env + spec.env,
        interrupt_mode=launched.interrupt_mode,
        kernel_name=launched.kernel_name,
        launcher=launched.launcher,
        display_name=spec.display_name or launched.display_name,
        language=spec.language or launched.language,
    )


def server_status(supervisor: Supervisor, state: ServerState) -> ServerStatus:
    sessions = supervisor.sessions()
    now = time.monotonic()
    uptime = now - state.started_monotonic
    busy = [s for s in sessions if s.status is Status.BUSY]
    idle_since = [s.idle_since for s in sessions if s.status is not Status.BUSY and s.idle_since]
    idle_seconds = now - max(idle_since) if idle_since else 0
    if not sessions:
        idle_seconds = uptime
    busy_since = [s.busy_since for s in busy if s.busy_since is not None]
    return ServerStatus(
        sessions=len(sessions),
        active=sum(1 for s in sessions if s.status is not Status.EXITED),
        busy=bool(busy),
        idle_seconds=int(idle_seconds),
        busy_seconds=int(now - min(busy_since)) if busy_since else 0,
        uptime_seconds=int(uptime),
        version=__version__,
        process_id=os.getpid(),
        started=models.rfc3339(state.started),
        server_id=state.server_id,
    )


# -- the routes --------------------------------------------------------------------------------

ROUTES = RouteTable("kallichore", parameters={"session_id": SESSION_PARAMETER})
_KERNEL_INFO: dict[str, Any] = {
    "type": "object",
    "description": "The content of the kernel's `kernel_info_reply`.",
}
_STARTUP_FAILED = "The kernel could not be started."
_PUBLIC_VIEW = (
    "Without the token (a deviation from Kallichore, which shows everything), `argv`, "
    "`initial_env`, `working_directory` and the execution queue's messages are empty and "
    "`notebook_uri` and `socket_path` are left out: they may hold secrets."
)


@ROUTES.route(
    "GET",
    "/sessions",
    operation_id="listSessions",
    tag="sessions",
    summary="List the sessions",
    description=_PUBLIC_VIEW,
    token_optional=True,
    ok=Reply(SessionList, "Every session, exited ones included."),
)
async def list_sessions(api: KallichoreApi, authorized: bool) -> SessionList:
    sessions = [active_session(s, api.sockets) for s in api.supervisor.sessions()]
    if not authorized:
        sessions = [public_view(s) for s in sessions]
    return SessionList(total=len(sessions), sessions=sessions)


@ROUTES.route(
    "PUT",
    "/sessions",
    operation_id="newSession",
    tag="sessions",
    summary="Create a session",
    description="Nothing is launched until the session is started.",
    protected=True,
    body=NewSession,
    ok=Reply(NewSessionReply, "The session was created."),
    failure=Failure(
        400,
        bad_body(NewSession) + ", the session id is invalid (`KS-9`), `argv[0]` was not found "
        "(`KS-19`), `kernel_name` names no kernelspec or comes with an `argv` (`400`), or the "
        "id is taken (`KS-0`).",
    ),
)
async def new_session(api: KallichoreApi, body: NewSession) -> NewSessionReply:
    spec = body.to_spec()
    if body.kernel_name is not None:
        spec = launching_kernelspec(spec, body.kernel_name, own_launcher=body.launcher is not None)
    # A remote kernel's program is looked for where it runs, not here.
    elif isinstance(spec.launcher, LocalLauncher) and (problem := argv_problem(body.argv)):
        raise KallichoreError(ErrorCode.KERNEL_PATH_NOT_FOUND, problem)
    session = await api.supervisor.create_session(spec)
    return NewSessionReply(session.session_id)


@ROUTES.route(
    "GET",
    "/sessions/{session_id}",
    operation_id="getSession",
    tag="sessions",
    summary="Get a session",
    description=_PUBLIC_VIEW,
    token_optional=True,
    ok=Reply(ActiveSession, "The session."),
)
async def get_session(
    api: KallichoreApi, session: KernelSession, authorized: bool
) -> ActiveSession:
    view = active_session(session, api.sockets)
    return view if authorized else public_view(view)


@ROUTES.route(
    "DELETE",
    "/sessions/{session_id}",
    operation_id="deleteSession",
    tag="sessions",
    summary="Delete a session",
    description="Only a session whose kernel is not running can be deleted.",
    protected=True,
    ok=Reply(Null, "The session is gone; an attached client was closed (1001)."),
    failure=Failure(400, "The session's kernel is running (`KS-2`)."),
)
async def delete_session(api: KallichoreApi, session: KernelSession) -> None:
    await api.supervisor.delete(session.session_id)
    api.close_channel_socket(session)


@ROUTES.route(
    "POST",
    "/sessions/{session_id}/start",
    operation_id="startSession",
    tag="sessions",
    summary="Start the session's kernel",
    description=(
        "Launches the kernel and waits until it is connected and has answered a "
        "`kernel_info_request`, within the session's `connection_timeout`. A "
        "kernel already running is left alone and its kernel info returned."
    ),
    protected=True,
    ok=Reply(_KERNEL_INFO, "The kernel is connected and ready."),
    failure=Failure(500, _STARTUP_FAILED, StartupErrorBody),
)
async def start_session(api: KallichoreApi, session: KernelSession) -> Any:
    return await session.start()


@ROUTES.route(
    "POST",
    "/sessions/{session_id}/restart",
    operation_id="restartSession",
    tag="sessions",
    summary="Restart the session's kernel",
    description=(
        "Asks the kernel to shut down (killing it if it does not), then starts it "
        "again as `start` does; a session whose kernel is not running is simply "
        "started. The body is optional: one that cannot be read is ignored."
    ),
    protected=True,
    body=RestartSession,
    body_required=False,
    ignore_bad_body=True,
    ok=Reply(Null, "The new kernel is connected and ready."),
    failure=Failure(
        500,
        "The new kernel could not be started, a start or restart is already "
        "in progress (`KS-13`), or `working_directory` does not exist (`KS-13`).",
        StartupErrorBody,
    ),
    replies={400: Reply(ErrorBody, "An `env` variable name is empty or holds `=` (code `400`).")},
)
async def restart_session(api: KallichoreApi, session: KernelSession, body: RestartSession) -> None:
    models.check_env(body.env or [])
    await session.restart(working_directory=body.working_directory or None, env=body.env or None)


@ROUTES.route(
    "POST",
    "/sessions/{session_id}/interrupt",
    operation_id="interruptSession",
    tag="sessions",
    summary="Interrupt the kernel",
    description="As the session's `interrupt_mode` says.",
    protected=True,
    ok=Reply(Null, "The signal or `interrupt_request` was sent."),
    failure=Failure(
        400,
        "The kernel is not running or cannot be reached (`KS-10`).",
        code=ErrorCode.SESSION_INTERRUPT_FAILED,
    ),
)
async def interrupt_session(api: KallichoreApi, session: KernelSession) -> None:
    await session.interrupt()


@ROUTES.route(
    "POST",
    "/sessions/{session_id}/kill",
    operation_id="killSession",
    tag="sessions",
    summary="Kill the kernel",
    description="SIGKILL to the kernel's process group; the execution queue is cleared.",
    protected=True,
    ok=Reply(Null, "The kernel's process group was killed and has exited."),
    failure=Failure(
        400,
        "The kernel is not running (`KS-3`), has no process of ours, being "
        "adopted (`KS-12`), or its process was not found (`KS-4`).",
    ),
)
async def kill_session(api: KallichoreApi, session: KernelSession) -> None:
    await session.kill()
    api.close_channel_socket(session)


@ROUTES.route(
    "PUT",
    "/sessions/{session_id}/adopt",
    operation_id="adoptSession",
    tag="sessions",
    summary="Adopt a kernel started by somebody else",
    description=(
        "Connects to a running kernel at these ports, signing with this key "
        "(usually those `connection_info` handed out). There is no process to "
        "watch: the kernel is taken to be gone after its `shutdown_reply` or when "
        "its heartbeat is lost."
    ),
    protected=True,
    body=ConnectionInfo,
    ok=Reply(_KERNEL_INFO, "The kernel is connected and ready."),
    failure=Failure(
        500,
        "The session already has a kernel or the kernel could not be reached (`KS-6`, `KS-7`).",
    ),
)
async def adopt_session(api: KallichoreApi, session: KernelSession, body: ConnectionInfo) -> Any:
    return await session.adopt(body)


@ROUTES.route(
    "GET",
    "/sessions/{session_id}/connection_info",
    operation_id="connectionInfo",
    tag="sessions",
    summary="Get connection info for a kernel to adopt",
    description=(
        "The connection info a kernel started by somebody else should use before "
        "the session adopts it: the session's key and, on the first call, fresh "
        "free ports, kept for later calls."
    ),
    protected=True,
    ok=Reply(ConnectionInfo, "All nine keys."),
    failure=Failure(500, "No free ports could be found (`KS-18`)."),
)
async def connection_info(api: KallichoreApi, session: KernelSession) -> ConnectionInfo:
    return session.external_connection_info()


_CHANNELS_DESCRIPTION = """\
The session's message stream. On the TCP transport, request it as a WebSocket upgrade; the
token is checked on the upgrade too. On the socket transport, a plain GET opens a Unix socket
for this session alone and answers with its path (a string); the client then connects to that
socket and makes the WebSocket upgrade there (any request path, no token: the socket's 0600
mode, in a 0700 directory of the server's own, protects it). On the TCP transport a plain GET
is refused with 400.

Frames are JSON text. The client sends `JupyterChannelMessage`s (`shell`, `control` or `stdin`);
binary frames are ignored, and a text frame that is not a channel message (an empty one too)
is answered with an `error` event, the connection kept. The server sends
`ServerFrame`s, tagged by `kind`: `jupyter` (`JupyterFrame`, a kernel message, headers trimmed
to `msg_id` and `msg_type`) or `kernel` (`KernelEventFrame`, an event of the supervisor under
one key: `status`, `output`, `executionQueued`, `exited`, `workingDirChanged`, `resourceUsage`,
`handshakeCompleted`, `clientDisconnected`, and our extensions `error`, `eventsDropped` and
`executionRequested`).
The `x-websocket` extension of this operation references both schemas.

One client per session: a new client displaces the old, which is sent `clientDisconnected` and
closed (1008); the new one receives exactly what the old one had not. Events are kept while no
client is attached, so nothing is lost between connections unless the buffer overflows
(`eventsDropped`). The server closes with 1001 when the session is deleted or the server shuts
down."""


@ROUTES.route(
    "GET",
    "/sessions/{session_id}/channels",
    operation_id="channels",
    tag="channels",
    summary="Connect to the session's channels",
    description=_CHANNELS_DESCRIPTION,
    protected=True,
    ok=Reply({"type": "string"}, "The path of the session's channel socket (socket transport)."),
    replies={
        101: Reply(Empty, "Switching to the WebSocket protocol."),
        400: Reply(
            ErrorBody,
            "Upgrade: there is no such session (`KS-1`). Plain GET: the server is on the TCP "
            "transport (code `400`), or the socket could not be made (`socket_path_too_long`, "
            "`domain_socket_error`).",
        ),
        404: Reply(Empty, "Plain GET: there is no such session."),
    },
    extensions={
        "x-websocket": {
            "clientFrame": {"$ref": "#/components/schemas/JupyterChannelMessage"},
            "serverFrame": {"$ref": "#/components/schemas/ServerFrame"},
        }
    },
)
async def channel_socket(api: KallichoreApi, session: KernelSession) -> str:
    if api.sockets is None:
        raise Refused(ErrorBody("400", "on the TCP transport, channels is a WebSocket upgrade"))
    try:
        return str(await api.sockets.open(session))
    except ValueError as error:
        raise Refused(ErrorBody("socket_path_too_long", str(error))) from None
    except OSError as error:
        raise Refused(ErrorBody("domain_socket_error", str(error))) from None


@ROUTES.route(
    "POST",
    "/shutdown",
    operation_id="shutdown",
    tag="server",
    summary="Shut the server down",
    protected=True,
    ok=Reply(Null, "Every kernel is being shut down; the server then exits."),
)
async def shutdown(api: KallichoreApi) -> None:
    api.control.request_shutdown()


@ROUTES.route(
    "GET",
    "/status",
    operation_id="serverStatus",
    tag="server",
    summary="Get the server's status",
    ok=Reply(ServerStatus, "The status."),
)
async def status(api: KallichoreApi) -> ServerStatus:
    return server_status(api.supervisor, api.state)


@ROUTES.route(
    "POST",
    "/client_heartbeat",
    operation_id="clientHeartbeat",
    tag="server",
    summary="Tell the server a client is alive",
    body=ClientHeartbeat,
    ok=Reply(Null, "Noted: the idle-shutdown timer starts again."),
)
async def client_heartbeat(api: KallichoreApi, body: ClientHeartbeat) -> None:
    body.check()
    api.supervisor.note_activity()
    if body.process_id is not None:
        api.control.note_client(body.process_id)


@ROUTES.route(
    "GET",
    "/server_configuration",
    operation_id="getServerConfiguration",
    tag="server",
    summary="Get the server's configuration",
    ok=Reply(ServerConfigurationBody, "The configuration."),
)
async def get_configuration(api: KallichoreApi) -> ServerConfigurationBody:
    log_level = api.state.log_level
    return ServerConfigurationBody(
        resource_sample_interval_ms=api.supervisor.resource_sample_interval_ms,
        idle_shutdown_hours=api.control.idle_shutdown_hours,
        log_level=log_level if log_level in models.LOG_LEVELS else None,
    )


@ROUTES.route(
    "POST",
    "/server_configuration",
    operation_id="setServerConfiguration",
    tag="server",
    summary="Change the server's configuration",
    description=(
        "Needs the token (a deviation: Kallichore leaves it open; Positron sends the token). "
        "`idle_shutdown_hours`: negative for never, 0 for 30 seconds, at most 65535. "
        "`resource_sample_interval_ms`: 0 for never, 1 to 99 taken as 100, at most a day."
    ),
    protected=True,
    body=ServerConfiguration,
    ok=Reply(Null, "The changes were applied."),
    replies={
        400: Reply(
            ErrorBody,
            bad_body(ServerConfiguration) + ", or a value is out of range (code `400`; "
            "nothing is applied).",
        )
    },
)
async def set_configuration(api: KallichoreApi, body: ServerConfiguration) -> None:
    body.check()
    if body.idle_shutdown_hours is not None:
        hours = body.idle_shutdown_hours
        api.control.set_idle_shutdown_hours(hours if hours >= 0 else None)
    if body.resource_sample_interval_ms is not None:
        interval = body.resource_sample_interval_ms
        api.supervisor.resource_sample_interval_ms = (
            interval if interval == 0 else max(interval, 100)
        )


@ROUTES.route(
    "GET",
    "/openapi.json",
    operation_id="openapi",
    tag="server",
    summary="Get this document",
    ok=Reply({"type": "object"}, "This OpenAPI document."),
)
async def openapi(api: KallichoreApi) -> ApiResponse:
    return ApiResponse(200, _openapi_json(), "application/json")


@functools.cache
def _openapi_json() -> bytes:
    """The document is the same for the process's life; building it took ~18 ms a request."""
    return json.dumps(openapi_document(*ROUTE_TABLES)).encode()


# Every API the app serves, in the order the document lists them.
ROUTE_TABLES = (ROUTES, AGENT_ROUTES, JUPYTER_ROUTES, SINGLE_KERNEL_ROUTES)


def create_api(
    supervisor: Supervisor,
    state: ServerState,
    control: ServerControl,
    sockets: ChannelSockets | None = None,
    connections: KernelConnections | None = None,
) -> Dispatcher:
    """Every API served; with `sockets`, `GET .../channels` hands out per-session socket
    paths; `connections` counts each kernel's Jupyter channel connections."""
    dispatcher = Dispatcher()
    connections = connections or NoConnections()
    kallichore = KallichoreApi(supervisor, state, control, sockets)
    dispatcher.serve(ROUTES, kallichore, lambda: state.token)
    dispatcher.serve(AGENT_ROUTES, kallichore, lambda: state.token)
    jupyter = JupyterApi(
        supervisor, state.jupyter, connections, on_removed=kallichore.close_channel_socket
    )
    dispatcher.serve(JUPYTER_ROUTES, jupyter, lambda: state.token)
    single = SingleKernelApi(
        supervisor,
        describe=lambda session: active_session(session, sockets),
        connections=connections,
        files=ConnectionFiles(supervisor),
    )
    dispatcher.serve(SINGLE_KERNEL_ROUTES, single, lambda: state.token)
    dispatcher.at_close(single.files.remove_all)
    return dispatcher
