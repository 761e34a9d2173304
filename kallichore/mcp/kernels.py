"""Where the MCP server's kernels run: a daemon's sessions, or a supervisor of its own.

Both give the tools the same few operations, with the execute API's outcome (a JSON body) as
the result of an execution, and both remember which sessions they started: those, and only
those, are shut down when the server stops. A daemon's other sessions (a person's Positron
console, say) can be used, interrupted and restarted when named, never shut down.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import trio

from kallichore.client import ApiError, ExecuteOptions, KallichoreClient
from kallichore.errors import ErrorCode, KallichoreError
from kallichore.jupyter.kernelspec import (
    PYTHON_KERNEL_NAME,
    KernelSpec,
    KernelSpecError,
    find_kernelspecs,
    get_kernelspec,
    python_kernelspec,
)
from kallichore.session.kernel_session import KernelSession
from kallichore.session.model import SessionSpec
from kallichore.supervisor import Supervisor, SupervisorConfig, open_supervisor

logger = logging.getLogger(__name__)

JSON = dict[str, Any]
# How long we wait for a daemon to shut down the kernels we started (a hang guard: an MCP
# client kills a server that has not exited a few seconds after it closed its stdin anyway).
SHUTDOWN_WAIT = 5.0


class Kernels(Protocol):
    """The operations behind the tools; what they refuse raises `ApiError`, `KallichoreError`
    or `KernelSpecError`."""

    @property
    def started(self) -> list[str]:
        """The sessions this server started, in order."""

    async def sessions(self) -> list[JSON]:
        """Every session: `session_id`, `display_name`, `language`, `status`, `connected`
        (a client is attached), `working_directory`."""

    async def start(self, session_id: str, kernel_name: str | None) -> None:
        """Create and start a session running the kernelspec (None: the default one)."""

    async def execute(self, session_id: str, code: str, timeout: float | None) -> JSON:
        """Run `code` through the session's execution queue; the execute API's body."""

    async def interrupt(self, session_id: str) -> None: ...

    async def restart(self, session_id: str) -> None: ...


def summary(session: JSON) -> JSON:
    """What a model needs to know of a session, from the API's description of it."""
    keys = ("session_id", "display_name", "language", "status", "connected", "working_directory")
    return {key: session.get(key) for key in keys}


class DaemonKernels:
    """A running daemon's sessions, through its API."""

    def __init__(self, client: KallichoreClient) -> None:
        self._client = client
        self._started: list[str] = []

    @property
    def started(self) -> list[str]:
        return list(self._started)

    async def sessions(self) -> list[JSON]:
        return [summary(session) for session in await self._client.list_sessions()]

    async def start(self, session_id: str, kernel_name: str | None) -> None:
        if kernel_name is None:
            kernel_name = str((await self._client.kernelspecs())["default"])
        self._started.append(session_id)
        await self._client.start_kernelspec(kernel_name, session_id)

    async def execute(self, session_id: str, code: str, timeout: float | None) -> JSON:
        options: ExecuteOptions = {} if timeout is None else {"timeout_seconds": timeout}
        with naming(session_id):
            return await self._client.execute(session_id, code, **options)

    async def interrupt(self, session_id: str) -> None:
        with naming(session_id):
            await self._client.interrupt(session_id)

    async def restart(self, session_id: str) -> None:
        with naming(session_id):
            await self._client.restart(session_id)

    async def shut_down_started(self) -> None:
        """Shut down (and remove) the sessions this server started, all at once, as the
        Jupyter API's kernel deletion does: shutdown_request, then a kill after the grace."""
        async with trio.open_nursery() as nursery:
            for session_id in self._started:
                nursery.start_soon(self._shut_down, session_id)

    async def _shut_down(self, session_id: str) -> None:
        try:
            kernel_id = (await self._client.get_session(session_id))["kernel_id"]
            response = await self._client.http.delete(f"/api/kernels/{kernel_id}")
            if not response.is_success and response.status_code != 404:
                raise ApiError.from_response(response)
        except ApiError as error:
            if error.status != 404:  # already gone is fine
                logger.warning("could not shut down session %s: %s", session_id, error)


@contextmanager
def naming(session_id: str) -> Iterator[None]:
    """The API's 404 (an empty body, as Kallichore answers) as the error that names the
    session, as the embedded supervisor's is."""
    try:
        yield
    except ApiError as error:
        if error.status != 404:
            raise
        raise KallichoreError(
            ErrorCode.SESSION_NOT_FOUND, f"session {session_id} not found"
        ) from error


@asynccontextmanager
async def daemon_kernels(connection_file: Path) -> AsyncIterator[DaemonKernels]:
    """The sessions of the daemon that wrote `connection_file`; leaving the block shuts down
    the ones this server started."""
    async with KallichoreClient.from_connection_file(connection_file) as client:
        await client.status()  # reachable, and our token is good: say so now, not at a tool call
        kernels = DaemonKernels(client)
        try:
            yield kernels
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_WAIT):
                await kernels.shut_down_started()


class EmbeddedKernels:
    """The sessions of a supervisor in this process: every one of them is ours."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    @property
    def started(self) -> list[str]:
        return [session.session_id for session in self._supervisor.sessions()]

    async def sessions(self) -> list[JSON]:
        return [
            {
                "session_id": session.session_id,
                "display_name": session.spec.display_name,
                "language": session.spec.language,
                "status": session.status.value,
                "connected": session.connected,
                "working_directory": session.working_directory,
            }
            for session in self._supervisor.sessions()
        ]

    async def start(self, session_id: str, kernel_name: str | None) -> None:
        spec = SessionSpec.from_kernelspec(session_id, kernelspec(kernel_name))
        session = await self._supervisor.create_session(spec)
        await session.start()

    async def execute(self, session_id: str, code: str, timeout: float | None) -> JSON:
        outcome = await self._session(session_id).run_code(code, timeout=timeout)
        body: JSON = outcome.to_json()
        return body

    async def interrupt(self, session_id: str) -> None:
        await self._session(session_id).interrupt()

    async def restart(self, session_id: str) -> None:
        await self._session(session_id).restart()

    def _session(self, session_id: str) -> KernelSession:
        return self._supervisor.get(session_id)


def kernelspec(name: str | None) -> KernelSpec:
    """The kernelspec `name`; python3 (None too) is ipykernel in this interpreter when no
    python3 kernelspec is installed, as Jupyter offers it."""
    if name is None or name.lower() == PYTHON_KERNEL_NAME:
        return python_kernelspec()
    try:
        return get_kernelspec(name)
    except KernelSpecError as error:
        there_are = ", ".join(sorted({PYTHON_KERNEL_NAME, *find_kernelspecs()}))
        raise KernelSpecError(f"{error}; there are: {there_are}") from error


@asynccontextmanager
async def embedded_kernels() -> AsyncIterator[EmbeddedKernels]:
    """A supervisor of our own; leaving the block shuts its kernels down."""
    config = SupervisorConfig(resource_sample_interval_ms=0)
    async with open_supervisor(config) as supervisor:
        yield EmbeddedKernels(supervisor)
