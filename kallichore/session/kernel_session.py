"""One supervised kernel session: a trio nursery that owns the kernel and everything around it.

A session outlives its kernels. Each start launches a kernel *run*: the process, its output
readers, the ZeroMQ pumps and the heartbeat monitor, all in one nursery whose cancel scope is
the run's lifetime. The run ends when the process exits (on its own, killed or shut down);
cleaning up (process group, sockets, connection file, ports) happens in one place, shielded, so
that nothing is left behind however the run ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import attrs
import psutil
import trio
import zmq

from kallichore.errors import ErrorCode, KallichoreError, StartupError
from kallichore.jupyter.connection import (
    ConnectionInfo,
    PortAllocator,
    new_key,
    write_json_file,
)
from kallichore.jupyter.wire import Channel, JSONObject, Message, WireError
from kallichore.session import process as kernel_process
from kallichore.session.channels import KernelChannels
from kallichore.session.events import (
    EventLog,
    ExecutionQueuedEvent,
    ExitedEvent,
    HandshakeCompletedEvent,
    JupyterEvent,
    OutputEvent,
    StatusEvent,
    WorkingDirChangedEvent,
)
from kallichore.session.execution_queue import ExecutionQueue
from kallichore.session.handshake import HandshakeError, Registration, wants_handshake
from kallichore.session.model import (
    InterruptMode,
    SessionSpec,
    StartupEnvironment,
    Status,
    VarAction,
    resolve_environment,
)
from kallichore.session.resources import ResourceUsage
from kallichore.session.startup import (
    build_command,
    choose_shell,
    is_marker_line,
    startup_failure_details,
)

logger = logging.getLogger(__name__)

HEARTBEAT_PAYLOAD = b"kallichore-heartbeat"
# Output lines kept for a StartupError; a kernel that prints more before failing is cut short.
MAX_STARTUP_OUTPUT_LINES = 2000
# An adopted kernel has no process to watch; this many missed heartbeats in a row end it.
ADOPTED_HEARTBEAT_MISSES = 3
# How long the output readers may go on after the process exits (a grandchild can hold a pipe).
OUTPUT_DRAIN_SECONDS = 1.0


@attrs.frozen
class SessionConfig:
    """Tunables shared by every session of a supervisor."""

    event_buffer_size: int = 100_000
    heartbeat_interval: float = 2.0
    # While no client watches the session, `offline` can wait: beat less often, so that many
    # idle sessions cost next to nothing.
    unattended_heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 5.0
    shutdown_grace: float = 10.0


@attrs.define(eq=False)
class _KernelRun:
    """One kernel from launch (or adoption) to exit."""

    process: trio.Process | None
    connection: ConnectionInfo | None = None
    channels: KernelChannels | None = None
    registration: Registration | None = None
    connection_file: Path | None = None
    ports: list[int] = attrs.field(factory=list)
    shell: str | None = None
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    ready: bool = False
    exit_code: int | None = None
    exited: trio.Event = attrs.field(factory=trio.Event)
    startup_output: list[str] = attrs.field(factory=list)
    markers_seen: list[str] = attrs.field(factory=list)
    # Our own kernel_info_requests: their replies and busy/idle are not forwarded to clients.
    startup_requests: set[str] = attrs.field(factory=set)
    kernel_info_received: trio.Event = attrs.field(factory=trio.Event)
    iopub_alive: trio.Event = attrs.field(factory=trio.Event)

    def require_channels(self) -> KernelChannels:
        if self.channels is None:
            raise KallichoreError(ErrorCode.SESSION_NOT_RUNNING, "the kernel is still starting")
        return self.channels


class KernelSession:
    """A kernel session; see the module docstring. Created by the `Supervisor`."""

    def __init__(
        self,
        spec: SessionSpec,
        *,
        context: zmq.Context[zmq.Socket[bytes]],
        ports: PortAllocator,
        runtime_dir: Path,
        config: SessionConfig,
        on_rest: Callable[[], None] = lambda: None,
    ) -> None:
        self.spec = spec
        self.key = new_key()
        self.created = time.time()
        self.status = Status.UNINITIALIZED
        self.events = EventLog(config.event_buffer_size)
        self.execution_queue = ExecutionQueue()
        self.kernel_info: JSONObject = {}
        self.working_directory = spec.working_directory
        self.env_actions: tuple[VarAction, ...] = spec.env
        self.initial_env: dict[str, str] = {}
        self.connection_info: ConnectionInfo | None = None
        self.idle_since: float | None = None
        self.busy_since: float | None = None
        # Set by the API layer while a channels client is attached.
        self.connected = False
        self.resource_usage: ResourceUsage | None = None
        self.input_prompt = spec.input_prompt
        self.continuation_prompt = spec.continuation_prompt
        self._context = context
        self._ports = ports
        self._runtime_dir = runtime_dir
        self._config = config
        self._on_rest = on_rest
        self._kernel: _KernelRun | None = None
        self._nursery: trio.Nursery | None = None
        self._lifecycle = trio.Lock()

    @property
    def session_id(self) -> str:
        return self.spec.session_id

    @property
    def process_id(self) -> int | None:
        kernel = self._kernel
        return kernel.process.pid if kernel is not None and kernel.process is not None else None

    @property
    def is_running(self) -> bool:
        """A kernel process exists (it may still be starting)."""
        return self._kernel is not None

    def __repr__(self) -> str:
        return f"<KernelSession {self.session_id} {self.status}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The session's nursery; runs until `aclose()`. Kernel runs are started inside it."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> JSONObject:
        """Launch the kernel and return its kernel_info_reply content once it is ready.

        Already running: returns the kernel_info it started with. Raises `StartupError` (with
        the exit code and everything the kernel printed) if it cannot be started.
        """
        async with self._lifecycle:
            if self._kernel is not None:
                return self.kernel_info
            return await self._start_run()

    async def restart(
        self,
        working_directory: str | None = None,
        env: Sequence[VarAction] | None = None,
    ) -> JSONObject:
        """Shut the kernel down (gracefully, then by force) and start it again.

        Keeps the session id and key. A new working directory and env action list apply to the
        new kernel; without a working directory the kernel's current one is kept. A session
        whose kernel is not running is simply started.
        """
        if self._lifecycle.locked():
            raise KallichoreError(
                ErrorCode.RESTART_FAILED, "a restart or start is already in progress"
            )
        async with self._lifecycle:
            if working_directory:
                path = Path(working_directory).expanduser()
                if not path.is_dir():
                    raise KallichoreError(
                        ErrorCode.RESTART_FAILED,
                        f"working directory {working_directory!r} does not exist",
                    )
                self.working_directory = str(path.resolve())
            elif (cwd := self._kernel_cwd()) is not None:
                self.working_directory = cwd
            if env:
                self.env_actions = tuple(env)
            await self._stop_kernel(restart=True, grace=self._config.shutdown_grace)
            return await self._start_run()

    async def shutdown(self, grace: float | None = None) -> None:
        """Ask the kernel to exit (`shutdown_request`); kill its process group after `grace` s."""
        await self._stop_kernel(
            restart=False, grace=self._config.shutdown_grace if grace is None else grace
        )

    async def kill(self) -> None:
        """SIGKILL the kernel's process group and wait until its exit has been processed."""
        kernel = self._kernel
        if kernel is None:
            raise KallichoreError(
                ErrorCode.SESSION_NOT_RUNNING, f"session {self.session_id} is not running"
            )
        if kernel.process is None:
            raise KallichoreError(
                ErrorCode.NO_PROCESS, f"session {self.session_id} has no kernel process to kill"
            )
        self.execution_queue.clear()
        if not kernel_process.kill_group(kernel.process.pid):
            raise KallichoreError(
                ErrorCode.PROCESS_NOT_FOUND,
                f"kernel process {kernel.process.pid} not found",
                "could not send the kill signal",
            )
        await kernel.exited.wait()

    def kill_now(self) -> None:
        """SIGKILL the kernel's process group without waiting (the exit is processed as usual)."""
        kernel = self._kernel
        if kernel is not None and kernel.process is not None:
            kernel_process.kill_group(kernel.process.pid)

    async def interrupt(self) -> None:
        """Interrupt the kernel's current work, by signal or by message per `interrupt_mode`."""
        kernel = self._require_kernel(ErrorCode.SESSION_INTERRUPT_FAILED)
        if self.spec.interrupt_mode is InterruptMode.SIGNAL:
            if kernel.process is None or not kernel_process.signal_group(
                kernel.process.pid, signal.SIGINT
            ):
                raise KallichoreError(
                    ErrorCode.SESSION_INTERRUPT_FAILED,
                    f"session {self.session_id} has no kernel process to signal",
                )
        else:
            await self.send(Channel.CONTROL, self.message("interrupt_request"))

    async def adopt(self, connection: ConnectionInfo) -> JSONObject:
        """Take over a kernel somebody else started, given its connection info.

        Messages are signed with the key in `connection` (which, in Positron's flow, is the
        one `external_connection_info()` handed out). There is no process to watch: the kernel
        is considered gone after its `shutdown_reply` or several missed heartbeats.
        """
        async with self._lifecycle:
            if self._kernel is not None:
                raise KallichoreError(
                    ErrorCode.SESSION_CONNECTION_FAILED,
                    f"session {self.session_id} already has a running kernel",
                )
            self.connection_info = connection
            return await self._start_run(adopt=connection)

    def external_connection_info(self) -> ConnectionInfo:
        """The connection info for a kernel to be started by somebody else and then adopted."""
        if self.connection_info is None:
            try:
                ports = self._ports.allocate(5)
            except OSError as exc:
                raise KallichoreError(
                    ErrorCode.NO_CONNECTION_INFO, f"could not allocate ports: {exc}"
                ) from exc
            self.connection_info = ConnectionInfo(
                control_port=ports[0],
                shell_port=ports[1],
                iopub_port=ports[2],
                hb_port=ports[3],
                stdin_port=ports[4],
                key=self.key,
            )
        return self.connection_info

    async def aclose(self, grace: float | None = None) -> None:
        """Shut the kernel down and end the session: its event log closes, its nursery ends."""
        await self.shutdown(grace)
        self.events.close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- messages ----------------------------------------------------------------------------

    def message(
        self,
        msg_type: str,
        content: Mapping[str, Any] | bytes | None = None,
        *,
        msg_id: str | None = None,
        parent: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | bytes | None = None,
        buffers: Sequence[bytes] = (),
    ) -> Message:
        """A message with a header of this session (id, username, protocol version, now)."""
        return Message.build(
            msg_type,
            content,
            session=self.session_id,
            username=self.spec.username or "kallichore",
            version=self.spec.protocol_version,
            msg_id=msg_id,
            parent=parent,
            metadata=metadata,
            buffers=buffers,
        )

    async def send(self, channel: Channel, message: Message) -> None:
        """Send a message to the kernel; `execute_request`s go through the execution queue.

        Raises `KallichoreError` if no kernel is running: a message for a kernel that is not
        there is refused, never kept for the next kernel.
        """
        if channel not in (Channel.SHELL, Channel.CONTROL, Channel.STDIN):
            raise ValueError(f"cannot send on the {channel} channel")
        kernel = self._require_kernel(ErrorCode.SESSION_NOT_RUNNING)
        if channel is Channel.STDIN and not kernel.ready:
            raise KallichoreError(ErrorCode.SESSION_NOT_RUNNING, "the kernel is still starting")
        if channel is Channel.SHELL and message.msg_type == "execute_request":
            if not self.execution_queue.submit(message):
                self.events.publish(ExecutionQueuedEvent(message.msg_id))
                return
        elif message.msg_type in ("interrupt_request", "shutdown_request"):
            self.execution_queue.clear()
        await kernel.require_channels().send(channel, message)

    async def execute(
        self,
        code: str,
        *,
        silent: bool = False,
        store_history: bool = True,
        allow_stdin: bool = True,
        stop_on_error: bool = True,
    ) -> str:
        """Send an `execute_request` for `code`; returns its msg_id (the parent of its output)."""
        request = self.message(
            "execute_request",
            {
                "code": code,
                "silent": silent,
                "store_history": store_history,
                "user_expressions": {},
                "allow_stdin": allow_stdin,
                "stop_on_error": stop_on_error,
            },
        )
        await self.send(Channel.SHELL, request)
        return request.msg_id

    # -- the kernel run ----------------------------------------------------------------------

    async def _start_run(self, adopt: ConnectionInfo | None = None) -> JSONObject:
        if self._nursery is None:
            raise RuntimeError("the session is not running in a supervisor")
        kernel_info: JSONObject = await self._nursery.start(partial(self._run_kernel, adopt=adopt))
        return kernel_info

    async def _run_kernel(
        self, *, adopt: ConnectionInfo | None, task_status: trio.TaskStatus[JSONObject]
    ) -> None:
        if adopt is None:
            self._set_status(Status.STARTING, "start API called")
            kernel = await self._launch()
        else:
            kernel = _KernelRun(process=None, connection=adopt)
        self._kernel = kernel
        failure: KallichoreError | None = None
        try:
            with kernel.cancel_scope:
                async with trio.open_nursery() as nursery:
                    if kernel.process is not None:
                        nursery.start_soon(self._watch_process, kernel, kernel.process)
                    failure = await self._connect(kernel, nursery)
                    if failure is not None:
                        kernel.cancel_scope.cancel()
                    else:
                        channels = kernel.require_channels()
                        nursery.start_soon(self._pump_channel, kernel, channels, Channel.STDIN)
                        kernel.ready = True
                        kernel.startup_output.clear()
                        self._set_status(Status.IDLE, "kernel_info_request")
                        nursery.start_soon(self._monitor_heartbeat, kernel, channels)
                        task_status.started(self.kernel_info)
        except Exception:
            if not kernel.ready:
                raise
            logger.exception("session %s: internal error, ending its kernel", self.session_id)
        finally:
            with trio.CancelScope(shield=True):
                await self._reap(kernel)
        if not kernel.ready:
            raise failure or self._exited_during_start(kernel)

    async def _launch(self) -> _KernelRun:
        """Spawn the kernel, told where to connect by a connection or registration file."""
        if not self.spec.argv:
            self._set_status(Status.EXITED, "failed to spawn process: empty argv")
            raise StartupError(ErrorCode.PROCESS_START_FAILED, "the session has no argv to start")
        env = resolve_environment(os.environ, self.env_actions)
        self.initial_env = env
        cwd = self.working_directory or None
        if cwd is not None and not os.path.isdir(cwd):
            logger.warning("session %s: working directory %r does not exist", self.session_id, cwd)
            cwd = None
        mode = self.spec.startup_environment
        shell = choose_shell(os.environ) if mode is not StartupEnvironment.NONE else None
        kernel = _KernelRun(process=None, shell=shell)
        try:
            if wants_handshake(self.spec.protocol_version):
                kernel.registration = Registration(self._context, self.key)
                path = self._runtime_dir / f"registration-{self.session_id}.json"
                contents = kernel.registration.file_contents()
            else:
                kernel.ports = self._ports.allocate(5)
                kernel.connection = ConnectionInfo(
                    control_port=kernel.ports[0],
                    shell_port=kernel.ports[1],
                    iopub_port=kernel.ports[2],
                    hb_port=kernel.ports[3],
                    stdin_port=kernel.ports[4],
                    key=self.key,
                )
                path = self._runtime_dir / f"kernel-{self.session_id}.json"
                contents = kernel.connection.to_dict()
            kernel.connection_file = path
            argv = [arg.replace("{connection_file}", str(path)) for arg in self.spec.argv]
            command = build_command(
                argv, mode, self.spec.startup_environment_arg, working_directory=cwd, shell=shell
            )
            write_json_file(path, contents)
            kernel.process = await kernel_process.launch(command, env, cwd)
        except BaseException as exc:
            self._release(kernel)
            reason = exc.message if isinstance(exc, KallichoreError) else str(exc)
            self._set_status(Status.EXITED, f"failed to spawn process: {reason}")
            if not isinstance(exc, OSError):
                raise
            raise StartupError(
                ErrorCode.PROCESS_START_FAILED,
                f"failed to start the kernel {self.spec.argv[0]!r}: {exc.strerror or exc}",
                exit_code=exc.errno,
            ) from exc
        self.connection_info = kernel.connection
        return kernel

    async def _connect(self, kernel: _KernelRun, nursery: trio.Nursery) -> KallichoreError | None:
        """Handshake (JEP 66), ZeroMQ connect and kernel_info, within `connection_timeout`.

        Readiness needs the kernel_info_reply on shell, proof that our iopub subscription
        is live, and a stdin connection the kernel knows (see `KernelChannels`). ipykernel 7
        proves the iopub subscription with `iopub_welcome`; for other kernels a fresh
        kernel_info_request makes them publish busy/idle, so we ask again, backing off, until
        something arrives on iopub.
        """
        timeout = self.spec.connection_timeout
        try:
            with trio.fail_after(timeout):
                if kernel.registration is not None:
                    failure = await self._await_handshake(kernel)
                    if failure is not None:
                        return failure
                assert kernel.connection is not None
                channels = KernelChannels(
                    self._context, kernel.connection, self.session_id.encode()
                )
                kernel.channels = channels
                nursery.start_soon(self._pump_iopub, kernel, channels)
                nursery.start_soon(self._pump_channel, kernel, channels, Channel.SHELL)
                nursery.start_soon(self._pump_channel, kernel, channels, Channel.CONTROL)
                await self._request_kernel_info(kernel, channels)
                await kernel.kernel_info_received.wait()
                delay = 0.1
                while not kernel.iopub_alive.is_set():
                    with trio.move_on_after(delay):
                        await kernel.iopub_alive.wait()
                    if not kernel.iopub_alive.is_set():
                        await self._request_kernel_info(kernel, channels)
                        delay = min(delay * 2, 1.0)
                await channels.connect_stdin()
        except trio.TooSlowError:
            if kernel.registration is not None and kernel.connection is None:
                return StartupError(
                    ErrorCode.HANDSHAKE_FAILED,
                    f"the kernel did not register within {timeout:g} seconds",
                    "timed out waiting for the JEP 66 handshake",
                )
            return StartupError(
                ErrorCode.SESSION_CONNECTION_TIMEOUT,
                f"the kernel did not connect within {timeout:g} seconds",
                self._failure_details(kernel, "the kernel failed to connect to its ZeroMQ sockets"),
                exit_code=130,
                output="".join(kernel.startup_output),
            )
        return None

    async def _await_handshake(self, kernel: _KernelRun) -> KallichoreError | None:
        assert kernel.registration is not None
        try:
            with kernel.registration:
                kernel.connection = await kernel.registration.wait()
        except HandshakeError as exc:
            return StartupError(
                ErrorCode.HANDSHAKE_FAILED,
                f"the kernel's JEP 66 handshake failed: {exc}",
                output="".join(kernel.startup_output),
            )
        self.connection_info = kernel.connection
        self.events.publish(HandshakeCompletedEvent(self.session_id, kernel.connection))
        return None

    def _exited_during_start(self, kernel: _KernelRun) -> StartupError:
        output = "".join(kernel.startup_output)
        if kernel.registration is not None and kernel.connection is None:
            return StartupError(
                ErrorCode.EXITED_BEFORE_CONNECTION,
                f"the kernel exited with code {kernel.exit_code} before it registered",
                self._failure_details(kernel, "the kernel exited before connecting"),
                exit_code=kernel.exit_code,
                output=output,
            )
        return StartupError(
            ErrorCode.PROCESS_ABNORMAL_EXIT,
            f"the kernel exited with code {kernel.exit_code} before it was ready",
            self._failure_details(kernel, "the kernel process exited during startup"),
            exit_code=kernel.exit_code,
            output=output,
        )

    def _failure_details(self, kernel: _KernelRun, default: str) -> str:
        details = startup_failure_details(
            self.spec.startup_environment,
            self.spec.startup_environment_arg,
            kernel.shell,
            "".join(kernel.markers_seen),
        )
        return details or default

    async def _request_kernel_info(self, kernel: _KernelRun, channels: KernelChannels) -> None:
        request = self.message("kernel_info_request")
        kernel.startup_requests.add(request.msg_id)
        await channels.send(Channel.SHELL, request)

    async def _watch_process(self, kernel: _KernelRun, process: trio.Process) -> None:
        """Read the kernel's output until it exits, then end the run."""
        async with trio.open_nursery() as readers:
            on_line = self._output_line_handler(kernel)
            if process.stdout is not None:
                readers.start_soon(kernel_process.read_lines, process.stdout, "stdout", on_line)
            if process.stderr is not None:
                readers.start_soon(kernel_process.read_lines, process.stderr, "stderr", on_line)
            kernel.exit_code = await process.wait()
            readers.cancel_scope.deadline = trio.current_time() + OUTPUT_DRAIN_SECONDS
        kernel.cancel_scope.cancel()

    def _output_line_handler(self, kernel: _KernelRun) -> kernel_process.LineHandler:
        def on_line(stream: Literal["stdout", "stderr"], text: str) -> None:
            if is_marker_line(text):
                # The shell wrapper's progress markers explain a failed start; clients never
                # see them.
                kernel.markers_seen.append(text)
                return
            if not kernel.ready and len(kernel.startup_output) < MAX_STARTUP_OUTPUT_LINES:
                kernel.startup_output.append(text)
            self.events.publish(OutputEvent(stream, text))

        return on_line

    async def _pump_iopub(self, kernel: _KernelRun, channels: KernelChannels) -> None:
        sock = channels.socket(Channel.IOPUB)
        while True:
            received = await sock.recv_batch()
            dequeued: list[Message] = []
            # Published a batch at a time, status changes included: a client can then get
            # them in one write. Nothing is awaited while the events are held.
            with self.events.holding():
                for frames in received:
                    message = self._parse(channels, Channel.IOPUB, frames)
                    if message is None:
                        continue
                    kernel.iopub_alive.set()
                    if (
                        message.msg_type == "iopub_welcome"
                        or message.parent_msg_id in kernel.startup_requests
                    ):
                        continue
                    if message.msg_type == "status":
                        self._on_kernel_status(message, dequeued)
                    self.events.publish(JupyterEvent(Channel.IOPUB, message))
            for request in dequeued:
                await channels.send(Channel.SHELL, request)

    def _on_kernel_status(self, message: Message, dequeued: list[Message]) -> None:
        """Follow the kernel's status; an idle may let the next queued execution go (added to
        `dequeued`, for the caller to send)."""
        try:
            state = message.content.get("execution_state")
        except WireError:
            return
        if self.status is Status.EXITED:
            return
        if state == "busy":
            self._set_status(Status.BUSY, message.parent_msg_type)
        elif state == "idle":
            self._set_status(Status.IDLE, message.parent_msg_type)
            if message.parent_msg_type == "execute_request":
                self._track_working_directory()
            following = self.execution_queue.advance()
            if following is not None:
                dequeued.append(following)

    def _track_working_directory(self) -> None:
        cwd = self._kernel_cwd()
        if cwd is not None and cwd != self.working_directory:
            self.working_directory = cwd
            self.events.publish(WorkingDirChangedEvent(cwd))

    async def _pump_channel(
        self, kernel: _KernelRun, channels: KernelChannels, channel: Channel
    ) -> None:
        sock = channels.socket(channel)
        while True:
            for frames in await sock.recv_batch():
                message = self._parse(channels, channel, frames)
                if message is None:
                    continue
                if message.parent_msg_id in kernel.startup_requests:
                    if (
                        message.msg_type == "kernel_info_reply"
                        and not kernel.kernel_info_received.is_set()
                    ):
                        self._store_kernel_info(message)
                        kernel.kernel_info_received.set()
                    continue
                self.events.publish(JupyterEvent(channel, message))
                if kernel.process is None and message.msg_type == "shutdown_reply":
                    # An adopted kernel is going away; there is no process to watch for it.
                    kernel.cancel_scope.cancel()

    def _store_kernel_info(self, reply: Message) -> None:
        try:
            self.kernel_info = reply.content
        except WireError as exc:
            logger.warning("session %s: unreadable kernel_info_reply: %s", self.session_id, exc)
            return
        language_info = self.kernel_info.get("language_info")
        positron = language_info.get("positron") if isinstance(language_info, dict) else None
        if isinstance(positron, dict):
            if isinstance(prompt := positron.get("input_prompt"), str):
                self.input_prompt = prompt
            if isinstance(prompt := positron.get("continuation_prompt"), str):
                self.continuation_prompt = prompt

    def _parse(
        self, channels: KernelChannels, channel: Channel, frames: list[bytes]
    ) -> Message | None:
        try:
            return channels.parse(frames)
        except WireError as exc:
            logger.warning("session %s: dropped a message on %s: %s", self.session_id, channel, exc)
            return None

    async def _monitor_heartbeat(self, kernel: _KernelRun, channels: KernelChannels) -> None:
        """Mark the session offline when the kernel misses a heartbeat, and back when it answers.

        An adopted kernel has no process to watch: missing several beats in a row ends it.
        """
        sock = channels.socket(Channel.HEARTBEAT)
        misses = 0
        while True:
            await sock.send_multipart([HEARTBEAT_PAYLOAD])
            with trio.move_on_after(self._config.heartbeat_timeout) as timer:
                await sock.recv_multipart()
            if timer.cancelled_caught:
                misses += 1
                if self.status is not Status.OFFLINE:
                    self._set_status(Status.OFFLINE, "lost heartbeat")
                if kernel.process is None and misses >= ADOPTED_HEARTBEAT_MISSES:
                    kernel.cancel_scope.cancel()
            else:
                misses = 0
                if self.status is Status.OFFLINE:
                    self._set_status(Status.IDLE, "heartbeat detected after offline")
            config = self._config
            await trio.sleep(
                config.heartbeat_interval
                if self.connected
                else config.unattended_heartbeat_interval
            )

    async def _reap(self, kernel: _KernelRun) -> None:
        """Make sure the kernel's process group is gone, then release everything of the run."""
        process = kernel.process
        if process is not None:
            kernel_process.kill_group(process.pid)
            if process.returncode is None:
                # It may have left its process group; the group kill would then miss it.
                process.kill()
            exit_code = await process.wait()
            if kernel.exit_code is None:
                kernel.exit_code = exit_code
            reason = "child process exited"
        else:
            kernel.exit_code = 0
            reason = "all sockets disconnected from an adopted kernel"
        self._release(kernel)
        self._kernel = None
        self._set_status(Status.EXITED, reason)
        self.events.publish(ExitedEvent(kernel.exit_code))
        kernel.exited.set()

    def _release(self, kernel: _KernelRun) -> None:
        if kernel.channels is not None:
            kernel.channels.close()
        if kernel.registration is not None:
            kernel.registration.close()
        if kernel.connection_file is not None:
            kernel.connection_file.unlink(missing_ok=True)
        self._ports.release(kernel.ports)

    async def _stop_kernel(self, *, restart: bool, grace: float) -> None:
        kernel = self._kernel
        if kernel is None:
            return
        if kernel.ready:
            request = self.message("shutdown_request", {"restart": restart})
            with contextlib.suppress(KallichoreError, trio.ClosedResourceError):
                await self.send(Channel.CONTROL, request)
            with trio.move_on_after(grace):
                await kernel.exited.wait()
        if not kernel.exited.is_set():
            if kernel.process is not None:
                kernel_process.kill_group(kernel.process.pid)
            else:
                kernel.cancel_scope.cancel()
            await kernel.exited.wait()

    # -- state -------------------------------------------------------------------------------

    def _set_status(self, status: Status, reason: str | None) -> None:
        if status is self.status:
            return
        self.status = status
        now = time.monotonic()
        self.idle_since = now if status in (Status.IDLE, Status.READY, Status.EXITED) else None
        self.busy_since = now if status is Status.BUSY else None
        if status is Status.EXITED:
            self.execution_queue.clear()
        if self.idle_since is not None:
            self._on_rest()
        self.events.publish(StatusEvent(status, reason))

    def _require_kernel(self, code: ErrorCode) -> _KernelRun:
        if self._kernel is None:
            raise KallichoreError(code, f"session {self.session_id} has no running kernel")
        return self._kernel

    def _kernel_cwd(self) -> str | None:
        pid = self.process_id
        if pid is None:
            return None
        try:
            # Checked after every execution: the /proc link is much cheaper than psutil.
            return os.readlink(f"/proc/{pid}/cwd")
        except FileNotFoundError:
            pass
        except OSError:
            return None
        try:
            cwd: str = psutil.Process(pid).cwd()
        except psutil.Error:
            return None
        return cwd
