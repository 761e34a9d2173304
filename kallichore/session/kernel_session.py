"""One supervised kernel session, as its users see it: a trio nursery that outlives its kernels.

A `KernelSession` is thin: what the session *is* lives in its `SessionState` (sans-io), and
each kernel it starts is a `KernelRun` (the I/O: process, ZeroMQ pumps, heartbeat, sampler)
started in the session's nursery. Everything here is read-only to callers; what they may change
goes through the methods, which serialize starts, restarts and adoptions.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import trio
import zmq

from kallichore.errors import ErrorCode, KallichoreError, StartupError
from kallichore.footprint import Footprint
from kallichore.jupyter.connection import ConnectionInfo, PortAllocator, new_key
from kallichore.jupyter.wire import Channel, JSONObject, Message, WireError, utc_now
from kallichore.session import process as kernel_process
from kallichore.session.events import (
    EventLog,
    ExecutionRequestedEvent,
    ExitedEvent,
    JupyterEvent,
    Subscription,
)
from kallichore.session.execution_queue import QueueSnapshot
from kallichore.session.history import ExecutionHistory
from kallichore.session.kernel_run import Activity, KernelRun, RunContext
from kallichore.session.model import (
    InterruptMode,
    RestartOrigin,
    SessionConfig,
    SessionSpec,
    Status,
    VarAction,
)
from kallichore.session.outputs import ExecutionOutcome, Item, OutputCollector
from kallichore.session.record import ProcessIdentity, SessionRecord
from kallichore.session.resources import ResourceUsage, SampleInterval
from kallichore.session.state import Outbox, SessionState

logger = logging.getLogger(__name__)


# How many of a kernel's last output lines the log shows when it fails to start.
STARTUP_LINES_LOGGED = 10


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
        sample_interval: SampleInterval,
        footprint: Footprint | None = None,
        on_rest: Callable[[], None] = lambda: None,
        on_record: Callable[[KernelSession], None] = lambda session: None,
        key: str | None = None,
        created: float | None = None,
    ) -> None:
        """`on_record` is called when what `record()` says has changed; `key` and `created`
        are given when a restarted daemon takes the session up again (see `resume()`)."""
        self._spec = spec
        self._key = key or new_key()
        self._created = time.time() if created is None else created
        self._state = SessionState(spec)
        # A session taken up again numbers its events from the wall clock in microseconds, past
        # any seq its previous life used, so a client resuming from then is not mistaken for
        # one resuming from now (see `EventLog.subscribe`).
        self._events = EventLog(
            config.event_buffer_bytes, first_seq=0 if created is None else time.time_ns() // 1000
        )
        self._env_actions: tuple[VarAction, ...] = spec.env
        self._external_connection: ConnectionInfo | None = None
        self._activity = Activity(self._created)
        self._run_context = RunContext(
            spec=spec,
            key=self._key,
            state=self._state,
            events=self._events,
            context=context,
            ports=ports,
            runtime_dir=runtime_dir,
            config=config,
            sample_interval=sample_interval,
            footprint=footprint or Footprint(None),
            on_rest=on_rest,
            on_record=lambda: on_record(self),
            message=self.message,
            activity=self._activity,
        )
        self._config = config
        self._ports = ports
        # The latest run; once it has ended, it still tells its environment and last sample.
        self._run: KernelRun | None = None
        self._nursery: trio.Nursery | None = None
        self._lifecycle = trio.Lock()

    # -- what it is (read-only) ------------------------------------------------------------

    @property
    def spec(self) -> SessionSpec:
        return self._spec

    @property
    def session_id(self) -> str:
        return self._spec.session_id

    @property
    def created(self) -> float:
        """When the session was created (seconds since the epoch)."""
        return self._created

    @property
    def last_activity(self) -> float:
        """When a message last went to or came from the kernel (seconds since the epoch)."""
        return self._activity.last

    @property
    def events(self) -> EventLog:
        """Everything the session has to say, in order: subscribe to follow it."""
        return self._events

    @property
    def status(self) -> Status:
        return self._state.status

    @property
    def idle_since(self) -> float | None:
        """When the session last came to rest (idle or exited), in `time.monotonic()` seconds."""
        return self._state.idle_since

    @property
    def busy_since(self) -> float | None:
        return self._state.busy_since

    @property
    def execution_queue(self) -> QueueSnapshot:
        return self._state.execution_queue

    @property
    def kernel_info(self) -> JSONObject:
        return self._state.kernel_info

    @property
    def history(self) -> ExecutionHistory:
        """The session's recent executions (the agent API's and its clients'), oldest first."""
        return self._state.history

    @property
    def input_prompt(self) -> str:
        return self._state.input_prompt

    @property
    def continuation_prompt(self) -> str:
        return self._state.continuation_prompt

    @property
    def working_directory(self) -> str:
        return self._state.working_directory

    @property
    def connection_info(self) -> ConnectionInfo | None:
        """Where the kernel listens (or will: see `external_connection_info`)."""
        return self._state.connection or self._external_connection

    @property
    def connected(self) -> bool:
        """A client is attached to the session's events."""
        return self._events.attached

    @property
    def process_id(self) -> int | None:
        run = self._running_run()
        return run.process_id if run is not None else None

    @property
    def location(self) -> dict[str, object] | None:
        """Where a remote kernel runs (launcher, host, job id, pid); None for a local one."""
        run = self._running_run()
        return run.location if run is not None else None

    @property
    def is_running(self) -> bool:
        """A kernel run exists (it may still be starting)."""
        return self._state.running

    @property
    def initial_env(self) -> dict[str, str]:
        """The environment the latest kernel was started with."""
        return dict(self._run.initial_env) if self._run is not None else {}

    @property
    def resource_usage(self) -> ResourceUsage | None:
        """The latest sample of the kernel's CPU and memory use (taken while a client is
        attached)."""
        return self._run.resource_usage if self._run is not None else None

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
            if self._running_run() is not None:
                return self.kernel_info
            return await self._start_run()

    async def restart(
        self,
        working_directory: str | None = None,
        env: Sequence[VarAction] | None = None,
        *,
        origin: RestartOrigin = RestartOrigin.KALLICHORE,
        grace: float | None = None,
    ) -> JSONObject:
        """Shut the kernel down (gracefully, then by force) and start it again.

        Keeps the session id and key. A new working directory and env action list apply to the
        new kernel; without a working directory the kernel's current one is kept. A session
        whose kernel is not running is simply started. The kernel's `ExitedEvent` carries
        `origin`, the API that asked. `grace`: how long the kernel may take to shut down
        before it is killed (by default the session config's `shutdown_grace`).
        """
        if self._lifecycle.locked():
            raise KallichoreError(
                ErrorCode.RESTART_FAILED, "a restart or start is already in progress"
            )
        async with self._lifecycle:
            logger.info("session %s: restarting the kernel", self.session_id)
            if working_directory:
                path = Path(working_directory).expanduser()
                if not path.is_dir():
                    raise KallichoreError(
                        ErrorCode.RESTART_FAILED,
                        f"working directory {working_directory!r} does not exist",
                    )
                self._state.set_working_directory(str(path.resolve()))
            elif (run := self._running_run()) is not None and (
                cwd := run.working_directory()
            ) is not None:
                self._state.set_working_directory(cwd)
            if env:
                self._env_actions = tuple(env)
            if self._running_run() is not None:
                self._state.restarting(origin)
            await self._stop_kernel(
                restart=True, grace=self._config.shutdown_grace if grace is None else grace
            )
            return await self._start_run()

    async def shutdown(self, grace: float | None = None) -> None:
        """Ask the kernel to exit (`shutdown_request`); kill its process group after `grace` s."""
        if self._running_run() is not None:
            logger.info("session %s: shutting the kernel down", self.session_id)
        await self._stop_kernel(
            restart=False, grace=self._config.shutdown_grace if grace is None else grace
        )

    async def kill(self) -> None:
        """SIGKILL the kernel's process group and wait until its exit has been processed."""
        run = self._running_run()
        if run is None:
            raise KallichoreError(
                ErrorCode.SESSION_NOT_RUNNING, f"session {self.session_id} is not running"
            )
        pid = run.process_id
        if pid is None:
            raise KallichoreError(
                ErrorCode.NO_PROCESS, f"session {self.session_id} has no kernel process to kill"
            )
        logger.info("session %s: killing the kernel (pid %d)", self.session_id, pid)
        self._state.drop_queue()
        if not run.kill():
            raise KallichoreError(
                ErrorCode.PROCESS_NOT_FOUND,
                f"kernel process {pid} not found",
                "could not send the kill signal",
            )
        await run.exited.wait()

    def kill_now(self) -> None:
        """SIGKILL the kernel's process group without waiting (the exit is processed as usual)."""
        run = self._running_run()
        if run is not None and run.process_id is not None:
            run.kill()

    async def interrupt(self) -> None:
        """Interrupt the kernel's current work, by signal or by message per `interrupt_mode`."""
        run = self._running_run()
        if run is None:
            raise KallichoreError(
                ErrorCode.SESSION_INTERRUPT_FAILED,
                f"session {self.session_id} has no running kernel",
            )
        logger.info(
            "session %s: interrupting the kernel (by %s)",
            self.session_id,
            self._spec.interrupt_mode,
        )
        if self._spec.interrupt_mode is InterruptMode.SIGNAL:
            if not run.signal(signal.SIGINT):
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
            if self._running_run() is not None:
                raise KallichoreError(
                    ErrorCode.SESSION_CONNECTION_FAILED,
                    f"session {self.session_id} already has a running kernel",
                )
            logger.info("session %s: adopting a kernel started elsewhere", self.session_id)
            self._state.adopting(connection)
            return await self._start_run(adopt=connection)

    async def resume(self, record: SessionRecord) -> None:
        """Take the session up where the daemon that wrote `record` left it.

        A kernel still running as the process the record names (same pid, same start time) is
        adopted again: once it answers kernel_info (asked on control, so that an execution of
        before the restart does not hold it up) it is `idle` with the reason `READOPTED`, the
        mark of what was lost while no daemon listened; the heartbeat is watched from then on.
        Raises `StartupError` if it does not answer (it is then killed). A kernel that is gone makes
        the session `exited`; a session never started stays `uninitialized`.
        """
        async with self._lifecycle:
            self._state.set_working_directory(record.working_directory)
            connection, process = record.connection, record.process
            if connection is not None and process is not None:
                if kernel_process.is_running(process):
                    self._state.adopting(connection)
                    await self._start_run(adopt=connection, adopted_process=process)
                    return
                reason = "the kernel exited while no daemon was running"
            elif record.status is not Status.UNINITIALIZED:
                # Exited before, or adopted from somebody else with no process to verify.
                reason = "no kernel to re-adopt when the daemon restarted"
            else:
                return
            if connection is not None:
                self._state.connected_at(connection)
            out = Outbox()
            self._state.exited(0, reason, out)
            self._events.publish_many(out.events)

    def record(self) -> SessionRecord:
        """What a restarted daemon needs to take this session up again."""
        run = self._running_run()
        return SessionRecord(
            spec=self._spec,
            key=self._key,
            created=self._created,
            status=self.status,
            working_directory=self.working_directory,
            connection=self._state.connection,
            process=None if run is None else run.process_identity,
        )

    def external_connection_info(self) -> ConnectionInfo:
        """The connection info for a kernel to be started by somebody else and then adopted
        (or, once a kernel has run, where that kernel listens)."""
        if self.connection_info is None:
            try:
                ports = self._ports.allocate(5)
            except OSError as exc:
                raise KallichoreError(
                    ErrorCode.NO_CONNECTION_INFO, f"could not allocate ports: {exc}"
                ) from exc
            self._external_connection = ConnectionInfo.on_ports(ports, self._key)
        info = self.connection_info
        assert info is not None
        return info

    async def aclose(self, grace: float | None = None) -> None:
        """Shut the kernel down and end the session: its event log closes, its nursery ends."""
        await self.shutdown(grace)
        self._events.close()
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
            username=self._spec.username or "kallichore",
            version=self._spec.protocol_version,
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
        await self._submit(channel, message, Outbox())

    async def _submit(
        self, channel: Channel, message: Message, out: Outbox, source: str = "client"
    ) -> None:
        """Send `message` as `send` does, after the events already in `out`; an execution is
        `source`'s in the history."""
        run = self._running_run()
        if run is not None and run.channels is None:
            raise KallichoreError(ErrorCode.SESSION_NOT_RUNNING, "the kernel is still starting")
        logger.debug("session %s: %s %s to the kernel", self.session_id, channel, message.msg_type)
        self._state.from_client(channel, message, out, source=source)
        assert run is not None, "the state says a kernel runs"
        self._activity.note()
        await run.deliver(out)

    async def send_client_message(
        self,
        channel: Channel,
        header: JSONObject,
        parent_header: JSONObject,
        *,
        metadata_json: bytes,
        content_json: bytes,
        buffers: Sequence[bytes] = (),
    ) -> None:
        """Send a Jupyter client's message with the client's own header (its msg_id, session
        and username), so that the kernel names it as the parent of what it answers; `date`
        and `version` are filled in when the client left them out."""
        if "date" not in header or "version" not in header:
            header = {"date": utc_now(), "version": self._spec.protocol_version, **header}
        message = Message(header, parent_header, metadata_json, content_json, tuple(buffers))
        await self.send(channel, message)

    async def wait_ready(self, timeout: float) -> None:
        """Wait, at most `timeout` s, while the kernel is starting: jupyter_server holds a
        channels connection until its kernel answered (`kernel_info_timeout`)."""
        with trio.move_on_after(timeout), self._events.subscribe(backlog=False) as watch:
            while self._state.running and not self._state.ready:
                try:
                    await watch.receive()
                except trio.EndOfChannel:
                    return

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
        request = self._execute_request(code, silent, store_history, allow_stdin, stop_on_error)
        await self.send(Channel.SHELL, request)
        return request.msg_id

    def _execute_request(
        self, code: str, silent: bool, store_history: bool, allow_stdin: bool, stop_on_error: bool
    ) -> Message:
        return self.message(
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

    async def run_code(
        self,
        code: str,
        *,
        silent: bool = False,
        store_history: bool = True,
        stop_on_error: bool = True,
        timeout: float | None = None,
        source: str = "api",
        on_item: Callable[[Item], None] | None = None,
    ) -> ExecutionOutcome:
        """Run `code` and return what became of it: the agent API's one call.

        The execution goes through the execution queue like any client's (so it never
        interleaves with theirs), announced first by an `ExecutionRequestedEvent` naming
        `source`; the kernel may not ask for input. `on_item` is called with each output
        item as it comes (streams unmerged). After `timeout` seconds an execution still held
        in the queue is withdrawn; one at the kernel is interrupted, and if it has not ended
        `interrupt_grace` seconds later the kernel is restarted (`restarted`). Either way the
        status is `timeout`. An execution whose kernel exited, or that an interrupt dropped
        from the queue, is `aborted`. Raises `KallichoreError` if no kernel is running.
        """
        request = self._execute_request(code, silent, store_history, False, stop_on_error)
        msg_id = request.msg_id
        collector = OutputCollector()
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        with self._events.subscribe(backlog=False) as watch:
            announce = Outbox(events=[ExecutionRequestedEvent(msg_id, code, source)])
            await self._submit(Channel.SHELL, request, announce, source)
            ended = await self._follow(watch, msg_id, collector, on_item, deadline)
            if ended is not None:
                return collector.outcome(None if ended == "done" else "aborted")
            if self._state.withdraw(msg_id):
                logger.info(
                    "session %s: execution %s timed out in the queue", self.session_id, msg_id
                )
                return collector.outcome("timeout")
            logger.info("session %s: execution %s timed out; interrupting", self.session_id, msg_id)
            self._state.history.mark(msg_id, "timeout")
            with contextlib.suppress(KallichoreError):
                await self.interrupt()
            grace = trio.current_time() + self._config.interrupt_grace
            # At the kernel: it has a reply to come, even if its idle came first.
            if await self._follow(watch, msg_id, collector, on_item, grace, at_kernel=True):
                return collector.outcome("timeout")
        logger.warning(
            "session %s: execution %s did not end when interrupted; restarting the kernel",
            self.session_id,
            msg_id,
        )
        outcome = collector.outcome("timeout")
        try:
            await self.restart(grace=0)
        except KallichoreError as error:
            logger.warning("session %s: could not restart the kernel: %s", self.session_id, error)
        else:
            outcome.restarted = True
        return outcome

    async def _follow(
        self,
        watch: Subscription,
        msg_id: str,
        collector: OutputCollector,
        on_item: Callable[[Item], None] | None,
        deadline: float,
        *,
        at_kernel: bool = False,
    ) -> Literal["done", "aborted"] | None:
        """Feed `collector` the execution's messages until it has ended (`done`), ended
        without a reply (`aborted`: dropped from the queue, or its kernel exited), or
        `deadline` passed (None).

        It has ended once it has left the execution queue (which advances on its idle) and
        its reply is in (shell and iopub race: the idle may come first). The queue is looked at
        when the watch has caught up with the log: the state changes and publishes at once, so
        a caught-up watch has seen all there is of it. `at_kernel`: it is known to have
        reached the kernel (it will have a reply).
        """
        reached_kernel = at_kernel
        with trio.move_on_at(deadline):
            while True:
                try:
                    events = await watch.receive()
                except trio.EndOfChannel:  # the session is gone
                    return "done" if collector.reply is not None else "aborted"
                for event in events:
                    if type(event) is ExitedEvent:
                        return "done" if collector.reply is not None else "aborted"
                    if type(event) is not JupyterEvent:
                        continue
                    message = event.message
                    if message.parent_msg_id != msg_id:
                        continue
                    reached_kernel = True
                    if message.msg_type == "status":
                        continue
                    try:
                        item = collector.feed(message.msg_type, message.content)
                    except WireError:
                        continue
                    if item is not None and on_item is not None:
                        on_item(item)
                if watch.cursor < self._events.last_seq:
                    continue
                queue = self._state.execution_queue
                if queue.active is not None and queue.active.msg_id == msg_id:
                    reached_kernel = True
                elif all(request.msg_id != msg_id for request in queue.pending):
                    if collector.reply is not None:
                        return "done"
                    if not reached_kernel:
                        return "aborted"
        return None

    # -- runs --------------------------------------------------------------------------------

    async def _start_run(
        self,
        adopt: ConnectionInfo | None = None,
        adopted_process: ProcessIdentity | None = None,
    ) -> JSONObject:
        if self._nursery is None:
            raise RuntimeError("the session is not running in a supervisor")
        self._run = KernelRun(
            self._run_context, env=self._env_actions, adopt=adopt, adopted_process=adopted_process
        )
        try:
            await self._nursery.start(self._run.run)
        except KallichoreError as error:
            exit_code = error.exit_code if isinstance(error, StartupError) else None
            # Its last words say why, as they would in a terminal.
            said = (
                error.output.splitlines()[-STARTUP_LINES_LOGGED:]
                if isinstance(error, StartupError)
                else []
            )
            logger.warning(
                "session %s: the kernel failed to start: %s%s%s",
                self.session_id,
                error.message,
                "" if exit_code is None else f" (exit code {exit_code})",
                "".join(f"\n  | {line}" for line in said),
            )
            raise
        return self.kernel_info

    def _running_run(self) -> KernelRun | None:
        """The run of the kernel that is running (or starting), if any."""
        return self._run if self._state.running else None

    async def _stop_kernel(self, *, restart: bool, grace: float) -> None:
        run = self._running_run()
        if run is None:
            return
        if self._state.ready:
            request = self.message("shutdown_request", {"restart": restart})
            with contextlib.suppress(KallichoreError, trio.ClosedResourceError):
                await self.send(Channel.CONTROL, request)
            with trio.move_on_after(grace):
                await run.exited.wait()
        if not run.exited.is_set():
            run.kill()
            await run.exited.wait()
