"""One kernel from launch (or adoption) to exit: the I/O shell around `SessionState`.

A run owns, in one nursery whose cancel scope is the run's lifetime, the kernel process and its
output readers, the ZeroMQ pumps, the heartbeat monitor and the resource sampler. Every message
goes the same way: frames from ZeroMQ, verified and parsed (header only), fed to the session's
`SessionState`, whose `Outbox` says what to publish to the event log and what to send to the
kernel. The run ends when the process exits (on its own, killed or shut down); cleaning up
(process group, sockets, connection file, ports) happens in one place, shielded, so that
nothing is left behind however the run ends.

A kernel that a restarted daemon re-adopts (see `kallichore.state_dir`) is a process but not
our child: its exit is seen by watching its pid (and start time), and signals go to it only
while it is still the process we started.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import attrs
import trio
import zmq

from kallichore.allocator import TRIM_AFTER_BYTES, release_free_memory
from kallichore.errors import ErrorCode, KallichoreError, StartupError
from kallichore.footprint import Footprint
from kallichore.jupyter.connection import (
    ConnectionInfo,
    CurveKeys,
    PortAllocator,
    ipc_prefix_fits,
    write_json_file,
)
from kallichore.jupyter.wire import SIGNATURE_SCHEME, Channel, Message, WireError
from kallichore.session import process as kernel_process
from kallichore.session.channels import KernelChannels
from kallichore.session.events import EventLog, OutputEvent, ResourceUsageEvent
from kallichore.session.handshake import (
    HandshakeError,
    Registration,
    RemoteRegistration,
    wants_handshake,
)
from kallichore.session.heartbeat import keep_beating
from kallichore.session.launch.options import LocalLauncher, SlurmLauncher, SshLauncher
from kallichore.session.launch.remote import RemoteKernel, shim_python
from kallichore.session.launch.slurm import SlurmPlan
from kallichore.session.launch.ssh import SshPlan
from kallichore.session.model import (
    SessionConfig,
    SessionSpec,
    StartupEnvironment,
    Status,
    VarAction,
    resolve_environment,
)
from kallichore.session.record import ProcessIdentity
from kallichore.session.resources import ResourceSampler, ResourceUsage, SampleInterval
from kallichore.session.startup import (
    build_command,
    choose_shell,
    is_marker_line,
    startup_failure_details,
)
from kallichore.session.state import READOPTED, Outbox, SessionState

logger = logging.getLogger(__name__)

HEARTBEAT_PAYLOAD = b"kallichore-heartbeat"
# Output lines kept for a StartupError; a kernel that prints more before failing is cut short.
MAX_STARTUP_OUTPUT_LINES = 2000
# An adopted kernel has no process to watch; this many missed heartbeats in a row end it.
ADOPTED_HEARTBEAT_MISSES = 3
# How long the output readers may go on after the process exits (a grandchild can hold a pipe).
OUTPUT_DRAIN_SECONDS = 1.0


IPC_DIRECTORY_PREFIX = "ipc-"


def _own_ipc_directory(connection: ConnectionInfo | None) -> Path | None:
    """The directory of the sockets of an ipc kernel a previous daemon of ours launched
    (re-adopted), so that it goes when the kernel does."""
    if connection is None or connection.transport != "ipc":
        return None
    directory = Path(connection.ip).parent
    return directory if directory.name.startswith(IPC_DIRECTORY_PREFIX) else None


class Activity:
    """When a message last came from the kernel or went to it (wall-clock seconds): the Jupyter
    API's `last_activity`. The hot path only stores a float per batch; formatting waits until
    somebody asks."""

    __slots__ = ("last",)

    def __init__(self, last: float) -> None:
        self.last = last

    def note(self) -> None:
        self.last = time.time()


@attrs.frozen
class RunContext:
    """What a run needs from its session and supervisor."""

    spec: SessionSpec
    key: str
    state: SessionState
    events: EventLog
    context: zmq.Context[zmq.Socket[bytes]]
    ports: PortAllocator
    runtime_dir: Path
    config: SessionConfig
    sample_interval: SampleInterval
    # Where kernels are recorded, for the next daemon to sweep should this one be killed.
    footprint: Footprint
    # Called when the session comes to rest (idle shutdown counts from then).
    on_rest: Callable[[], None]
    # Called when what a session record holds changed: a kernel was launched, became ready or
    # exited.
    on_record: Callable[[], None]
    # Builds a message with the session's header.
    message: Callable[..., Message]
    activity: Activity


class KernelRun:
    """One kernel run; see the module docstring. `KernelSession` starts and stops it."""

    def __init__(
        self,
        ctx: RunContext,
        *,
        env: Sequence[VarAction] = (),
        adopt: ConnectionInfo | None = None,
        adopted_process: ProcessIdentity | None = None,
    ) -> None:
        """`adopt`: take over the kernel listening there instead of launching one; with
        `adopted_process`, its process (a kernel a previous daemon launched)."""
        self._ctx = ctx
        self._env = env
        self._adopted = adopt is not None
        # Adopted with no process known: only the kernel's own messages tell that it ended.
        self._processless = adopt is not None and adopted_process is None
        # A kernel a previous daemon launched: it may be busy with work of before the restart.
        self._readopted = adopted_process is not None
        self._connection = adopt
        self.process: trio.Process | None = None
        # A kernel on another machine (ssh, slurm), run by our shim through a local command.
        self.remote: RemoteKernel | None = None
        # The kernel's process as a record keeps it: ours, or the re-adopted one.
        self._identity = adopted_process
        self.channels: KernelChannels | None = None
        self.initial_env: dict[str, str] = {}
        self.resource_usage: ResourceUsage | None = None
        self.cancel_scope = trio.CancelScope()
        self.exited = trio.Event()
        self.exit_code: int | None = None
        self._registration: Registration | None = None
        self._connection_file: Path | None = None
        self._ports: list[int] = []
        # The private directory of an ipc kernel's sockets, removed when the run ends.
        self._ipc_directory = _own_ipc_directory(adopt) if self._readopted else None
        self._shell: str | None = None
        self._startup_output: list[str] = []
        self._markers_seen: list[str] = []
        self._ready = False
        # Set whenever a pump has fed the state machine; renewed by whoever waits on it.
        self._fed = trio.Event()
        # The event log's published bytes when this run last gave free memory back.
        self._trimmed_at = 0

    @property
    def process_id(self) -> int | None:
        """The kernel's pid while it runs (on its own host, for a remote kernel; until that
        is known, the local command's)."""
        if self.exited.is_set():
            return None
        if self.remote is not None:
            return self.remote.remote_pid or self.remote.pid
        return self._local_pid()

    def _local_pid(self) -> int | None:
        """The pid of the kernel when it runs on this machine."""
        if self.exited.is_set() or self.remote is not None:
            return None
        if self.process is not None:
            return self.process.pid
        return None if self._identity is None else self._identity.pid

    @property
    def location(self) -> dict[str, object] | None:
        """Where a remote kernel runs (launcher, host, job id, pid); None for a local one."""
        return None if self.remote is None else self.remote.details()

    @property
    def process_identity(self) -> ProcessIdentity | None:
        """The kernel's pid and start time while it runs (for the session's record)."""
        return None if self.exited.is_set() else self._identity

    # -- the state machine's outbox, carried out -------------------------------------------

    def publish(self, out: Outbox) -> None:
        """Carry out the synchronous part of `out`: the events, in order."""
        ctx = self._ctx
        if out.check_working_directory_at is not None:
            ctx.state.working_directory_seen(self.working_directory(), out)
        ctx.events.publish_many(out.events)
        if out.rested:
            ctx.on_rest()

    async def deliver(self, out: Outbox) -> None:
        """Carry out `out`: publish its events, then send its messages to the kernel."""
        self.publish(out)
        if out.to_kernel:
            channels = self._require_channels()
            for channel, message in out.to_kernel:
                await channels.send(channel, message)

    def _require_channels(self) -> KernelChannels:
        if self.channels is None:
            raise KallichoreError(ErrorCode.SESSION_NOT_RUNNING, "the kernel is still starting")
        return self.channels

    def working_directory(self) -> str | None:
        pid = self._local_pid()
        return None if pid is None else kernel_process.current_directory(pid)

    # -- the run ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Launch (or adopt), connect, serve until the kernel exits, and clean up.

        Reports started once the kernel is ready; raises `StartupError` if it never is.
        """
        ctx = self._ctx
        if not self._adopted:
            out = Outbox()
            ctx.state.starting(out)
            self.publish(out)
            await self._launch()
        failure: KallichoreError | None = None
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    if self.remote is not None:
                        nursery.start_soon(self._watch_remote, self.remote)
                    elif self.process is not None:
                        nursery.start_soon(self._watch_process, self.process)
                    elif self._identity is not None:
                        nursery.start_soon(self._watch_readopted, self._identity)
                    failure = await self._connect(nursery)
                    if failure is not None:
                        self.cancel_scope.cancel()
                    else:
                        channels = self._require_channels()
                        nursery.start_soon(self._pump, channels, Channel.STDIN)
                        self._startup_output.clear()
                        self._ready = True
                        logger.info("session %s: kernel ready", ctx.spec.session_id)
                        out = Outbox()
                        ctx.state.kernel_ready(out, READOPTED if self._readopted else None)
                        self.publish(out)
                        ctx.on_record()
                        nursery.start_soon(self._monitor_heartbeat, channels)
                        if (pid := self._local_pid()) is not None:
                            nursery.start_soon(self._sample_resources, pid)
                        task_status.started()
        except Exception:
            if not self._ready:
                raise
            logger.exception("session %s: internal error, ending its kernel", ctx.spec.session_id)
        finally:
            with trio.CancelScope(shield=True):
                await self._reap()
        if not self._ready:
            raise failure or self._exited_during_start()

    async def _launch(self) -> None:
        """Spawn the kernel, told where to connect by a connection or registration file."""
        ctx = self._ctx
        spec = ctx.spec
        if not spec.argv:
            self._launch_failed("empty argv")
            raise StartupError(ErrorCode.PROCESS_START_FAILED, "the session has no argv to start")
        if not isinstance(spec.launcher, LocalLauncher):
            await self._launch_remote(spec.launcher)
            return
        env = resolve_environment(os.environ, self._env)
        kernel_process.watch_parent(env, outlive=not ctx.config.tied_to_daemon)
        self.initial_env = env
        cwd = ctx.state.working_directory or None
        if cwd is not None and not os.path.isdir(cwd):
            logger.warning("session %s: working directory %r does not exist", spec.session_id, cwd)
            cwd = None
        mode = spec.startup_environment
        self._shell = choose_shell(os.environ) if mode is not StartupEnvironment.NONE else None
        try:
            if wants_handshake(spec.protocol_version):
                self._registration = Registration(ctx.context, ctx.key)
                path = ctx.runtime_dir / f"registration-{spec.session_id}.json"
                contents = self._registration.file_contents()
            else:
                self._connection = self._new_connection()
                ctx.state.connected_at(self._connection)
                path = ctx.runtime_dir / f"kernel-{spec.session_id}.json"
                contents = self._connection.to_dict()
            self._connection_file = path
            argv = [arg.replace("{connection_file}", str(path)) for arg in spec.argv]
            command = build_command(
                argv, mode, spec.startup_environment_arg, working_directory=cwd, shell=self._shell
            )
            # Not synced: the kernel reads it at once, and a crash of the machine ends the
            # kernel too; an fsync here held up every other start when many began at once.
            write_json_file(path, contents, fsync=False)
            self.process = await kernel_process.launch(command, env, cwd)
            self._identity = kernel_process.identify(self.process.pid)
            # Shielded: a cancellation here, before `run` owns the process, would leak it.
            with trio.CancelScope(shield=True):
                await ctx.footprint.kernel_started(
                    self.process.pid,
                    detached=not ctx.config.tied_to_daemon,
                    paths=[path] if self._ipc_directory is None else [path, self._ipc_directory],
                )
            logger.info("session %s: kernel started (pid %d)", spec.session_id, self.process.pid)
            ctx.on_record()
        except BaseException as exc:
            self._release()
            error = self._launch_error(exc, f"the kernel {spec.argv[0]!r}")
            if error is exc:
                raise
            raise error from exc

    def _launch_error(self, exc: BaseException, what: str) -> BaseException:
        """What a launch that raised `exc` raises, once its failure is published: an OSError
        (the program is missing, say) as a StartupError naming `what`; anything else as is."""
        self._launch_failed(exc.message if isinstance(exc, KallichoreError) else str(exc))
        if not isinstance(exc, OSError):
            return exc
        return StartupError(
            ErrorCode.PROCESS_START_FAILED,
            f"failed to start {what}: {exc.strerror or exc}",
            exit_code=exc.errno,
        )

    async def _launch_remote(self, options: SshLauncher | SlurmLauncher) -> None:
        """Run our shim where the kernel is to run; it registers the kernel's ports with us.

        The order on the shim's stdin holds nothing secret (srun carries it unencrypted):
        the shim makes the kernel's HMAC key and CurveZMQ key pair itself, and brings them with
        the ports over the encrypted registration (see `RemoteRegistration`).
        """
        ctx = self._ctx
        spec = ctx.spec
        plan: SshPlan | SlurmPlan = (
            SshPlan(options)
            if isinstance(options, SshLauncher)
            else SlurmPlan(options, spec.session_id)
        )
        try:
            registration = RemoteRegistration(ctx.context, await plan.registration_ip())
            self._registration = registration
            order = {
                "argv": list(spec.argv),
                # Set on top of the remote environment: append and prepend add to nothing here.
                "env": resolve_environment({}, self._env),
                "cwd": None,
                "signature_scheme": SIGNATURE_SCHEME,
                "registration": registration.url,
                "registration_publickey": registration.public_key,
                "own_session": plan.own_session,
                "reconnect_seconds": plan.reconnect_seconds,
            }
            python = shim_python(options.python, spec.argv)
            self.remote = RemoteKernel(plan, python, order, self._line, self._waiting)
            await self.remote.start()
            with trio.CancelScope(shield=True):
                assert self.remote.pid is not None
                await ctx.footprint.kernel_started(self.remote.pid, detached=False, paths=[])
            logger.info("session %s: %s launcher started", spec.session_id, plan.name)
            ctx.on_record()
        except BaseException as exc:
            if self.remote is not None:
                with trio.CancelScope(shield=True):
                    await self.remote.stop()
            self._release()
            what = f"the {plan.name} launcher"
            if isinstance(exc, OSError) and exc.filename:
                # The program missing from the daemon's PATH, most likely: ssh or srun.
                what += f": {exc.filename!r}"
            error = self._launch_error(exc, what)
            if error is exc:
                raise
            raise error from exc

    def _waiting(self, reason: str) -> None:
        out = Outbox()
        self._ctx.state.waiting(reason, out)
        self.publish(out)

    def _new_connection(self) -> ConnectionInfo:
        """Where a kernel we launch is to listen: Unix sockets in a fresh 0700 directory (in
        the runtime directory, or the system's temporary one if that path is too long for a
        Unix socket), or else, and when so configured, five loopback TCP ports."""
        ctx = self._ctx
        if ctx.config.kernel_transport == "ipc":
            for parent in (ctx.runtime_dir, Path(tempfile.gettempdir())):
                directory = Path(tempfile.mkdtemp(prefix=IPC_DIRECTORY_PREFIX, dir=parent))
                prefix = str(directory / "kernel")
                if ipc_prefix_fits(prefix):
                    self._ipc_directory = directory
                    return self._encrypted(ConnectionInfo.over_ipc(prefix, ctx.key))
                directory.rmdir()
            logger.warning(
                "session %s: no directory with a path short enough for Unix sockets; "
                "the kernel listens on TCP",
                ctx.spec.session_id,
            )
        self._ports = ctx.ports.allocate(5)
        return self._encrypted(ConnectionInfo.on_ports(self._ports, ctx.key))

    def _encrypted(self, info: ConnectionInfo) -> ConnectionInfo:
        """`info` with a fresh CurveZMQ key pair when the kernelspec says the kernel takes one."""
        launcher = self._ctx.spec.launcher
        if not (isinstance(launcher, LocalLauncher) and launcher.curve):
            return info
        keys = CurveKeys.new()
        return attrs.evolve(info, curve_publickey=keys.public, curve_secretkey=keys.secret)

    def _launch_failed(self, reason: str) -> None:
        out = Outbox()
        self._ctx.state.launch_failed(reason, out)
        self.publish(out)
        self.exited.set()

    async def _connect(self, nursery: trio.Nursery) -> KallichoreError | None:
        """Handshake (JEP 66), ZeroMQ connect and kernel_info, within `connection_timeout`.

        Readiness needs the kernel_info_reply on shell, proof that our iopub subscription
        is live, and a stdin connection the kernel knows (see `KernelChannels`). ipykernel 7
        proves the iopub subscription with `iopub_welcome`; for other kernels a fresh
        kernel_info_request makes them publish busy/idle, so we ask again, backing off, until
        something arrives on iopub.
        """
        ctx = self._ctx
        state = ctx.state
        timeout = ctx.spec.connection_timeout
        try:
            with trio.fail_after(timeout):
                if self._registration is not None:
                    failure = await self._await_handshake()
                    if failure is not None:
                        return failure
                assert self._connection is not None
                channels = KernelChannels(
                    ctx.context, self._connection, ctx.spec.session_id.encode()
                )
                self.channels = channels
                nursery.start_soon(self._pump, channels, Channel.IOPUB)
                nursery.start_soon(self._pump, channels, Channel.SHELL)
                nursery.start_soon(self._pump, channels, Channel.CONTROL)
                await self._request_kernel_info(channels)
                while not state.kernel_info_received:
                    await self._fed_again()
                delay = 0.1
                while not state.iopub_alive:
                    with trio.move_on_after(delay):
                        await self._fed_again()
                    if not state.iopub_alive:
                        await self._request_kernel_info(channels)
                        delay = min(delay * 2, 1.0)
                await channels.connect_stdin()
        except trio.TooSlowError:
            if self._registration is not None and self._connection is None:
                remote = self.remote
                return StartupError(
                    ErrorCode.HANDSHAKE_FAILED,
                    f"the kernel did not register within {timeout:g} seconds",
                    f"the {remote.plan.name} launcher had not started the kernel yet; a longer "
                    "connection_timeout gives it more time"
                    if remote is not None and remote.remote_pid is None
                    else "timed out waiting for the JEP 66 handshake",
                )
            return StartupError(
                ErrorCode.SESSION_CONNECTION_TIMEOUT,
                f"the kernel did not connect within {timeout:g} seconds",
                self._failure_details("the kernel failed to connect to its ZeroMQ sockets"),
                exit_code=130,
                output="".join(self._startup_output),
            )
        return None

    async def _fed_again(self) -> None:
        """Wait until a pump has fed the state machine again."""
        self._fed = trio.Event()
        await self._fed.wait()

    async def _await_handshake(self) -> KallichoreError | None:
        assert self._registration is not None
        try:
            with self._registration:
                if isinstance(self._registration, RemoteRegistration):
                    assert self.remote is not None
                    connection = await self._registration.wait_vouched(self.remote.vouched)
                else:
                    connection = await self._registration.wait()
        except HandshakeError as exc:
            return StartupError(
                ErrorCode.HANDSHAKE_FAILED,
                f"the kernel's JEP 66 handshake failed: {exc}",
                output="".join(self._startup_output),
            )
        self._connection = connection
        if isinstance(self._registration, RemoteRegistration) and self.remote is not None:
            self.remote.announced(self._registration.announced)
            # Its address, for a person reading the log (ports change with every start).
            logger.info(
                "session %s: the kernel registered from %s",
                self._ctx.spec.session_id,
                connection.ip,
            )
        out = Outbox()
        self._ctx.state.registered(self._ctx.spec.session_id, connection, out)
        self.publish(out)
        return None

    def _exited_during_start(self) -> StartupError:
        output = "".join(self._startup_output)
        if self.remote is not None and self.remote.remote_pid is None:
            return StartupError(
                ErrorCode.EXITED_BEFORE_CONNECTION,
                f"the {self.remote.plan.name} launcher did not start the kernel: "
                f"{self.remote.reason}",
                exit_code=self.exit_code,
                output=output,
            )
        if self._registration is not None and self._connection is None:
            return StartupError(
                ErrorCode.EXITED_BEFORE_CONNECTION,
                f"the kernel exited with code {self.exit_code} before it registered",
                self._failure_details("the kernel exited before connecting"),
                exit_code=self.exit_code,
                output=output,
            )
        return StartupError(
            ErrorCode.PROCESS_ABNORMAL_EXIT,
            f"the kernel exited with code {self.exit_code} before it was ready",
            self._failure_details("the kernel process exited during startup"),
            exit_code=self.exit_code,
            output=output,
        )

    def _failure_details(self, default: str) -> str:
        spec = self._ctx.spec
        details = startup_failure_details(
            spec.startup_environment,
            spec.startup_environment_arg,
            self._shell,
            "".join(self._markers_seen),
        )
        return details or default

    async def _request_kernel_info(self, channels: KernelChannels) -> None:
        """Ask on shell; a re-adopted kernel on control, which answers even while shell is
        busy with an execution that began before the restart."""
        request = self._ctx.message("kernel_info_request")
        self._ctx.state.startup_request(request.msg_id)
        await channels.send(Channel.CONTROL if self._readopted else Channel.SHELL, request)

    async def _watch_process(self, process: trio.Process) -> None:
        """Read the kernel's output until it exits, then end the run."""
        async with trio.open_nursery() as readers:
            if process.stdout is not None:
                readers.start_soon(kernel_process.read_lines, process.stdout, "stdout", self._line)
            if process.stderr is not None:
                readers.start_soon(kernel_process.read_lines, process.stderr, "stderr", self._line)
            self.exit_code = await process.wait()
            readers.cancel_scope.deadline = trio.current_time() + OUTPUT_DRAIN_SECONDS
        self.cancel_scope.cancel()

    async def _watch_remote(self, remote: RemoteKernel) -> None:
        """Follow a remote kernel until it ends, then end the run."""
        await remote.run()
        self.exit_code = remote.exit_code
        self.cancel_scope.cancel()

    async def _watch_readopted(self, identity: ProcessIdentity) -> None:
        """End the run when a re-adopted kernel's process is gone."""
        await kernel_process.wait_gone(identity)
        self.cancel_scope.cancel()

    def _line(self, stream: Literal["stdout", "stderr"], text: str) -> None:
        if is_marker_line(text):
            # The shell wrapper's progress markers explain a failed start; clients never see them.
            self._markers_seen.append(text)
            return
        if not self._ctx.state.ready and len(self._startup_output) < MAX_STARTUP_OUTPUT_LINES:
            self._startup_output.append(text)
        self._ctx.events.publish(OutputEvent(stream, text))

    async def _pump(self, channels: KernelChannels, channel: Channel) -> None:
        """The hot path: a batch of frames from one kernel socket, verified, parsed (header
        only), followed by the state machine, and published as one batch of events (a caught-up
        client gets it in one write); then whatever the state says to send (the next queued
        execution) goes to the kernel."""
        sock = channels.socket(channel)
        while True:
            # The batch is handed over, not kept here: after a burst it may hold hundreds of
            # MiB of output, which must not stay alive until the channel's next message.
            await self._take(channels, channel, await sock.recv_batch())
            if (
                self._ctx.events.published_bytes - self._trimmed_at > TRIM_AFTER_BYTES
                and self._ctx.state.status is Status.IDLE
            ):
                # A burst is over and its batches are gone (nothing here refers to them).
                self._trimmed_at = self._ctx.events.published_bytes
                await trio.to_thread.run_sync(release_free_memory)

    async def _take(
        self, channels: KernelChannels, channel: Channel, batch: list[list[bytes]]
    ) -> None:
        out = self._follow(channels, channel, batch)
        del batch
        self._ctx.activity.note()
        await self.deliver(out)
        self._fed.set()

    def _follow(
        self, channels: KernelChannels, channel: Channel, batch: list[list[bytes]]
    ) -> Outbox:
        """Verify and parse a batch, and let the state machine follow it."""
        out = Outbox()
        state = self._ctx.state
        detail = logger.isEnabledFor(logging.DEBUG)
        for frames in batch:
            try:
                message = channels.parse(frames)
            except WireError as exc:
                logger.warning(
                    "session %s: dropped a message on %s: %s",
                    self._ctx.spec.session_id,
                    channel,
                    exc,
                )
                continue
            if detail:
                logger.debug(
                    "session %s: %s %s from the kernel",
                    self._ctx.spec.session_id,
                    channel,
                    message.msg_type,
                )
            state.from_kernel(channel, message, out)
            if (
                self._processless
                and channel is not Channel.IOPUB
                and message.msg_type == "shutdown_reply"
            ):
                # An adopted kernel is going away; there is no process to watch for it.
                self.cancel_scope.cancel()
        return out

    async def _monitor_heartbeat(self, channels: KernelChannels) -> None:
        """Mark the session offline when the kernel misses a heartbeat, and back when it answers.

        Each beat also lets the state give up on idles that never came. An adopted kernel with
        no process to watch ends when it misses several beats in a row.
        """
        ctx = self._ctx
        config = ctx.config
        sock = channels.socket(Channel.HEARTBEAT)

        async def ping() -> None:
            await sock.send_multipart([HEARTBEAT_PAYLOAD])
            await sock.recv_multipart()

        async def on_beat(misses: int) -> None:
            out = Outbox()
            if misses:
                ctx.state.heartbeat_missed(out)
                if self._processless and misses >= ADOPTED_HEARTBEAT_MISSES:
                    self.cancel_scope.cancel()
            else:
                ctx.state.heartbeat_answered(out)
            ctx.state.check_overdue(out)
            await self.deliver(out)

        def interval() -> float:
            if ctx.events.attached:
                return config.heartbeat_interval
            return config.unattended_heartbeat_interval

        await keep_beating(ping, on_beat, timeout=config.heartbeat_timeout, interval=interval)

    async def _sample_resources(self, pid: int) -> None:
        """Publish the kernel's CPU and memory use while a client is attached."""
        ctx = self._ctx
        sampler = ResourceSampler()
        while True:
            await ctx.events.wait_attached()
            interval_ms = await ctx.sample_interval.wait()
            if not ctx.events.attached:
                continue
            usage = sampler.sample(pid, interval_ms)
            if usage is None:
                return
            self.resource_usage = usage
            ctx.events.publish(ResourceUsageEvent(usage))

    async def _reap(self) -> None:
        """Make sure the kernel's process group is gone, then release everything of the run."""
        process = self.process
        if self.remote is not None:
            await self.remote.stop()
            self.exit_code = self.remote.exit_code
            assert self.exit_code is not None
            reason = self.remote.reason or "the remote kernel ended"
            logger.info("session %s: %s", self._ctx.spec.session_id, reason)
        elif process is not None:
            kernel_process.kill_group(process.pid)
            if process.returncode is None:
                # It may have left its process group; the group kill would then miss it.
                process.kill()
            exit_code = await process.wait()
            if self.exit_code is None:
                self.exit_code = exit_code
            reason = "child process exited"
            logger.info(
                "session %s: kernel (pid %d) %s",
                self._ctx.spec.session_id,
                process.pid,
                kernel_process.describe_exit(self.exit_code),
            )
        elif self._identity is not None:
            # Not our child: no exit code to be had (reported as 0, as for adopted kernels).
            if kernel_process.is_running(self._identity):
                kernel_process.kill_group(self._identity.pid)
                await kernel_process.wait_gone(self._identity)
            self.exit_code = 0
            reason = "the re-adopted kernel's process exited"
            logger.info("session %s: the re-adopted kernel is gone", self._ctx.spec.session_id)
        else:
            self.exit_code = 0
            reason = "all sockets disconnected from an adopted kernel"
            logger.info("session %s: the adopted kernel is gone", self._ctx.spec.session_id)
        self._release()
        if process is not None:
            await self._ctx.footprint.kernel_exited(process.pid)
        elif self.remote is not None and self.remote.pid is not None:
            await self._ctx.footprint.kernel_exited(self.remote.pid)
        out = Outbox()
        self._ctx.state.exited(self.exit_code, reason, out)
        self.publish(out)
        self.exited.set()
        self._ctx.on_record()

    def _release(self) -> None:
        if self.channels is not None:
            self.channels.close()
        if self._registration is not None:
            self._registration.close()
        if self._connection_file is not None:
            self._connection_file.unlink(missing_ok=True)
        if self._ipc_directory is not None:
            # The kernel removes its socket files when it closes them, unless it was killed.
            shutil.rmtree(self._ipc_directory, ignore_errors=True)
        self._ctx.ports.release(self._ports)

    # -- control ---------------------------------------------------------------------------

    def kill(self) -> bool:
        """SIGKILL the kernel's process group (an adopted kernel: end the run); False if the
        process was not found."""
        if self.process is None and self._identity is None and self.remote is None:
            self.cancel_scope.cancel()
            return True
        return self.signal(signal.SIGKILL)

    def signal(self, signum: int) -> bool:
        """Signal the kernel's process group; False if there is no process of ours to signal
        (a re-adopted kernel's pid is only trusted while its start time is the recorded one)."""
        if self.remote is not None:
            return self.remote.signal(signum)
        if self.process is not None:
            return kernel_process.signal_group(self.process.pid, signum)
        identity = self._identity
        return (
            identity is not None
            and kernel_process.is_running(identity)
            and kernel_process.signal_group(identity.pid, signum)
        )
