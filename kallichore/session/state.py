"""What a session is, as a plain state machine: no trio, no ZeroMQ, no clock it is not handed.

`SessionState` follows one session across its kernel runs: the status and its reasons, the
execution queue and the requests in flight, kernel info and prompts, the working directory, and
which start-up messages clients never see. Its inputs are method calls ("this message came from
the kernel on this channel", "a client sent this", "heartbeat missed", "the process exited");
its outputs are appended to an `Outbox` the caller hands in: events to publish and messages to
send to the kernel, in that order. The shell around it (`KernelRun`, `KernelSession`) does the
I/O. Handing in one outbox for a whole batch of kernel messages lets the shell publish the
batch, and the status changes it caused, in one write to each client.

Status follows the kernel's iopub `busy`/`idle`, but per request: the session is `busy` while
any request the kernel said it was working on has not gone idle yet, so a control request
answered during a long execution (a `kernel_info_request`, a debugger request) does not make
the session look idle, and does not release the next queued execution: the queue advances only
on the idle of the active execution. When the idle has not come a grace period after the
reply, the session asks the kernel whether it is still to come: it sends a `kernel_info_request`
of its own on shell (a "probe", never forwarded). The kernel takes shell requests in order and
publishes on iopub in order, so the probe's first iopub message proves the idle before it was
lost (a dropped PUB message); an idle that was only late (a loaded machine) still comes first.
Only a kernel that publishes nothing for the probe either is given up on, after a longer wait.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import attrs

from kallichore.errors import ErrorCode, KallichoreError
from kallichore.jupyter.connection import ConnectionInfo
from kallichore.jupyter.wire import Channel, JSONObject, Message, WireError
from kallichore.session.events import (
    Event,
    ExecutionQueuedEvent,
    ExitedEvent,
    HandshakeCompletedEvent,
    JupyterEvent,
    StatusEvent,
    WorkingDirChangedEvent,
)
from kallichore.session.execution_queue import ExecutionQueue, QueueSnapshot
from kallichore.session.history import ExecutionHistory
from kallichore.session.model import RestartOrigin, SessionSpec, Status

logger = logging.getLogger(__name__)

# How long after a reply the session waits for the request's idle before it probes the kernel.
REPLY_IDLE_GRACE_SECONDS = 2.0
# How long after sending its probe the session waits for any iopub message of it before it goes
# on without the idles it probed for (a kernel that publishes no status at all).
PROBE_GRACE_SECONDS = 10.0

# What a client may send, and on which channel.
CLIENT_CHANNELS = (Channel.SHELL, Channel.CONTROL, Channel.STDIN)
# Requests that end what the kernel is doing: held executions are dropped when one passes (the
# kernel would abort them). The active one keeps its place until its idle: one sent while the
# kernel is still ending it would be aborted (ipykernel aborts what arrives before it has
# stopped aborting after an interrupted execution's error).
_QUEUE_CLEARING = frozenset(("interrupt_request", "shutdown_request"))
_RESTING = frozenset((Status.IDLE, Status.EXITED))
# The status reason of a kernel that a restarted daemon took over again.
READOPTED = (
    "re-adopted by a restarted daemon: what the kernel published while no daemon was "
    "listening is lost"
)


@attrs.define
class Outbox:
    """What the shell must do after feeding `SessionState` some input, in this order."""

    # Publish to the session's event log.
    events: list[Event] = attrs.Factory(list)
    # Then send to the kernel.
    to_kernel: list[tuple[Channel, Message]] = attrs.Factory(list)
    # An execution ended: the shell reads the kernel's working directory and reports it with
    # `SessionState.working_directory_seen`, whose event goes at this index of `events`.
    check_working_directory_at: int | None = None
    # The session came to rest (idle or exited): idle shutdown counts from here.
    rested: bool = False


class SessionState:
    """One session's state; see the module docstring. `clock` gives monotonic seconds."""

    def __init__(self, spec: SessionSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self._spec = spec
        self._clock = clock
        self._status = Status.UNINITIALIZED
        self._idle_since: float | None = None
        self._busy_since: float | None = None
        self._queue = ExecutionQueue()
        self._history = ExecutionHistory(clock=clock)
        self._kernel_info: JSONObject = {}
        self._input_prompt = spec.input_prompt
        self._continuation_prompt = spec.continuation_prompt
        self._working_directory = spec.working_directory
        self._connection: ConnectionInfo | None = None
        # Of the current kernel run:
        self._running = False
        self._ready = False
        # Our own requests (kernel_info at start, probes): followed, never forwarded.
        self._own_requests: set[str] = set()
        # Who is restarting the kernel of this run, if anybody is: its exit says so.
        self._restart: RestartOrigin | None = None
        self._kernel_info_received = False
        self._iopub_alive = False
        # Requests the kernel said `busy` for and not yet `idle` (by msg_id; "" for none).
        self._in_flight: set[str] = set()
        # Requests whose reply came before their idle: when to probe for it, and the request's
        # type.
        self._idle_due: dict[str, tuple[float, str]] = {}
        # The probe out (msg_id), when to give up on it, and the requests it was sent for.
        self._probe: str | None = None
        self._probe_due = 0.0
        self._probed: dict[str, str] = {}

    # -- what the session is -------------------------------------------------------------------

    @property
    def status(self) -> Status:
        return self._status

    @property
    def idle_since(self) -> float | None:
        """When the session last came to rest (idle or exited), on the handed clock."""
        return self._idle_since

    @property
    def busy_since(self) -> float | None:
        return self._busy_since

    @property
    def execution_queue(self) -> QueueSnapshot:
        """The `execute_request` at the kernel and those held back."""
        return self._queue.snapshot()

    @property
    def history(self) -> ExecutionHistory:
        """The session's recent executions, whoever asked for them."""
        return self._history

    @property
    def kernel_info(self) -> JSONObject:
        """The content of the kernel's first kernel_info_reply of the latest run."""
        return self._kernel_info

    @property
    def input_prompt(self) -> str:
        return self._input_prompt

    @property
    def continuation_prompt(self) -> str:
        return self._continuation_prompt

    @property
    def working_directory(self) -> str:
        return self._working_directory

    @property
    def connection(self) -> ConnectionInfo | None:
        """Where the current (or last) kernel listens."""
        return self._connection

    @property
    def running(self) -> bool:
        """A kernel run exists (it may still be starting)."""
        return self._running

    @property
    def ready(self) -> bool:
        """The kernel of the current run answered and is connected on every channel."""
        return self._ready

    @property
    def kernel_info_received(self) -> bool:
        return self._kernel_info_received

    @property
    def iopub_alive(self) -> bool:
        """Something arrived on iopub in this run: our subscription is live."""
        return self._iopub_alive

    # -- lifecycle inputs ----------------------------------------------------------------------

    def starting(self, out: Outbox) -> None:
        """A kernel is being launched (a start or a restart)."""
        self._begin_run()
        self._set_status(Status.STARTING, "start API called", out)

    def waiting(self, reason: str, out: Outbox) -> None:
        """The kernel is not started yet for `reason` (a cluster job waiting in its queue)."""
        if self._status is Status.STARTING:
            out.events.append(StatusEvent(Status.STARTING, reason))

    def adopting(self, connection: ConnectionInfo) -> None:
        """A kernel somebody else started is being taken over."""
        self._begin_run()
        self._connection = connection

    def launch_failed(self, reason: str, out: Outbox) -> None:
        """The kernel could not even be spawned."""
        self._running = False
        self._set_status(Status.EXITED, f"failed to spawn process: {reason}", out)

    def connected_at(self, connection: ConnectionInfo) -> None:
        """Where the kernel of this run listens (from its connection file)."""
        self._connection = connection

    def registered(self, session_id: str, connection: ConnectionInfo, out: Outbox) -> None:
        """The kernel told us its ports through the JEP 66 handshake."""
        self._connection = connection
        out.events.append(HandshakeCompletedEvent(session_id, connection))

    def startup_request(self, msg_id: str) -> None:
        """We sent our own request (kernel_info): its replies and status are not forwarded."""
        self._own_requests.add(msg_id)

    def kernel_ready(self, out: Outbox, reason: str | None = None) -> None:
        """The kernel answered and our iopub subscription is live.

        A `reason` replaces the usual one (the request the kernel answered); `READOPTED`
        tells clients that what the kernel said while no daemon was listening is lost.
        """
        self._ready = True
        self._set_status(Status.IDLE, reason or "kernel_info_request", out)

    def exited(self, exit_code: int, reason: str, out: Outbox) -> None:
        """The kernel run ended (the process exited, or the adopted kernel went away)."""
        self._running = False
        self._ready = False
        self._set_status(Status.EXITED, reason, out)
        out.events.append(ExitedEvent(exit_code, self._restart))
        self._restart = None

    def restarting(self, origin: RestartOrigin) -> None:
        """The kernel is being stopped to be started again, at `origin`'s request."""
        self._restart = origin

    def withdraw(self, msg_id: str) -> bool:
        """Take a held execution back before it reaches the kernel (it timed out in the
        queue); False if it is not held."""
        if not self._queue.withdraw(msg_id):
            return False
        self._history.ended(msg_id, "timeout")
        return True

    def drop_queue(self) -> None:
        """Discard the queued executions (the kernel is about to be killed)."""
        self._clear_queue()

    def working_directory_seen(self, path: str | None, out: Outbox) -> None:
        """The kernel's current directory, as the shell read it after an execution: a change
        is reported where the outbox asked for the check (after the status it follows)."""
        at, out.check_working_directory_at = out.check_working_directory_at, None
        if path is not None and path != self._working_directory:
            self._working_directory = path
            out.events.insert(len(out.events) if at is None else at, WorkingDirChangedEvent(path))

    def set_working_directory(self, path: str) -> None:
        """Where the next kernel is to start (a restart's request, or where the last one was)."""
        self._working_directory = path

    # -- messages ------------------------------------------------------------------------------

    def from_client(
        self, channel: Channel, message: Message, out: Outbox, *, source: str = "client"
    ) -> None:
        """A client's message for the kernel: sent (via `out`), queued, or refused.

        An execution is recorded in the history as `source`'s (the agent API's is `api`).

        Raises `KallichoreError` if no kernel is running (a message for a kernel that is not
        there is refused, never kept for the next one), and ValueError for iopub/heartbeat.
        """
        if channel not in CLIENT_CHANNELS:
            raise ValueError(f"cannot send on the {channel} channel")
        if not self._running:
            raise KallichoreError(
                ErrorCode.SESSION_NOT_RUNNING, f"session {self._spec.session_id} is not running"
            )
        if channel is Channel.STDIN and not self._ready:
            raise KallichoreError(ErrorCode.SESSION_NOT_RUNNING, "the kernel is still starting")
        if channel is Channel.SHELL and message.msg_type == "execute_request":
            self._history.requested(message, source)
            if not self._queue.submit(message):
                out.events.append(ExecutionQueuedEvent(message.msg_id))
                return
            self._history.began(message.msg_id)
        elif message.msg_type in _QUEUE_CLEARING:
            self._drop_held()
        out.to_kernel.append((channel, message))

    def from_kernel(self, channel: Channel, message: Message, out: Outbox) -> None:
        """A message the kernel sent: follow it, and forward it unless it was ours."""
        parent = message.parent_msg_id
        msg_type = message.msg_type
        if parent in self._history.open:
            self._history.note(message)
        if channel is Channel.IOPUB:
            self._iopub_alive = True
            if parent in self._own_requests:
                if parent == self._probe:
                    self._end_probe(out)
                return
            if msg_type == "iopub_welcome":
                return
            if msg_type == "status":
                self._on_kernel_status(message, out)
        elif parent in self._own_requests:
            if msg_type == "kernel_info_reply" and not self._kernel_info_received:
                self._store_kernel_info(message)
                self._kernel_info_received = True
            return
        elif parent is not None and msg_type.endswith("_reply"):
            active = self._queue.active
            if parent in self._in_flight or (active is not None and active.msg_id == parent):
                request_type = msg_type.removesuffix("_reply") + "_request"
                self._idle_due[parent] = (self._clock() + REPLY_IDLE_GRACE_SECONDS, request_type)
        out.events.append(JupyterEvent(channel, message))

    def check_overdue(self, out: Outbox) -> None:
        """Probe the kernel for idles overdue after their reply; give up on an unanswered probe."""
        if self._probe is not None:
            if self._clock() >= self._probe_due:
                logger.info(
                    "session %s: the kernel published nothing for our probe; going on without "
                    "the idle it was for",
                    self._spec.session_id,
                )
                self._end_probe(out)
            return
        if not self._idle_due:
            return
        now = self._clock()
        for msg_id, (due, request_type) in list(self._idle_due.items()):
            if due <= now:
                del self._idle_due[msg_id]
                self._probed[msg_id] = request_type
        if not self._probed:
            return
        probe = Message.build(
            "kernel_info_request",
            {},
            session=self._spec.session_id,
            username=self._spec.username or "kallichore",
        )
        logger.info(
            "session %s: no idle for %s a grace period after the reply; probing the kernel",
            self._spec.session_id,
            ", ".join(f"{request_type} {msg_id}" for msg_id, request_type in self._probed.items()),
        )
        self._probe = probe.msg_id
        self._probe_due = now + PROBE_GRACE_SECONDS
        self._own_requests.add(probe.msg_id)
        out.to_kernel.append((Channel.SHELL, probe))

    def _end_probe(self, out: Outbox) -> None:
        """The probe was answered (or given up on): the idles it was for will not come."""
        probed, self._probed, self._probe = self._probed, {}, None
        for msg_id, request_type in probed.items():
            logger.info(
                "session %s: the idle of %s %s was lost; going on without it",
                self._spec.session_id,
                request_type,
                msg_id,
            )
            self._went_idle(msg_id, request_type, out)

    def _on_kernel_status(self, message: Message, out: Outbox) -> None:
        try:
            state = message.content.get("execution_state")
        except WireError:
            return
        if self._status is Status.EXITED:
            return
        request = message.parent_msg_id or ""
        if state == "busy":
            self._in_flight.add(request)
            self._set_status(Status.BUSY, message.parent_msg_type, out)
        elif state == "idle":
            self._went_idle(request, message.parent_msg_type, out)

    def _went_idle(self, request: str, request_type: str | None, out: Outbox) -> None:
        """The kernel finished `request`: maybe rest, maybe send the next queued execution."""
        self._in_flight.discard(request)
        self._idle_due.pop(request, None)
        self._probed.pop(request, None)
        if request_type == "execute_request":
            self._history.ended(request)
        active = self._queue.active
        finished_active = active is not None and active.msg_id == request
        if not self._in_flight:
            self._set_status(Status.IDLE, request_type, out)
        if request_type == "execute_request":
            out.check_working_directory_at = len(out.events)
        if finished_active:
            following = self._queue.advance()
            if following is not None:
                self._history.began(following.msg_id)
                out.to_kernel.append((Channel.SHELL, following))

    # -- heartbeat -----------------------------------------------------------------------------

    def heartbeat_missed(self, out: Outbox) -> None:
        if self._status not in (Status.OFFLINE, Status.EXITED):
            self._set_status(Status.OFFLINE, "lost heartbeat", out)

    def heartbeat_answered(self, out: Outbox) -> None:
        if self._status is Status.OFFLINE:
            status = Status.BUSY if self._in_flight else Status.IDLE
            self._set_status(status, "heartbeat detected after offline", out)

    # -- inside --------------------------------------------------------------------------------

    def _begin_run(self) -> None:
        self._running = True
        self._ready = False
        self._own_requests.clear()
        self._kernel_info_received = False
        self._iopub_alive = False
        self._in_flight.clear()
        self._idle_due.clear()
        self._probed.clear()
        self._probe = None

    def _set_status(self, status: Status, reason: str | None, out: Outbox) -> None:
        if status is self._status:
            return
        self._status = status
        now = self._clock()
        self._idle_since = now if status in _RESTING else None
        self._busy_since = now if status is Status.BUSY else None
        if status is Status.EXITED:
            self._clear_queue()
            self._history.end_all()
            self._in_flight.clear()
            self._idle_due.clear()
            self._probed.clear()
            self._probe = None
        if status in _RESTING:
            out.rested = True
        out.events.append(StatusEvent(status, reason))

    def _drop_held(self) -> None:
        """Drop the held executions: they never reach the kernel."""
        for request in self._queue.drop_pending():
            self._history.ended(request.msg_id, "aborted")

    def _clear_queue(self) -> None:
        """Drop the held executions and the active one's place (its kernel is gone)."""
        self._drop_held()
        self._queue.clear()

    def _store_kernel_info(self, reply: Message) -> None:
        try:
            self._kernel_info = reply.content
        except WireError as exc:
            logger.warning(
                "session %s: unreadable kernel_info_reply: %s", self._spec.session_id, exc
            )
            return
        language_info = self._kernel_info.get("language_info")
        positron = language_info.get("positron") if isinstance(language_info, dict) else None
        if isinstance(positron, dict):
            if isinstance(prompt := positron.get("input_prompt"), str):
                self._input_prompt = prompt
            if isinstance(prompt := positron.get("continuation_prompt"), str):
                self._continuation_prompt = prompt
