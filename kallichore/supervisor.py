"""The supervisor: a registry of kernel sessions, each running in one root nursery.

`open_supervisor()` is the embeddable entry point. Leaving its block shuts every kernel down
(shutdown_request, a grace period, then SIGKILL of the kernel's process group) and removes the
connection files, so after it returns nothing of ours is left running or lying around.

With a state directory (`SupervisorConfig.state_dir`), every session is recorded there, and
its kernels outlive a supervisor that dies without closing (a closing one still shuts them
down). A new supervisor on the same directory takes the sessions up again before the block of
`open_supervisor()` runs: the kernels still running are re-adopted under the same ids and keys,
the others are `exited`.
"""

from __future__ import annotations

import contextlib
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
from kallichore.session.record import SessionRecord
from kallichore.session.resources import SampleInterval
from kallichore.state_dir import StateDir

logger = logging.getLogger(__name__)


@attrs.frozen
class SupervisorConfig:
    """How the supervisor runs its kernels.

    `runtime_dir` holds the kernels' connection files; by default a private temporary
    directory, removed when the supervisor closes (with a state directory, its `runtime`
    directory: a sweep of what dead daemons left in temporary directories must not find the
    kernels that outlive their daemon on purpose). `state_dir`: see the module docstring.
    """

    runtime_dir: Path | None = None
    state_dir: Path | None = None
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
        state_dir: StateDir | None = None,
    ) -> None:
        self._nursery = nursery
        self._context = context
        self._runtime_dir = runtime_dir
        self._config = config
        self._state_dir = state_dir
        # The records last written, so that only changes reach the disk.
        self._recorded: dict[str, SessionRecord] = {}
        self._ports = PortAllocator.for_this_machine()
        self._sessions: dict[str, KernelSession] = {}
        self._by_kernel_id: dict[str, KernelSession] = {}
        # The session ids and kernel ids of sessions being created (their nursery starting).
        self._creating: set[tuple[str, str]] = set()
        # Sessions whose kernel `start_soon` is starting, and the event set once it is done.
        self._starting: dict[str, trio.Event] = {}
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

    @property
    def state_dir(self) -> StateDir | None:
        return self._state_dir

    async def create_session(self, spec: SessionSpec) -> KernelSession:
        """Register a new session (nothing is launched until `KernelSession.start()`)."""
        if spec.session_id in self._sessions or ("session", spec.session_id) in self._creating:
            raise KallichoreError(
                ErrorCode.SESSION_EXISTS, f"session {spec.session_id} already exists"
            )
        if spec.kernel_id in self._by_kernel_id or ("kernel", spec.kernel_id) in self._creating:
            raise KallichoreError(
                ErrorCode.SESSION_EXISTS, f"a session with kernel id {spec.kernel_id} exists"
            )
        session = await self._add_session(spec)
        self._record(session)
        self.note_activity()
        return session

    async def _add_session(
        self, spec: SessionSpec, key: str | None = None, created: float | None = None
    ) -> KernelSession:
        session = KernelSession(
            spec,
            context=self._context,
            ports=self._ports,
            runtime_dir=self._runtime_dir,
            config=self._config.session,
            sample_interval=self._sample_interval,
            footprint=self._footprint,
            on_rest=self.note_activity,
            on_record=self._record,
            key=key,
            created=created,
        )
        # Reserved while its nursery starts; found by requests only once it can run a kernel.
        reserved = {("session", spec.session_id), ("kernel", spec.kernel_id)}
        self._creating |= reserved
        try:
            await self._nursery.start(session.run)
        finally:
            self._creating -= reserved
        self._sessions[spec.session_id] = session
        self._by_kernel_id[spec.kernel_id] = session
        logger.info(
            "session %s: created (%s, %s)", spec.session_id, spec.display_name, spec.language
        )
        return session

    async def _restore(self) -> None:
        """Take up the sessions recorded in the state directory (see the module docstring).

        Kernels are re-adopted concurrently; one that does not answer is logged, killed and
        its session left `exited`.
        """
        if self._state_dir is None:
            return
        async with trio.open_nursery() as nursery:
            for record in self._state_dir.load():
                session = await self._add_session(record.spec, record.key, record.created)
                nursery.start_soon(self._resume, session, record)

    async def _resume(self, session: KernelSession, record: SessionRecord) -> None:
        try:
            await session.resume(record)
        except KallichoreError as exc:
            logger.warning(
                "session %s: could not re-adopt its kernel: %s", session.session_id, exc.message
            )
        else:
            logger.info("session %s: taken up again (%s)", session.session_id, session.status)
        self._record(session)

    def _record(self, session: KernelSession) -> None:
        """Write the session's record if it changed (a launch, a start, an exit: not per
        message). A disk error is logged; the session goes on."""
        if self._state_dir is None or self._sessions.get(session.session_id) is not session:
            return
        record = session.record()
        if self._recorded.get(session.session_id) == record:
            return
        try:
            self._state_dir.save(record)
        except OSError as exc:
            logger.error("session %s: could not write its record: %s", session.session_id, exc)
            return
        self._recorded[session.session_id] = record

    def start_soon(self, session: KernelSession) -> None:
        """Start `session`'s kernel in the background, for an API that answers before the
        kernel is ready (the Jupyter one). A kernel that fails to start leaves its session
        `exited`; the session has logged why. See `settled()`."""
        done = trio.Event()
        self._starting[session.session_id] = done
        self._nursery.start_soon(self._start_quietly, session, done)

    async def settled(self, session: KernelSession) -> None:
        """Wait until a background start of `session` has ended (at once if none is under
        way): what stops or restarts the kernel must not race the launch."""
        done = self._starting.get(session.session_id)
        if done is not None:
            await done.wait()

    async def _start_quietly(self, session: KernelSession, done: trio.Event) -> None:
        try:
            if self._sessions.get(session.session_id) is session:
                with contextlib.suppress(KallichoreError):
                    await session.start()
        finally:
            del self._starting[session.session_id]
            done.set()

    def get(self, session_id: str) -> KernelSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise KallichoreError(
                ErrorCode.SESSION_NOT_FOUND, f"session {session_id} not found"
            ) from None

    def by_kernel_id(self, kernel_id: str) -> KernelSession:
        """The session the Jupyter Server kernels API calls `kernel_id`."""
        try:
            return self._by_kernel_id[kernel_id]
        except KeyError:
            raise KallichoreError(
                ErrorCode.SESSION_NOT_FOUND, f"kernel {kernel_id} not found"
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
        del self._by_kernel_id[session.spec.kernel_id]
        await session.aclose()
        if self._state_dir is not None:
            self._recorded.pop(session_id, None)
            self._state_dir.remove(session_id)
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
    state_dir = None
    if config.state_dir is not None:
        state_dir = StateDir.open(config.state_dir)
        config = attrs.evolve(
            config,
            runtime_dir=config.runtime_dir or state_dir.runtime_dir,
            session=attrs.evolve(config.session, tied_to_daemon=False),
        )
    own_runtime_dir = config.runtime_dir is None
    runtime_dir = (
        Path(tempfile.mkdtemp(prefix="kallichore-"))
        if config.runtime_dir is None
        else config.runtime_dir
    )
    runtime_dir.mkdir(parents=True, exist_ok=True)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    # Five sockets a kernel: ZeroMQ's default of 1,023 per context would stop at ~200 kernels.
    context.set(zmq.MAX_SOCKETS, context.get(zmq.SOCKET_LIMIT))
    try:
        async with _single_error(), trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, context, runtime_dir, config, state_dir)
            if own_runtime_dir:
                supervisor.footprint.add_path(runtime_dir)
            try:
                await supervisor._restore()
                yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor.shutdown()
                nursery.cancel_scope.cancel()
    finally:
        context.destroy(linger=0)
        if state_dir is not None:
            state_dir.close()
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
