"""The supervisor: a registry of kernel sessions, each running in one root nursery.

`open_supervisor()` is the embeddable entry point. Leaving its block shuts every kernel down
(shutdown_request, a grace period, then SIGKILL of the kernel's process group) and removes the
connection files, so after it returns nothing of ours is left running or lying around.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio
import zmq

from kallichore.errors import ErrorCode, KallichoreError
from kallichore.footprint import Footprint
from kallichore.jupyter.connection import PortAllocator
from kallichore.session.kernel_session import KernelSession
from kallichore.session.model import SessionConfig, SessionSpec
from kallichore.session.resources import SampleInterval

logger = logging.getLogger(__name__)


@attrs.frozen
class SupervisorConfig:
    """How the supervisor runs its kernels.

    `runtime_dir` holds the kernels' connection files; by default a private temporary
    directory, removed when the supervisor closes.
    """

    runtime_dir: Path | None = None
    session: SessionConfig = attrs.Factory(SessionConfig)
    # How often to sample the CPU and memory of kernels with a client attached; 0 = never.
    resource_sample_interval_ms: int = 1000
    # Where the daemon records its kernels and directories, for a sweep should it be killed.
    footprint: Footprint | None = None


class Supervisor:
    """Creates, finds and deletes sessions; see `open_supervisor()`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        context: zmq.Context[zmq.Socket[bytes]],
        runtime_dir: Path,
        config: SupervisorConfig,
    ) -> None:
        self._nursery = nursery
        self._context = context
        self._runtime_dir = runtime_dir
        self._config = config
        self._ports = PortAllocator.for_this_machine()
        self._sessions: dict[str, KernelSession] = {}
        self._sample_interval = SampleInterval(config.resource_sample_interval_ms)
        self._footprint = config.footprint or Footprint(None)
        # When a session was last created, became idle or exited, or a client last showed up
        # (trio clock).
        self.last_activity = trio.current_time()

    def note_activity(self) -> None:
        """Something happened that restarts the idle-shutdown period."""
        self.last_activity = trio.current_time()

    @property
    def resource_sample_interval_ms(self) -> int:
        """How often sessions with a client attached publish their kernel's resource use."""
        return self._sample_interval.milliseconds

    @resource_sample_interval_ms.setter
    def resource_sample_interval_ms(self, interval: int) -> None:
        """Change the sampling period; the next sample is one new period from now."""
        self._sample_interval.milliseconds = interval

    @property
    def footprint(self) -> Footprint:
        """Where what the supervisor creates is recorded (nowhere unless the config says)."""
        return self._footprint

    @property
    def runtime_dir(self) -> Path:
        return self._runtime_dir

    async def create_session(self, spec: SessionSpec) -> KernelSession:
        """Register a new session (nothing is launched until `KernelSession.start()`)."""
        if spec.session_id in self._sessions:
            raise KallichoreError(
                ErrorCode.SESSION_EXISTS, f"session {spec.session_id} already exists"
            )
        session = KernelSession(
            spec,
            context=self._context,
            ports=self._ports,
            runtime_dir=self._runtime_dir,
            config=self._config.session,
            sample_interval=self._sample_interval,
            footprint=self._footprint,
            on_rest=self.note_activity,
        )
        self._sessions[spec.session_id] = session
        self.note_activity()
        await self._nursery.start(session.run)
        logger.info(
            "session %s: created (%s, %s)", spec.session_id, spec.display_name, spec.language
        )
        return session

    def get(self, session_id: str) -> KernelSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise KallichoreError(
                ErrorCode.SESSION_NOT_FOUND, f"session {session_id} not found"
            ) from None

    def sessions(self) -> list[KernelSession]:
        return list(self._sessions.values())

    async def delete(self, session_id: str) -> None:
        """Remove a session whose kernel is not running."""
        session = self.get(session_id)
        if session.is_running:
            raise KallichoreError(
                ErrorCode.SESSION_RUNNING,
                f"session {session_id} is {session.status}; only a session whose kernel is "
                "not running can be deleted",
            )
        del self._sessions[session_id]
        await session.aclose()
        logger.info("session %s: deleted", session_id)

    async def shutdown(self, grace: float | None = None) -> None:
        """Shut every kernel down at once; each gets `grace` seconds before it is killed."""
        async with trio.open_nursery() as nursery:
            for session in self._sessions.values():
                nursery.start_soon(session.aclose, grace)

    def kill_all(self) -> None:
        """SIGKILL every kernel now (a second Ctrl-C while shutting down)."""
        for session in self._sessions.values():
            session.kill_now()


@asynccontextmanager
async def open_supervisor(config: SupervisorConfig | None = None) -> AsyncIterator[Supervisor]:
    """Run a supervisor for the duration of the block.

    >>> async with open_supervisor() as sup:
    ...     session = await sup.create_session(SessionSpec(session_id="py", argv=[...]))
    ...     kernel_info = await session.start()
    """
    config = config or SupervisorConfig()
    own_runtime_dir = config.runtime_dir is None
    runtime_dir = (
        Path(tempfile.mkdtemp(prefix="kallichore-"))
        if config.runtime_dir is None
        else config.runtime_dir
    )
    runtime_dir.mkdir(parents=True, exist_ok=True)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with _single_error(), trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, context, runtime_dir, config)
            if own_runtime_dir:
                supervisor.footprint.add_path(runtime_dir)
            try:
                yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor.shutdown()
                nursery.cancel_scope.cancel()
    finally:
        context.destroy(linger=0)
        if own_runtime_dir:
            shutil.rmtree(runtime_dir, ignore_errors=True)
            if config.footprint is not None:
                config.footprint.discard_path(runtime_dir)


@asynccontextmanager
async def _single_error() -> AsyncIterator[None]:
    """Let an exception from the `async with` body come out as itself, not in an ExceptionGroup.

    Nurseries wrap everything they propagate; a user of `open_supervisor()` who raises
    `ValueError` in the block should get `ValueError` back.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group
        raise
