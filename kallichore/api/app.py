"""The Kallichore HTTP API as a Quart-Trio app: thin routes over the supervisor.

Routes validate, call the supervisor or a session, and shape the answer as the spec says:
`null` bodies for actions, empty 401/404 bodies, the error object with `KS-n` codes for
failures, StartupError for failed starts. No route touches ZeroMQ or a process directly.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
from quart import Response, request
from quart_trio import QuartTrio

from kallichore import __version__
from kallichore.api import models
from kallichore.api.models import (
    ActiveSession,
    BodyError,
    ClientHeartbeat,
    ConnectionInfoBody,
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
    structure_body,
)
from kallichore.api.openapi import openapi_document
from kallichore.channels.broker import ChannelBroker
from kallichore.channels.kallichore_framing import queued_message, wire_status
from kallichore.errors import ErrorCode, KallichoreError
from kallichore.idle_shutdown import IdleShutdown
from kallichore.session.kernel_session import KernelSession
from kallichore.session.model import Status
from kallichore.supervisor import Supervisor

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
LOG_LEVELS = ("trace", "debug", "info", "warn", "error")


@attrs.define
class ServerState:
    """What the API knows about the server beyond its sessions."""

    token: str | None
    server_id: str = attrs.Factory(lambda: secrets.token_hex(8))
    started: float = attrs.Factory(time.time)
    started_monotonic: float = attrs.Factory(time.monotonic)
    idle: IdleShutdown = attrs.Factory(IdleShutdown)
    log_level: str | None = "info"
    # Called by POST /shutdown; the server decides how to stop.
    request_shutdown: Callable[[], None] = lambda: None


class ChannelSockets(Protocol):
    """Per-session channel sockets (the socket transport), provided by the server layer."""

    async def open(self, session: KernelSession) -> Path: ...

    def path(self, session_id: str) -> Path | None: ...

    def close(self, session_id: str) -> None: ...


def json_response(body: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(models.converter.unstructure(body)),
        status=status,
        content_type="application/json",
    )


def empty(status: int) -> Response:
    return Response(b"", status=status)


def error_response(error: KallichoreError, status: int = 400) -> Response:
    return json_response(ErrorBody.of(error), status)


def body_error(error: BodyError) -> Response:
    return json_response(ErrorBody("400", str(error)), 400)


def check_token(state: ServerState, authorization: str | None) -> bool:
    """Bearer auth, scheme case-insensitive, token compared in constant time."""
    if state.token is None:
        return True
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), state.token.encode())


async def read_json() -> Any:
    data = await request.get_data()
    if not data:
        raise BodyError("a JSON body is required")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BodyError(f"the body is not valid JSON: {exc}") from None


def active_session(session: KernelSession, sockets: ChannelSockets | None) -> ActiveSession:
    queue = session.execution_queue
    now = time.monotonic()
    return ActiveSession(
        session_id=session.session_id,
        argv=list(session.spec.argv),
        process_id=session.process_id,
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


Handler = Callable[..., Awaitable[Response]]
SessionHandler = Callable[[KernelSession], Awaitable[Response]]


def create_app(
    supervisor: Supervisor,
    state: ServerState,
    broker: ChannelBroker,
    sockets: ChannelSockets | None = None,
) -> QuartTrio:
    """The app; with `sockets`, `GET .../channels` hands out per-session socket paths."""
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    def protected(handler: Handler) -> Handler:
        async def guarded(*args: Any, **kwargs: Any) -> Response:
            if not check_token(state, request.headers.get("Authorization")):
                return empty(401)
            return await handler(*args, **kwargs)

        guarded.__name__ = handler.__name__
        return guarded

    def lookup(session_id: str) -> KernelSession | None:
        try:
            return supervisor.get(session_id)
        except KallichoreError:
            return None

    def with_session(handler: SessionHandler) -> Handler:
        """Route `/sessions/<session_id>/...` to `handler(session)`; unknown ids get a bare 404."""

        async def routed(session_id: str) -> Response:
            session = lookup(session_id)
            if session is None:
                return empty(404)
            return await handler(session)

        routed.__name__ = handler.__name__
        return routed

    @app.get("/sessions")
    async def list_sessions() -> Response:
        sessions = [active_session(s, sockets) for s in supervisor.sessions()]
        return json_response(SessionList(total=len(sessions), sessions=sessions))

    @app.put("/sessions")
    @protected
    async def new_session() -> Response:
        try:
            body = structure_body(await read_json(), NewSession)
            spec = body.to_spec()
        except BodyError as error:
            return body_error(error)
        except KallichoreError as error:
            return error_response(error)
        if problem := argv_problem(body.argv):
            return error_response(KallichoreError(ErrorCode.KERNEL_PATH_NOT_FOUND, problem))
        try:
            session = await supervisor.create_session(spec)
        except KallichoreError as error:
            return error_response(error)
        return json_response(NewSessionReply(session.session_id))

    @app.get("/sessions/<session_id>")
    @with_session
    async def get_session(session: KernelSession) -> Response:
        return json_response(active_session(session, sockets))

    @app.delete("/sessions/<session_id>")
    @protected
    @with_session
    async def delete_session(session: KernelSession) -> Response:
        try:
            await supervisor.delete(session.session_id)
        except KallichoreError as error:
            return error_response(error)
        if sockets is not None:
            sockets.close(session.session_id)
        return json_response(None)

    @app.post("/sessions/<session_id>/start")
    @protected
    @with_session
    async def start_session(session: KernelSession) -> Response:
        try:
            return json_response(await session.start())
        except KallichoreError as error:
            return json_response(StartupErrorBody.of(error), 500)

    @app.post("/sessions/<session_id>/restart")
    @protected
    @with_session
    async def restart_session(session: KernelSession) -> Response:
        try:
            body = structure_body(json.loads(await request.get_data() or b"{}"), RestartSession)
        except (BodyError, ValueError, RecursionError):
            body = RestartSession()
        env = [action.to_model() for action in body.env] if body.env else None
        try:
            await session.restart(working_directory=body.working_directory or None, env=env)
        except KallichoreError as error:
            return json_response(StartupErrorBody.of(error), 500)
        return json_response(None)

    @app.post("/sessions/<session_id>/interrupt")
    @protected
    @with_session
    async def interrupt_session(session: KernelSession) -> Response:
        try:
            await session.interrupt()
        except KallichoreError as error:
            return error_response(
                KallichoreError(ErrorCode.SESSION_INTERRUPT_FAILED, error.message, error.details)
            )
        return json_response(None)

    @app.post("/sessions/<session_id>/kill")
    @protected
    @with_session
    async def kill_session(session: KernelSession) -> Response:
        try:
            await session.kill()
        except KallichoreError as error:
            return error_response(error)
        if sockets is not None:
            sockets.close(session.session_id)
        return json_response(None)

    @app.put("/sessions/<session_id>/adopt")
    @protected
    @with_session
    async def adopt_session(session: KernelSession) -> Response:
        try:
            info = structure_body(await read_json(), ConnectionInfoBody).to_model()
        except BodyError as error:
            return body_error(error)
        try:
            return json_response(await session.adopt(info))
        except KallichoreError as error:
            return error_response(error, 500)

    @app.get("/sessions/<session_id>/connection_info")
    @protected
    @with_session
    async def connection_info(session: KernelSession) -> Response:
        try:
            return json_response(session.external_connection_info().to_dict())
        except KallichoreError as error:
            return error_response(error, 500)

    @app.get("/sessions/<session_id>/channels")
    @protected
    @with_session
    async def channel_socket(session: KernelSession) -> Response:
        if sockets is None:
            return json_response(
                ErrorBody("400", "on the TCP transport, channels is a WebSocket upgrade"), 400
            )
        try:
            path = await sockets.open(session)
        except ValueError as error:
            return json_response(ErrorBody("socket_path_too_long", str(error)), 400)
        except OSError as error:
            return json_response(ErrorBody("domain_socket_error", str(error)), 400)
        return json_response(str(path))

    @app.post("/shutdown")
    @protected
    async def shutdown() -> Response:
        state.request_shutdown()
        return json_response(None)

    @app.get("/status")
    async def status() -> Response:
        return json_response(server_status(supervisor, state))

    @app.post("/client_heartbeat")
    async def client_heartbeat() -> Response:
        try:
            body = structure_body(await read_json(), ClientHeartbeat)
        except BodyError as error:
            return body_error(error)
        supervisor.note_activity()
        if body.process_id is not None and body.process_id != state.idle.client_pid:
            logger.info("client process is now %d", body.process_id)
            state.idle.client_pid = body.process_id
        return json_response(None)

    @app.get("/server_configuration")
    async def get_configuration() -> Response:
        return json_response(
            ServerConfigurationBody(
                resource_sample_interval_ms=supervisor.resource_sample_interval_ms,
                idle_shutdown_hours=state.idle.hours if state.idle.period is not None else None,
                log_level=state.log_level if state.log_level in LOG_LEVELS else None,
            )
        )

    @app.post("/server_configuration")
    async def set_configuration() -> Response:
        try:
            body = structure_body(await read_json(), ServerConfiguration)
        except BodyError as error:
            return body_error(error)
        if body.idle_shutdown_hours is not None:
            if body.idle_shutdown_hours > 65535:
                return json_response(ErrorBody("400", "idle_shutdown_hours is too large"), 400)
            hours = body.idle_shutdown_hours
            state.idle.configure(hours=hours if hours >= 0 else None)
        if body.resource_sample_interval_ms is not None:
            if body.resource_sample_interval_ms < 0:
                return json_response(
                    ErrorBody("400", "resource_sample_interval_ms must not be negative"), 400
                )
            interval = body.resource_sample_interval_ms
            supervisor.resource_sample_interval_ms = (
                interval if interval == 0 else max(interval, 100)
            )
        return json_response(None)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return Response(json.dumps(openapi_document()), status=200, content_type="application/json")

    @app.errorhandler(404)
    async def not_found(_: Exception) -> Response:
        return empty(404)

    @app.errorhandler(405)
    async def not_allowed(_: Exception) -> Response:
        return empty(405)

    @app.errorhandler(413)
    async def too_large(_: Exception) -> Response:
        response = json_response(
            ErrorBody("413", f"the body is larger than {MAX_BODY_BYTES} bytes"), 413
        )
        # The rest of the body is never read: the connection cannot carry another request.
        response.headers["Connection"] = "close"
        return response

    return app
