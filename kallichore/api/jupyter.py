"""The Jupyter Server kernels API (REST side): the routes jupyter_server's gateway client,
@jupyterlab/services and nbclient use, on the same app, port and sessions as the Kallichore API.

Every session is a kernel here, whichever API made it: its `kernel_id` (a UUID) is its id in
this API. A kernel made here is a session whose Kallichore id is that same UUID, so both APIs
name it alike. Kernels start in the background, as Kernel Gateway's do: `POST /api/kernels`
answers 201 at once with `execution_state: starting`. Auth, status codes and error bodies are
Jupyter's (`JupyterStyle`): the token as `?token=`, `Authorization: token` or `Bearer`; errors
as `{"message", "reason"}`.

The channels WebSocket of a kernel is served by the front door (`kallichore.server.front`);
what this API needs of it is the count of a kernel's live connections (`KernelConnections`).
"""

from __future__ import annotations

import mimetypes
import os
import uuid
from collections.abc import Callable, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import attrs

from kallichore import __version__
from kallichore.api import jupyter_models
from kallichore.api.exchange import ApiRequest, ApiResponse
from kallichore.api.jupyter_models import (
    ApiVersion,
    JupyterError,
    KernelModel,
    KernelRef,
    KernelSpecModel,
    KernelSpecs,
    NewKernel,
    NewSession,
    NotebookRef,
    SessionChanges,
    SessionModel,
    iso_time,
)
from kallichore.api.jupyter_sessions import JupyterSession, JupyterSessions
from kallichore.api.routes import (
    Empty,
    Failure,
    Handler,
    NotFound,
    PathParameter,
    Refused,
    Reply,
    RouteTable,
    json_response,
    jupyter_token_matches,
)
from kallichore.errors import ErrorCode, KallichoreError
from kallichore.jupyter.kernelspec import (
    PYTHON_KERNEL_NAME,
    KernelSpec,
    find_kernelspecs,
    python_kernelspec,
)
from kallichore.session.kernel_session import KernelSession
from kallichore.session.launch.options import parse_launcher
from kallichore.session.model import (
    RestartOrigin,
    SessionMode,
    SessionSpec,
    Status,
    VarAction,
    VarActionType,
)
from kallichore.supervisor import Supervisor

# The variable a client sets to choose where its kernel runs (Kernel Gateway's name).
WORKING_DIR_VARIABLE = "KERNEL_WORKING_DIR"
# Variables a client may always pass to its kernel, as Kernel Gateway lets them through.
KERNEL_PREFIX = "KERNEL_"

EXECUTION_STATE = {
    Status.UNINITIALIZED: "starting",
    Status.STARTING: "starting",
    Status.IDLE: "idle",
    Status.BUSY: "busy",
    # Missed heartbeats: the kernel is most often stuck in a long computation.
    Status.OFFLINE: "busy",
    Status.EXITED: "dead",
}


class JupyterStyle:
    """Jupyter's token forms, and its error object on every refusal."""

    converter = jupyter_models.converter

    def authorized(self, token: str | None, request: ApiRequest) -> bool:
        return jupyter_token_matches(
            token, request.header("authorization"), request.argument("token")
        )

    def refusal(self, status: int, message: str) -> ApiResponse:
        return json_response(jupyter_error(status, message), status, self.converter)


class KernelConnections(Protocol):
    """The live Jupyter channel connections of each kernel (the channels hub keeps them)."""

    def connections(self, session: KernelSession) -> int: ...


class NoConnections:
    """Until the channels hub provides the count: nobody is connected."""

    def connections(self, session: KernelSession) -> int:
        return 0


@attrs.frozen
class JupyterSettings:
    """What the daemon's command line says of the Jupyter API."""

    # Relative kernel working directories and session paths are taken from here.
    root_dir: Path = attrs.Factory(Path.cwd)
    # Variables a client may pass to its kernel besides `KERNEL_*` ones (KG's env_whitelist).
    env_allow: frozenset[str] = frozenset()


@attrs.define
class JupyterApi:
    """What the handlers work on."""

    supervisor: Supervisor
    settings: JupyterSettings = attrs.Factory(JupyterSettings)
    hub: KernelConnections = attrs.Factory(NoConnections)
    # Called for a kernel removed through this API (the Kallichore API's per-session socket).
    on_removed: Callable[[KernelSession], None] = lambda session: None
    sessions: JupyterSessions = attrs.field(init=False)
    # Kernels being restarted through this API (their state reads `restarting`).
    restarting: set[str] = attrs.Factory(set)

    def __attrs_post_init__(self) -> None:
        self.sessions = JupyterSessions(lambda kernel_id: self.find_kernel(kernel_id) is not None)

    def find_kernel(self, kernel_id: str) -> KernelSession | None:
        try:
            return self.supervisor.by_kernel_id(kernel_id)
        except KallichoreError:
            return None

    def kernel_model(self, session: KernelSession) -> KernelModel:
        kernel_id = session.spec.kernel_id
        state = "restarting" if kernel_id in self.restarting else EXECUTION_STATE[session.status]
        return KernelModel(
            id=kernel_id,
            name=session.spec.kernel_name or session.spec.language,
            last_activity=iso_time(session.last_activity),
            execution_state=state,
            connections=self.hub.connections(session),
        )

    def session_model(self, session: JupyterSession) -> SessionModel:
        kernel = self.supervisor.by_kernel_id(session.kernel_id)
        return SessionModel(
            id=session.id,
            path=session.path,
            name=session.name,
            type=session.type,
            kernel=self.kernel_model(kernel),
            notebook=NotebookRef(session.path, session.name),
        )

    async def start_kernel(
        self,
        name: str | None,
        env: dict[str, str],
        path: str | None,
        launcher: dict[str, Any] | None = None,
    ) -> KernelSession:
        """A new kernel of kernelspec `name` (the default one if None), started in the
        background; `env` filtered as Kernel Gateway does; its directory from `env`'s
        `KERNEL_WORKING_DIR`, else `path` (relative to the root directory), else the root;
        launched by `launcher` (a launcher block), else as its kernelspec says."""
        kernelspec = find_kernelspec(name)
        actions = kernel_env(env, self.settings.env_allow)
        cwd = working_directory(self.settings.root_dir, env.get(WORKING_DIR_VARIABLE), path)
        kernel_id = str(uuid.uuid4())
        try:
            requested = {} if launcher is None else {"launcher": parse_launcher(launcher)}
            spec = SessionSpec.from_kernelspec(
                kernel_id,
                kernelspec,
                kernel_id=kernel_id,
                working_directory=cwd,
                username=env.get("KERNEL_USERNAME", ""),
                session_mode=SessionMode.NOTEBOOK,
                **requested,
            )
        except KallichoreError as exc:
            raise refused(400, exc.message) from None
        spec = attrs.evolve(spec, env=(*spec.env, *actions))
        session = await self.supervisor.create_session(spec)
        self.supervisor.start_soon(session)
        return session

    async def remove_kernel(self, session: KernelSession) -> None:
        """Shut the kernel down and forget it (in both APIs) once its process is gone."""
        await self.supervisor.settled(session)
        await session.shutdown()
        try:
            await self.supervisor.delete(session.session_id)
        except KallichoreError as error:
            if error.code is not ErrorCode.SESSION_NOT_FOUND:
                raise
            return  # removed meanwhile by another request
        self.on_removed(session)


def jupyter_error(status: int, message: str) -> JupyterError:
    """The error object, its `reason` the status's phrase (as tornado writes it)."""
    return JupyterError(message, HTTPStatus(status).phrase)


def refused(status: int, message: str) -> Refused:
    return Refused(jupyter_error(status, message), status)


# -- kernelspecs --------------------------------------------------------------------------------


def kernelspecs() -> dict[str, KernelSpec]:
    """The kernelspecs `jupyter kernelspec list` shows: the installed ones, and ipykernel in
    this interpreter as `python3` when none is installed under that name (as jupyter_client
    offers its native kernel)."""
    specs = find_kernelspecs()
    if PYTHON_KERNEL_NAME not in specs:
        specs[PYTHON_KERNEL_NAME] = python_kernelspec()
    return specs


def find_kernelspec(name: str | None) -> KernelSpec:
    specs = kernelspecs()
    wanted = default_kernel_name(specs) if name is None else name.lower()
    try:
        return specs[wanted]
    except KeyError:
        raise refused(404, f"No such kernel: {name}") from None


def default_kernel_name(specs: dict[str, KernelSpec]) -> str:
    return PYTHON_KERNEL_NAME if PYTHON_KERNEL_NAME in specs else min(specs)


def kernelspec_model(spec: KernelSpec) -> KernelSpecModel:
    """The model jupyter_server gives: kernel.json's fields, and the URLs of its resources
    (`kernel.js`, `kernel.css` and `logo-*` files, by name without the extension for logos)."""
    body: dict[str, Any] = {
        "argv": list(spec.argv),
        "env": dict(spec.env),
        "display_name": spec.display_name,
        "language": spec.language,
        "interrupt_mode": spec.interrupt_mode,
        "metadata": dict(spec.metadata),
    }
    resources: dict[str, str] = {}
    for file in resource_files(spec):
        key = file if file in ("kernel.js", "kernel.css") else os.path.splitext(file)[0]
        resources[key] = f"/kernelspecs/{spec.name}/{file}"
    return KernelSpecModel(spec.name, body, resources)


def resource_files(spec: KernelSpec) -> list[str]:
    if spec.resource_dir is None:
        return []
    try:
        names = sorted(entry.name for entry in spec.resource_dir.iterdir() if entry.is_file())
    except OSError:
        return []
    return [n for n in names if n in ("kernel.js", "kernel.css") or n.startswith("logo-")]


# -- what a kernel is started with -----------------------------------------------------------------


def kernel_env(env: dict[str, str], allowed: Iterable[str]) -> list[VarAction]:
    """The variables of a request that reach the kernel: `KERNEL_*` ones and those allowed."""
    allow = set(allowed)
    actions = []
    for name, value in env.items():
        if not name or "=" in name:
            raise refused(400, f"env: {name!r} is not a valid variable name")
        if name.startswith(KERNEL_PREFIX) or name in allow:
            actions.append(VarAction(VarActionType.REPLACE, name, value))
    return actions


def working_directory(root: Path, kernel_dir: str | None, path: str | None) -> str:
    """Where the kernel runs: an absolute `KERNEL_WORKING_DIR` as it is (jupyter_server's
    gateway client sends its own absolute paths); a relative one, or else `path` (an API path,
    relative to the root even with a leading `/`), within `root` (400 if it escapes it); an
    existing directory (400 if not)."""
    root = root.resolve()
    if kernel_dir:
        candidate = Path(kernel_dir).expanduser()
        where = WORKING_DIR_VARIABLE
    elif path:
        candidate = Path(path.lstrip("/"))
        where = "path"
    else:
        return str(root)
    if candidate.is_absolute():
        resolved = candidate.resolve()
    else:
        resolved = (root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise refused(400, f"{where} {str(candidate)!r} is outside the root directory")
    if not resolved.is_dir():
        raise refused(400, f"{where} {str(candidate)!r} is not a directory")
    return str(resolved)


# -- the routes --------------------------------------------------------------------------------


def _kernel(api: JupyterApi, kernel_id: str) -> KernelSession:
    try:
        return api.supervisor.by_kernel_id(kernel_id)
    except KallichoreError:
        raise NotFound(f"Kernel does not exist: {kernel_id}") from None


def _session(api: JupyterApi, session_id: str) -> JupyterSession:
    session = api.sessions.get(session_id)
    if session is None:
        raise NotFound(f"Session not found: {session_id}")
    return session


def _kernelspec(api: JupyterApi, name: str) -> KernelSpec:
    spec = kernelspecs().get(name.lower())
    if spec is None:
        raise NotFound(f"Kernel spec {name} not found")
    return spec


_STARTED_AGAIN = "The kernel to shut down was started again meanwhile (through the other API)."


def _route(method: str, path: str, **fields: Any) -> Callable[[Handler], Handler]:
    """Every route of this API needs the token (when the server has one)."""
    return JUPYTER_ROUTES.route(method, path, tag="jupyter", protected=True, **fields)


def _array_of(schema: str, description: str) -> Reply:
    return Reply(
        {"type": "array", "items": {"$ref": f"#/components/schemas/{schema}"}}, description
    )


JUPYTER_ROUTES = RouteTable(
    "jupyter",
    parameters={
        "kernel_id": PathParameter(
            "kernel",
            "The kernel's UUID (every session of the Kallichore API has one).",
            _kernel,
            missing=Reply(JupyterError, "There is no kernel with this id."),
        ),
        "kernel_name": PathParameter(
            "kernelspec",
            "The name of an installed kernelspec.",
            _kernelspec,
            missing=Reply(JupyterError, "There is no kernelspec by this name."),
        ),
        "file": PathParameter(
            "file",
            "A file in the kernelspec's directory.",
            lambda api, name: name,
            missing=Reply(JupyterError, "There is no such file."),
        ),
        "jupyter_session_id": PathParameter(
            "session",
            "The session's id.",
            _session,
            missing=Reply(JupyterError, "There is no session with this id."),
        ),
    },
    style=JupyterStyle(),
)


@_route(
    "GET",
    "/api",
    operation_id="jupyterApiVersion",
    summary="Get the API's version",
    ok=Reply(ApiVersion, "The server's version."),
)
async def api_version(api: JupyterApi) -> ApiVersion:
    return ApiVersion(__version__)


@_route(
    "GET",
    "/api/kernelspecs",
    operation_id="listKernelspecs",
    summary="List the kernelspecs",
    description=(
        "The kernelspecs in the Jupyter data paths, as `jupyter kernelspec list` shows them; "
        "`python3` is ipykernel in the server's interpreter if none is installed."
    ),
    ok=Reply(KernelSpecs, "Every kernelspec, and the default one's name."),
)
async def list_kernelspecs(api: JupyterApi) -> KernelSpecs:
    specs = kernelspecs()
    return KernelSpecs(
        default=default_kernel_name(specs),
        kernelspecs={name: kernelspec_model(spec) for name, spec in specs.items()},
    )


@_route(
    "GET",
    "/api/kernelspecs/{kernel_name}",
    operation_id="getKernelspec",
    summary="Get a kernelspec",
    ok=Reply(KernelSpecModel, "The kernelspec."),
)
async def get_kernelspec(api: JupyterApi, kernelspec: KernelSpec) -> KernelSpecModel:
    return kernelspec_model(kernelspec)


@_route(
    "GET",
    "/kernelspecs/{kernel_name}/{file}",
    operation_id="getKernelspecResource",
    summary="Get a file of a kernelspec (its logos...)",
    ok=Reply({"type": "string", "format": "binary"}, "The file, with a guessed Content-Type."),
    replies={404: Reply(JupyterError, "No such kernelspec, or no such file in its directory.")},
)
async def get_kernelspec_resource(
    api: JupyterApi, kernelspec: KernelSpec, file: str
) -> ApiResponse:
    directory = kernelspec.resource_dir
    if directory is None or file.startswith(".") or "\0" in file or "\\" in file:
        raise refused(404, f"Kernel spec resource {file} not found")
    path = directory / file
    try:
        if path.resolve().parent != directory.resolve() or not path.is_file():
            raise OSError
        data = path.read_bytes()
    except OSError:
        raise refused(404, f"Kernel spec resource {file} not found") from None
    kind = mimetypes.guess_type(file)[0] or "application/octet-stream"
    return ApiResponse(200, data, kind)


@_route(
    "GET",
    "/api/kernels",
    operation_id="listKernels",
    summary="List the kernels",
    description="Every session of the server, whichever API created it.",
    ok=_array_of("KernelModel", "The kernels."),
)
async def list_kernels(api: JupyterApi) -> list[KernelModel]:
    return [api.kernel_model(session) for session in api.supervisor.sessions()]


def _kernel_location(model: KernelModel) -> str:
    return f"/api/kernels/{model.id}"


@_route(
    "POST",
    "/api/kernels",
    operation_id="startKernel",
    summary="Start a kernel",
    description=(
        "Answers at once, the kernel `starting` in the background. Its id is a new UUID, "
        "which is also its session id in the Kallichore API. Of `env`, the `KERNEL_*` "
        "variables reach the kernel, and those the server allows (`--jupyter-env-allow`); "
        "`KERNEL_WORKING_DIR`, else `path`, is where it runs (relative to `--root-dir`). An "
        "empty body starts the default kernel."
    ),
    body=NewKernel,
    body_required=False,
    status=201,
    location=_kernel_location,
    ok=Reply(KernelModel, "The kernel, starting (`Location` names it)."),
    replies={
        400: Reply(
            JupyterError,
            "The body does not match NewKernel, or the working directory is outside the root "
            "directory or does not exist.",
        ),
        404: Reply(JupyterError, "There is no kernelspec by that name."),
    },
)
async def start_kernel(api: JupyterApi, body: NewKernel) -> KernelModel:
    session = await api.start_kernel(body.name, body.env, body.path, body.launcher)
    return api.kernel_model(session)


@_route(
    "GET",
    "/api/kernels/{kernel_id}",
    operation_id="getKernel",
    summary="Get a kernel",
    ok=Reply(KernelModel, "The kernel."),
)
async def get_kernel(api: JupyterApi, kernel: KernelSession) -> KernelModel:
    return api.kernel_model(kernel)


@_route(
    "DELETE",
    "/api/kernels/{kernel_id}",
    operation_id="deleteKernel",
    failure=Failure(409, _STARTED_AGAIN, JupyterError),
    summary="Shut a kernel down",
    description=(
        "Answers once the kernel's process is gone; the kernel (the session, in the "
        "Kallichore API) is then forgotten, and so are the Jupyter sessions bound to it."
    ),
    status=204,
    ok=Reply(Empty, "The kernel is gone."),
)
async def delete_kernel(api: JupyterApi, kernel: KernelSession) -> None:
    await api.remove_kernel(kernel)


@_route(
    "POST",
    "/api/kernels/{kernel_id}/interrupt",
    operation_id="interruptKernel",
    summary="Interrupt a kernel",
    status=204,
    ok=Reply(Empty, "The signal or `interrupt_request` was sent."),
    failure=Failure(409, "The kernel is not running.", JupyterError),
)
async def interrupt_kernel(api: JupyterApi, kernel: KernelSession) -> None:
    await kernel.interrupt()


_CHANNELS_DESCRIPTION = """A WebSocket upgrade (`?session_id=` names the client; the token
may also come as `?token=`). With the `v1.kernel.websocket.jupyter.org` subprotocol offered,
frames are binary both ways (little-endian uint64 offsets, then channel, header, parent header,
metadata, content and buffers); otherwise the legacy framing: JSON text frames with the full
message and top-level `channel`, `msg_id` and `msg_type`, binary frames (big-endian uint32
offsets) for messages with buffers. A client frame without `channel` goes to shell.

Many clients per kernel: each gets every iopub message, and the replies to its own requests
only. When the last connection of a `session_id` closes, what follows is kept (within the
session's buffer, a loss marked by a `stream` message on stderr) and replayed to the next
connection with that `session_id`; another `session_id` discards it. The upgrade waits (up
to 60 s) for a starting kernel to be ready. A plain GET is a 400."""


@_route(
    "GET",
    "/api/kernels/{kernel_id}/channels",
    operation_id="kernelChannels",
    summary="Connect to a kernel's channels",
    description=_CHANNELS_DESCRIPTION,
    ok=Reply(Empty, "Never: the route is a WebSocket upgrade."),
    replies={
        101: Reply(Empty, "Switching to the WebSocket protocol."),
        400: Reply(JupyterError, "A plain GET, not a WebSocket upgrade."),
    },
)
async def kernel_channels(api: JupyterApi, kernel: KernelSession) -> None:
    """Only a plain GET gets here: the front door takes the upgrades."""
    raise refused(400, "the channels are a WebSocket upgrade (GET with Upgrade: websocket)")


@_route(
    "POST",
    "/api/kernels/{kernel_id}/restart",
    operation_id="restartKernel",
    summary="Restart a kernel",
    description=(
        "Answers once the new kernel has answered `kernel_info_request`; the id stays. The "
        "body is ignored."
    ),
    ok=Reply(KernelModel, "The kernel, restarted."),
    replies={500: Reply(JupyterError, "The kernel could not be restarted.")},
)
async def restart_kernel(api: JupyterApi, kernel: KernelSession) -> KernelModel:
    kernel_id = kernel.spec.kernel_id
    api.restarting.add(kernel_id)
    try:
        await api.supervisor.settled(kernel)
        await kernel.restart(origin=RestartOrigin.JUPYTER)
    except KallichoreError as error:
        raise Refused(
            JupyterError("Exception restarting kernel", error.message, traceback=""), 500
        ) from None
    finally:
        api.restarting.discard(kernel_id)
    return api.kernel_model(kernel)


# -- sessions ---------------------------------------------------------------------------------


def _kernel_for(api: JupyterApi, ref: KernelRef | None) -> KernelSession | None:
    """The running kernel `ref` names by id; None when a new one is to be started."""
    if ref is None or ref.id is None:
        return None
    kernel = api.find_kernel(ref.id)
    if kernel is None:
        raise refused(404, f"Kernel does not exist: {ref.id}")
    return kernel


def _directory(path: str) -> str | None:
    """A session's kernel runs in its notebook's directory."""
    return os.path.dirname(path.lstrip("/")) or None


@_route(
    "GET",
    "/api/sessions",
    operation_id="listJupyterSessions",
    summary="List the sessions",
    ok=_array_of("SessionModel", "The sessions."),
)
async def list_sessions(api: JupyterApi) -> list[SessionModel]:
    return [api.session_model(session) for session in api.sessions.all()]


def _session_location(model: SessionModel) -> str:
    return f"/api/sessions/{model.id}"


@_route(
    "POST",
    "/api/sessions",
    operation_id="createJupyterSession",
    summary="Create a session",
    description=(
        "Binds `path` to the running kernel `kernel.id`, or to a new kernel of kernelspec "
        "`kernel.name` (the default one if neither), started in the directory of `path`. A "
        "session of the same `path` is answered as it is."
    ),
    body=NewSession,
    status=201,
    location=_session_location,
    ok=Reply(SessionModel, "The session (`Location` names it)."),
    replies={
        400: Reply(JupyterError, "The body does not match NewSession, or `path` is not usable."),
        404: Reply(JupyterError, "No kernel with that id, or no kernelspec by that name."),
    },
)
async def create_session(api: JupyterApi, body: NewSession) -> SessionModel:
    for existing in api.sessions.all():
        if body.path and existing.path == body.path:
            return api.session_model(existing)
    kernel = _kernel_for(api, body.kernel)
    if kernel is None:
        name = body.kernel.name if body.kernel is not None else None
        kernel = await api.start_kernel(name, {}, _directory(body.path))
    session = api.sessions.add(body.path, body.name, body.type, kernel.spec.kernel_id)
    return api.session_model(session)


@_route(
    "GET",
    "/api/sessions/{jupyter_session_id}",
    operation_id="getJupyterSession",
    summary="Get a session",
    ok=Reply(SessionModel, "The session."),
)
async def get_session(api: JupyterApi, session: JupyterSession) -> SessionModel:
    return api.session_model(session)


@_route(
    "PATCH",
    "/api/sessions/{jupyter_session_id}",
    operation_id="updateJupyterSession",
    failure=Failure(409, _STARTED_AGAIN, JupyterError),
    summary="Change a session",
    description=(
        "Renames or moves it (`path`, `name`, `type`), or binds it to another kernel: the "
        "running kernel `kernel.id`, or a new one of kernelspec `kernel.name`. The kernel it "
        "leaves is shut down, as jupyter_server does."
    ),
    body=SessionChanges,
    ok=Reply(SessionModel, "The session as it now is."),
    replies={
        400: Reply(JupyterError, "The body does not match SessionChanges, or no such kernel.")
    },
)
async def update_session(
    api: JupyterApi, session: JupyterSession, body: SessionChanges
) -> SessionModel:
    before = session.kernel_id
    if body.kernel is not None:
        if body.kernel.id is not None:
            if api.find_kernel(body.kernel.id) is None:
                raise refused(400, f"No such kernel: {body.kernel.id}")
            session.kernel_id = body.kernel.id
        elif body.kernel.name is not None:
            path = body.path if body.path is not None else session.path
            kernel = await api.start_kernel(body.kernel.name, {}, _directory(path))
            session.kernel_id = kernel.spec.kernel_id
    session.path = body.path if body.path is not None else session.path
    session.name = body.name if body.name is not None else session.name
    session.type = body.type if body.type is not None else session.type
    left = api.find_kernel(before) if session.kernel_id != before else None
    if left is not None:
        await api.remove_kernel(left)
    return api.session_model(session)


@_route(
    "DELETE",
    "/api/sessions/{jupyter_session_id}",
    operation_id="deleteJupyterSession",
    failure=Failure(409, _STARTED_AGAIN, JupyterError),
    summary="Delete a session",
    description="Its kernel is shut down too (answered once its process is gone).",
    status=204,
    ok=Reply(Empty, "The session and its kernel are gone."),
)
async def delete_session(api: JupyterApi, session: JupyterSession) -> None:
    api.sessions.remove(session.id)
    kernel = api.find_kernel(session.kernel_id)
    if kernel is not None:
        await api.remove_kernel(kernel)
