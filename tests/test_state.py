"""SessionState on its own: no kernel, no trio, no ZeroMQ; a hand-turned clock."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from kallichore.errors import KallichoreError
from kallichore.jupyter.connection import ConnectionInfo
from kallichore.jupyter.wire import Channel, Message
from kallichore.session.events import (
    ExecutionQueuedEvent,
    ExitedEvent,
    JupyterEvent,
    StatusEvent,
    WorkingDirChangedEvent,
)
from kallichore.session.model import SessionSpec, Status
from kallichore.session.state import (
    PROBE_GRACE_SECONDS,
    REPLY_IDLE_GRACE_SECONDS,
    Outbox,
    SessionState,
)
from tests.conftest import ipykernel_spec


@attrs.define
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def client(msg_type: str, **content: Any) -> Message:
    return Message.build(msg_type, content, session="client")


def kernel(msg_type: str, parent: Message | None, **content: Any) -> Message:
    return Message.build(
        msg_type, content, session="kernel", parent=parent.header if parent else None
    )


def busy(parent: Message | None) -> Message:
    return kernel("status", parent, execution_state="busy")


def idle(parent: Message | None) -> Message:
    return kernel("status", parent, execution_state="idle")


def reply(request: Message) -> Message:
    return kernel(request.msg_type.removesuffix("_request") + "_reply", request, status="ok")


def statuses(out: Outbox) -> list[Status]:
    return [e.status for e in out.events if isinstance(e, StatusEvent)]


def sent(out: Outbox) -> list[str]:
    return [m.msg_id for _, m in out.to_kernel]


def ready_state(spec: SessionSpec | None = None, clock: Clock | None = None) -> SessionState:
    """A state whose kernel has started and answered."""
    state = SessionState(spec or ipykernel_spec(), clock or Clock())
    state.starting(Outbox())
    state.kernel_ready(Outbox())
    return state


def run_to_busy(state: SessionState, request: Message) -> Outbox:
    """A client's execute_request sent and the kernel's busy for it seen."""
    out = Outbox()
    state.from_client(Channel.SHELL, request, out)
    state.from_kernel(Channel.IOPUB, busy(request), out)
    return out


def test_a_new_session_is_uninitialized_and_refuses_messages() -> None:
    state = SessionState(ipykernel_spec())
    assert state.status is Status.UNINITIALIZED
    with pytest.raises(KallichoreError, match="not running"):
        state.from_client(Channel.SHELL, client("execute_request", code="1"), Outbox())


def test_start_goes_starting_then_idle_and_rests() -> None:
    state = SessionState(ipykernel_spec())
    out = Outbox()
    state.starting(out)
    state.kernel_ready(out)
    assert statuses(out) == [Status.STARTING, Status.IDLE]
    assert out.rested
    assert state.ready


def test_our_startup_requests_are_followed_but_not_forwarded() -> None:
    state = SessionState(ipykernel_spec())
    state.starting(Outbox())
    request = client("kernel_info_request")
    state.startup_request(request.msg_id)
    out = Outbox()
    positron = {"input_prompt": "In> ", "continuation_prompt": "..> "}
    info = {"language_info": {"name": "python", "positron": positron}}
    state.from_kernel(Channel.IOPUB, kernel("iopub_welcome", None), out)
    state.from_kernel(Channel.IOPUB, busy(request), out)
    state.from_kernel(Channel.SHELL, kernel("kernel_info_reply", request, **info), out)
    state.from_kernel(Channel.IOPUB, idle(request), out)
    assert out.events == []
    assert state.kernel_info_received
    assert state.iopub_alive
    assert state.kernel_info == info
    assert (state.input_prompt, state.continuation_prompt) == ("In> ", "..> ")


def test_stdin_is_refused_until_the_kernel_is_ready() -> None:
    state = SessionState(ipykernel_spec())
    state.starting(Outbox())
    with pytest.raises(KallichoreError, match="still starting"):
        state.from_client(Channel.STDIN, client("input_reply", value="x"), Outbox())
    with pytest.raises(ValueError, match="iopub"):
        state.from_client(Channel.IOPUB, client("status"), Outbox())


def test_executions_queue_while_one_runs_and_go_one_at_a_time() -> None:
    state = ready_state()
    first, second, third = (client("execute_request", code=str(i)) for i in range(3))
    out = run_to_busy(state, first)
    assert sent(out) == [first.msg_id]
    assert statuses(out) == [Status.BUSY]
    out = Outbox()
    state.from_client(Channel.SHELL, second, out)
    state.from_client(Channel.SHELL, third, out)
    assert out.to_kernel == []
    assert out.events == [
        ExecutionQueuedEvent(second.msg_id),
        ExecutionQueuedEvent(third.msg_id),
    ]
    assert [m.msg_id for m in state.execution_queue.pending] == [second.msg_id, third.msg_id]
    out = Outbox()
    state.from_kernel(Channel.SHELL, reply(first), out)
    state.from_kernel(Channel.IOPUB, idle(first), out)
    assert sent(out) == [second.msg_id]
    assert statuses(out) == [Status.IDLE]
    assert out.check_working_directory_at == 2  # after the reply and the idle status
    assert state.execution_queue.active == second


def test_a_control_request_during_an_execution_keeps_the_session_busy_and_the_queue_held() -> None:
    """Bug: the kernel_info_request's idle used to release the next execution and say idle."""
    state = ready_state()
    running, queued = client("execute_request", code="sleep"), client("execute_request", code="1")
    run_to_busy(state, running)
    state.from_client(Channel.SHELL, queued, Outbox())
    info = client("kernel_info_request")
    out = Outbox()
    state.from_client(Channel.CONTROL, info, out)
    state.from_kernel(Channel.IOPUB, busy(info), out)
    state.from_kernel(Channel.CONTROL, reply(info), out)
    state.from_kernel(Channel.IOPUB, idle(info), out)
    assert sent(out) == [info.msg_id]
    assert statuses(out) == []
    assert state.status is Status.BUSY
    assert state.busy_since is not None
    assert state.execution_queue.active == running
    out = Outbox()
    state.from_kernel(Channel.IOPUB, idle(running), out)
    assert sent(out) == [queued.msg_id]
    assert statuses(out) == [Status.IDLE]


def overdue_first(clock: Clock) -> tuple[SessionState, Message, Message, Message]:
    """A state whose active execution replied a grace period ago without its idle, a second
    execution queued behind it, and the probe the state sent: (state, first, second, probe)."""
    state = ready_state(clock=clock)
    first, second = client("execute_request", code="1"), client("execute_request", code="2")
    run_to_busy(state, first)
    state.from_client(Channel.SHELL, second, Outbox())
    state.from_kernel(Channel.SHELL, reply(first), Outbox())
    clock.now += REPLY_IDLE_GRACE_SECONDS / 2
    out = Outbox()
    state.check_overdue(out)
    assert out == Outbox()
    clock.now += REPLY_IDLE_GRACE_SECONDS
    state.check_overdue(out)
    [(channel, probe)] = out.to_kernel
    assert (channel, probe.msg_type) == (Channel.SHELL, "kernel_info_request")
    assert out.events == []
    assert state.status is Status.BUSY
    assert state.execution_queue.active == first
    state.check_overdue(out)  # one probe at a time
    assert len(out.to_kernel) == 1
    return state, first, second, probe


def test_a_lost_idle_is_proven_lost_by_the_probe_that_follows_it() -> None:
    state, _, second, probe = overdue_first(Clock())
    out = Outbox()
    state.from_kernel(Channel.IOPUB, busy(probe), out)
    assert sent(out) == [second.msg_id]
    assert statuses(out) == [Status.IDLE]
    assert [e for e in out.events if isinstance(e, JupyterEvent)] == []  # the probe is ours
    # The rest of the probe is not forwarded either, and changes nothing.
    rest = Outbox()
    state.from_kernel(Channel.SHELL, reply(probe), rest)
    state.from_kernel(Channel.IOPUB, idle(probe), rest)
    assert rest == Outbox()
    assert state.execution_queue.active == second


def test_a_probe_outlives_status_changes_while_it_is_out() -> None:
    state, _, second, probe = overdue_first(Clock())
    out = Outbox()
    state.heartbeat_missed(out)
    state.heartbeat_answered(out)
    assert statuses(out) == [Status.OFFLINE, Status.BUSY]
    state.from_kernel(Channel.IOPUB, busy(probe), out)
    assert sent(out) == [second.msg_id]


def test_a_late_idle_comes_before_the_probe_and_is_followed_as_usual() -> None:
    state, first, second, probe = overdue_first(Clock())
    out = Outbox()
    state.from_kernel(Channel.IOPUB, idle(first), out)
    assert sent(out) == [second.msg_id]
    late = Outbox()
    state.from_kernel(Channel.IOPUB, busy(probe), late)
    state.from_kernel(Channel.IOPUB, idle(probe), late)
    assert late == Outbox()


def test_a_kernel_silent_for_the_probe_is_given_up_on_after_a_longer_wait() -> None:
    clock = Clock()
    state, first, second, probe = overdue_first(clock)
    out = Outbox()
    state.from_kernel(Channel.SHELL, reply(probe), out)
    clock.now += PROBE_GRACE_SECONDS / 2
    state.check_overdue(out)
    assert out == Outbox()
    clock.now += PROBE_GRACE_SECONDS
    state.check_overdue(out)
    assert sent(out) == [second.msg_id]
    assert statuses(out) == [Status.IDLE]
    # The idle, when it comes after all, changes nothing.
    late = Outbox()
    state.from_kernel(Channel.IOPUB, idle(first), late)
    assert late.to_kernel == []
    assert statuses(late) == []
    assert state.execution_queue.active == second


def test_an_idle_before_its_reply_needs_no_grace_period() -> None:
    clock = Clock()
    state = ready_state(clock=clock)
    first = client("execute_request", code="1")
    run_to_busy(state, first)
    state.from_kernel(Channel.IOPUB, idle(first), Outbox())
    state.from_kernel(Channel.SHELL, reply(first), Outbox())
    clock.now += 10 * REPLY_IDLE_GRACE_SECONDS
    out = Outbox()
    state.check_overdue(out)
    assert out == Outbox()


def test_interrupt_and_shutdown_requests_drop_what_is_held_and_the_active_ends_first() -> None:
    """The executions held are dropped (the kernel would abort them); the one at the kernel
    keeps its place until its idle: ipykernel aborts an execution that arrives while it is
    still ending an interrupted one."""
    for msg_type in ("interrupt_request", "shutdown_request"):
        state = ready_state()
        first, second = client("execute_request", code="1"), client("execute_request", code="2")
        run_to_busy(state, first)
        state.from_client(Channel.SHELL, second, Outbox())
        out = Outbox()
        request = client(msg_type)
        state.from_client(Channel.CONTROL, request, out)
        assert sent(out) == [request.msg_id]
        assert state.execution_queue.active == first
        assert len(state.execution_queue) == 0
        [dropped] = [e for e in state.history.entries() if e["msg_id"] == second.msg_id]
        assert dropped["status"] == "aborted"
        third = client("execute_request", code="3")
        out = Outbox()
        state.from_client(Channel.SHELL, third, out)
        state.from_kernel(Channel.SHELL, reply(first), out)
        assert sent(out) == []
        state.from_kernel(Channel.IOPUB, idle(first), out)
        assert sent(out) == [third.msg_id]


def test_heartbeat_offline_and_back_to_what_the_kernel_is_doing() -> None:
    state = ready_state()
    out = Outbox()
    state.heartbeat_missed(out)
    state.heartbeat_missed(out)
    state.heartbeat_answered(out)
    assert statuses(out) == [Status.OFFLINE, Status.IDLE]
    run_to_busy(state, client("execute_request", code="1"))
    out = Outbox()
    state.heartbeat_missed(out)
    state.heartbeat_answered(out)
    assert statuses(out) == [Status.OFFLINE, Status.BUSY]


def test_exit_clears_the_queue_and_says_why() -> None:
    clock = Clock()
    state = ready_state(clock=clock)
    run_to_busy(state, client("execute_request", code="1"))
    state.from_client(Channel.SHELL, client("execute_request", code="2"), Outbox())
    clock.now += 5
    out = Outbox()
    state.exited(-9, "child process exited", out)
    assert out.events == [StatusEvent(Status.EXITED, "child process exited"), ExitedEvent(-9)]
    assert state.execution_queue.active is None
    assert len(state.execution_queue) == 0
    assert state.idle_since == clock.now
    assert state.busy_since is None
    assert not state.running
    # Late messages from the dead kernel change nothing.
    late = Outbox()
    state.from_kernel(Channel.IOPUB, idle(None), late)
    assert statuses(late) == []
    with pytest.raises(KallichoreError):
        state.from_client(Channel.SHELL, client("execute_request", code="3"), Outbox())


def test_working_directory_changes_follow_the_idle_that_ends_the_execution() -> None:
    state = ready_state()
    request = client("execute_request", code="import os; os.chdir('/tmp')")
    out = run_to_busy(state, request)
    out = Outbox()
    state.from_kernel(Channel.IOPUB, idle(request), out)
    state.working_directory_seen("/tmp", out)
    assert out.events[0] == StatusEvent(Status.IDLE, "execute_request")
    assert out.events[1] == WorkingDirChangedEvent("/tmp")
    assert isinstance(out.events[2], JupyterEvent)
    assert out.check_working_directory_at is None
    again = Outbox()
    state.working_directory_seen("/tmp", again)
    state.working_directory_seen(None, again)
    assert again.events == []
    assert state.working_directory == "/tmp"


def test_a_failed_launch_is_an_exit_without_exit_code() -> None:
    state = SessionState(ipykernel_spec())
    out = Outbox()
    state.starting(out)
    state.launch_failed("no such file", out)
    assert statuses(out) == [Status.STARTING, Status.EXITED]
    assert not state.running


def test_adoption_records_where_the_kernel_listens() -> None:
    state = SessionState(ipykernel_spec())
    info = ConnectionInfo.on_ports([1001, 1002, 1003, 1004, 1005], "key")
    state.adopting(info)
    assert state.running
    assert state.connection == info
    assert info.shell_port == 1002
    assert info.stdin_port == 1005


class KernelAndClients(RuleBasedStateMachine):
    """A kernel that handles shell requests one at a time (control requests any time), clients
    sending executions and control requests, a heartbeat that comes and goes, a clock that moves,
    and messages that the kernel's PUB socket may drop. Whatever the interleaving: the kernel
    is never handed a second execution before the first one ended, no execution is lost or sent
    twice, and the session is busy exactly while the kernel works on something."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.state = ready_state(clock=self.clock)
        # The kernel's view: shell requests received, in order; the one it is working on.
        self.kernel_shell: list[Message] = []
        self.working: Message | None = None
        self.replied: Message | None = None
        # The session's probes (by msg_id) and when the latest was sent.
        self.probes: set[str] = set()
        self.probe_sent_at: float | None = None
        self.control_working: list[Message] = []
        self.submitted: list[str] = []
        self.sent_executions: list[str] = []
        self.dropped: set[str] = set()
        self.abandoned: set[str] = set()
        self.finished: set[str] = set()
        self.busy_delivered = False
        self.last_status: Status = self.state.status

    def feed(self, out: Outbox) -> None:
        for channel, message in out.to_kernel:
            if channel is Channel.SHELL:
                if message.msg_type == "execute_request":
                    assert message.msg_id not in self.sent_executions, "sent twice"
                    self.sent_executions.append(message.msg_id)
                else:
                    assert message.msg_type == "kernel_info_request"
                    self.probes.add(message.msg_id)
                    self.probe_sent_at = self.clock.now
                self.kernel_shell.append(message)
            else:
                self.control_working.append(message)
        for event in out.events:
            if isinstance(event, StatusEvent):
                assert event.status is not self.last_status, "a status repeated"
                self.last_status = event.status

    def from_kernel(self, channel: Channel, message: Message) -> None:
        out = Outbox()
        self.state.from_kernel(channel, message, out)
        self.feed(out)

    @rule(code=st.integers(0, 9))
    def client_executes(self, code: int) -> None:
        request = client("execute_request", code=str(code))
        self.submitted.append(request.msg_id)
        out = Outbox()
        self.state.from_client(Channel.SHELL, request, out)
        self.feed(out)

    @rule()
    def client_asks_on_control(self) -> None:
        out = Outbox()
        self.state.from_client(Channel.CONTROL, client("kernel_info_request"), out)
        self.feed(out)

    @rule()
    def client_interrupts(self) -> None:
        self.dropped.update(m.msg_id for m in self.state.execution_queue.pending)
        out = Outbox()
        self.state.from_client(Channel.CONTROL, client("interrupt_request"), out)
        self.feed(out)

    @precondition(lambda self: self.working is None and self.kernel_shell)
    @rule(lose_busy=st.booleans())
    def kernel_starts_the_next_shell_request(self, lose_busy: bool) -> None:
        self.working = self.kernel_shell.pop(0)
        # The session does not show the kernel busy with its own probe.
        self.busy_delivered = not lose_busy and self.working.msg_id not in self.probes
        if not lose_busy:
            self.from_kernel(Channel.IOPUB, busy(self.working))

    @precondition(lambda self: self.working is not None and self.replied is None)
    @rule()
    def kernel_replies(self) -> None:
        assert self.working is not None
        self.replied = self.working
        self.from_kernel(Channel.SHELL, reply(self.working))

    @precondition(lambda self: self.replied is not None)
    @rule(lose_idle=st.booleans())
    def kernel_goes_idle(self, lose_idle: bool) -> None:
        assert self.working is not None
        finished, self.working, self.replied = self.working, None, None
        self.busy_delivered = False
        self.finished.add(finished.msg_id)
        if not lose_idle:
            self.from_kernel(Channel.IOPUB, idle(finished))

    @precondition(lambda self: self.control_working)
    @rule()
    def kernel_answers_on_control(self) -> None:
        request = self.control_working.pop(0)
        self.from_kernel(Channel.IOPUB, busy(request))
        self.from_kernel(Channel.CONTROL, reply(request))
        self.from_kernel(Channel.IOPUB, idle(request))

    @rule(seconds=st.sampled_from([0.1, 1.0, REPLY_IDLE_GRACE_SECONDS * 1.5, PROBE_GRACE_SECONDS]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds
        before = self.state.execution_queue.active
        out = Outbox()
        self.state.check_overdue(out)
        self.feed(out)
        if before is None or before == self.state.execution_queue.active:
            return
        if before.msg_id not in self.finished:
            # Let go of while the kernel still works on it: only when the kernel published
            # nothing for a probe for PROBE_GRACE_SECONDS.
            assert self.probe_sent_at is not None
            assert self.clock.now >= self.probe_sent_at + PROBE_GRACE_SECONDS
            self.abandoned.add(before.msg_id)

    @rule(answered=st.booleans())
    def heartbeat(self, answered: bool) -> None:
        out = Outbox()
        if answered:
            self.state.heartbeat_answered(out)
            assert self.state.status is not Status.OFFLINE
        else:
            self.state.heartbeat_missed(out)
            assert self.state.status is Status.OFFLINE
        self.feed(out)

    @rule()
    def kernel_and_clock_settle(self) -> None:
        """However it got here: once the kernel does all it was sent, with every message of
        it delivered, and time passes, every execution has been sent and the session rests.
        Nothing waits for ever (a probe forgotten, an idle waited for that will not come)."""
        self.heartbeat(answered=True)
        for _ in range(200):
            if self.control_working:
                self.kernel_answers_on_control()
            elif self.working is not None:
                if self.replied is None:
                    self.kernel_replies()
                self.kernel_goes_idle(lose_idle=False)
            elif self.kernel_shell:
                self.kernel_starts_the_next_shell_request(lose_busy=False)
            else:
                self.time_passes(REPLY_IDLE_GRACE_SECONDS + PROBE_GRACE_SECONDS)
                if not self.kernel_shell:
                    break
        queue = self.state.execution_queue
        assert (queue.active, len(queue)) == (None, 0)
        assert self.state.status is Status.IDLE

    @invariant()
    def one_execution_at_a_time(self) -> None:
        """The kernel is never handed a second execution while one runs (one abandoned after
        a probe the kernel published nothing for aside: the kernel itself queues what follows
        it)."""
        unfinished = [m for m in self.sent_executions if m not in self.finished | self.abandoned]
        assert len(unfinished) <= 1, unfinished

    @invariant()
    def no_execution_lost(self) -> None:
        queue = self.state.execution_queue
        waiting = {m.msg_id for m in queue.pending}
        for msg_id in self.submitted:
            assert msg_id in self.sent_executions or msg_id in waiting or msg_id in self.dropped

    @invariant()
    def busy_while_the_kernel_works(self) -> None:
        """Working on a request whose busy we saw, and not replied yet: the session is busy
        (or offline). After the reply, a lost idle may make it give up after the grace."""
        if self.busy_delivered and self.replied is None:
            assert self.state.status in (Status.BUSY, Status.OFFLINE)


TestKernelAndClients = KernelAndClients.TestCase
TestKernelAndClients.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
