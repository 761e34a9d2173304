"""Kernel sessions against real ipykernel processes, through the embedded API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import psutil
import pytest
import trio
import trio.testing

from kallichore.errors import ErrorCode, KallichoreError, StartupError
from kallichore.jupyter.wire import Channel
from kallichore.session.events import (
    Event,
    ExecutionQueuedEvent,
    ExitedEvent,
    JupyterEvent,
    OutputEvent,
    ResourceUsageEvent,
    StatusEvent,
    Subscription,
)
from kallichore.session.kernel_session import KernelSession
from kallichore.session.model import (
    InterruptMode,
    KernelTransport,
    SessionConfig,
    Status,
    VarAction,
    VarActionType,
)
from kallichore.supervisor import Supervisor, SupervisorConfig, open_supervisor
from tests.conftest import IPYKERNEL_ARGV, ipykernel_spec, supervisor_config
from tests.kernel_client import (
    collect_until,
    is_done,
    is_idle_for,
    of_type,
    replies_to,
    stdout_text,
)


async def run(session: KernelSession, code: str, **kwargs: bool) -> list[JupyterEvent | Event]:
    """Execute `code` and return every event up to the kernel's idle for it."""
    with session.events.subscribe() as sub:
        msg_id = await session.execute(code, **kwargs)
        return await collect_until(sub, is_done(msg_id))


async def execute_and_collect(session: KernelSession, code: str) -> tuple[str, list[Event]]:
    with session.events.subscribe() as sub:
        msg_id = await session.execute(code)
        return msg_id, await collect_until(sub, is_done(msg_id))


SLEEPING = "import time; print('sleeping', flush=True); time.sleep(600)"


def printed(msg_id: str, text: str) -> Callable[[Event], bool]:
    """The output `text` of execution `msg_id`: proof that the kernel runs its code (`busy`
    comes earlier, and an interrupt before the code runs is lost)."""
    return lambda e: (
        isinstance(e, JupyterEvent)
        and e.message.parent_msg_id == msg_id
        and stdout_text([e.message]) == text
    )


def statuses(events: list[Event]) -> list[tuple[Status, str | None]]:
    return [(e.status, e.reason) for e in events if isinstance(e, StatusEvent)]


async def test_a_session_is_found_only_once_it_can_run_a_kernel(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request for a session still being created (two clients at once: schemathesis's
    workers did it) must not find it half made: its start would fail with a 500."""
    looked_up: list[str] = []
    run = KernelSession.run

    async def run_looked_up(
        session: KernelSession, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # What a request served while the session's nursery starts would find.
        try:
            supervisor.get(session.session_id)
        except KallichoreError:
            looked_up.append("not found")
        else:
            looked_up.append("found half made")
        await run(session, task_status=task_status)

    monkeypatch.setattr(KernelSession, "run", run_looked_up)
    session = await supervisor.create_session(ipykernel_spec())
    assert looked_up == ["not found"]
    assert supervisor.get(session.session_id) is session
    with pytest.raises(KallichoreError) as twice:
        await supervisor.create_session(ipykernel_spec())
    assert twice.value.code is ErrorCode.SESSION_EXISTS


async def test_start_returns_kernel_info_and_session_is_idle(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    assert session.status is Status.UNINITIALIZED
    info = await session.start()
    assert info["status"] == "ok"
    assert info["language_info"]["name"] == "python"
    assert session.kernel_info == info
    assert session.status is Status.IDLE
    assert session.process_id is not None
    with session.events.subscribe() as sub:
        events = await sub.receive()
    assert statuses(events)[:1] == [(Status.STARTING, "start API called")]
    assert (Status.IDLE, "kernel_info_request") in statuses(events)
    # The supervisor's own kernel_info exchange is not shown to clients.
    assert not [
        e
        for e in events
        if isinstance(e, JupyterEvent) and e.message.msg_type == "kernel_info_reply"
    ]


async def test_execute_stream_result_and_error(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    msg_id, events = await execute_and_collect(session, "print(6*7)\n6*7")
    messages = replies_to(events, msg_id)
    assert stdout_text(messages) == "42\n"
    [result] = of_type(messages, "execute_result")
    assert result.content["data"]["text/plain"] == "42"
    assert statuses(events)[-2:] == [
        (Status.BUSY, "execute_request"),
        (Status.IDLE, "execute_request"),
    ]

    msg_id, events = await execute_and_collect(session, "1/0")
    messages = replies_to(events, msg_id)
    [error] = of_type(messages, "error")
    assert error.content["ename"] == "ZeroDivisionError"
    [reply] = of_type(messages, "execute_reply")
    assert reply.content["status"] == "error"


async def test_input_round_trip_through_stdin(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    with session.events.subscribe() as sub:
        msg_id = await session.execute("answer = input('name? ')\nprint('hello', answer)")
        [request_event] = [
            e
            for e in await collect_until(
                sub, lambda e: isinstance(e, JupyterEvent) and e.message.msg_type == "input_request"
            )
            if isinstance(e, JupyterEvent) and e.message.msg_type == "input_request"
        ]
        assert request_event.channel is Channel.STDIN
        assert request_event.message.content["prompt"] == "name? "
        reply = session.message(
            "input_reply", {"value": "world"}, parent=request_event.message.header
        )
        await session.send(Channel.STDIN, reply)
        events = await collect_until(sub, is_done(msg_id))
    assert "hello world\n" in stdout_text(replies_to(events, msg_id))


@pytest.mark.parametrize("mode", [InterruptMode.SIGNAL, InterruptMode.MESSAGE])
async def test_interrupt(supervisor: Supervisor, mode: InterruptMode) -> None:
    session = await supervisor.create_session(ipykernel_spec(interrupt_mode=mode))
    await session.start()
    with session.events.subscribe() as sub:
        msg_id = await session.execute(SLEEPING)
        await collect_until(sub, printed(msg_id, "sleeping\n"))
        await session.interrupt()
        events = await collect_until(sub, is_done(msg_id))
    [reply] = of_type(replies_to(events, msg_id), "execute_reply")
    assert reply.content["status"] == "error"
    assert reply.content["ename"] == "KeyboardInterrupt"
    if mode is InterruptMode.MESSAGE:
        interrupt_replies = [
            e
            for e in events
            if isinstance(e, JupyterEvent) and e.message.msg_type == "interrupt_reply"
        ]
        assert interrupt_replies
        assert interrupt_replies[0].channel is Channel.CONTROL
    # Still usable afterwards.
    msg_id, events = await execute_and_collect(session, "print('after')")
    assert stdout_text(replies_to(events, msg_id)) == "after\n"


async def test_restart_clears_state_and_keeps_the_session(
    supervisor: Supervisor, tmp_path: object
) -> None:
    session = await supervisor.create_session(
        ipykernel_spec(env=[VarAction(VarActionType.REPLACE, "KALLICHORE_TEST", "before")])
    )
    await session.start()
    await run(session, "x = 41")
    first_pid = session.process_id
    with session.events.subscribe() as sub:
        info = await session.restart(
            env=[VarAction(VarActionType.REPLACE, "KALLICHORE_TEST", "after")]
        )
        events = await sub.receive()
    assert info["status"] == "ok"
    assert session.session_id == "python-test"
    assert session.process_id not in (None, first_pid)
    assert supervisor.get("python-test") is session
    order = statuses(events)
    exited = order.index((Status.EXITED, "child process exited"))
    assert order[exited + 1] == (Status.STARTING, "start API called")
    assert order[-1] == (Status.IDLE, "kernel_info_request")
    assert any(isinstance(e, ExitedEvent) for e in events)
    assert any(
        isinstance(e, JupyterEvent)
        and e.message.msg_type == "shutdown_reply"
        and e.channel is Channel.CONTROL
        for e in events
    )
    msg_id, events = await execute_and_collect(
        session, "import os; print(os.environ['KALLICHORE_TEST']); x"
    )
    messages = replies_to(events, msg_id)
    assert stdout_text(messages) == "after\n"
    [error] = of_type(messages, "error")
    assert error.content["ename"] == "NameError"


async def test_restart_in_a_new_working_directory(
    supervisor: Supervisor, tmp_path: os.PathLike[str]
) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    await session.restart(working_directory=os.fspath(tmp_path))
    msg_id, events = await execute_and_collect(session, "import os; print(os.getcwd())")
    assert stdout_text(replies_to(events, msg_id)) == f"{os.path.realpath(tmp_path)}\n"


async def test_restart_of_a_session_that_is_not_running_starts_it(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    info = await session.restart()
    assert info["status"] == "ok"
    assert session.status is Status.IDLE


async def test_kill_reports_the_signal(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    pid = session.process_id
    assert pid is not None
    with session.events.subscribe() as sub:
        await session.kill()
        events = await collect_until(sub, lambda e: isinstance(e, ExitedEvent))
    assert events[-1] == ExitedEvent(-signal.SIGKILL)
    assert (Status.EXITED, "child process exited") in statuses(events)
    assert session.status is Status.EXITED
    assert session.process_id is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(KallichoreError) as raised:
        await session.kill()
    assert raised.value.code is ErrorCode.SESSION_NOT_RUNNING


async def test_kernel_that_exits_on_its_own(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    with session.events.subscribe() as sub:
        await session.execute("import os; os._exit(3)")
        events = await collect_until(sub, lambda e: isinstance(e, ExitedEvent))
    assert events[-1] == ExitedEvent(3)
    assert session.status is Status.EXITED
    # No message is fed to a kernel that is not there.
    with pytest.raises(KallichoreError) as raised:
        await session.execute("1")
    assert raised.value.code is ErrorCode.SESSION_NOT_RUNNING


async def test_bad_argv_fails_the_start_clearly(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(
        ipykernel_spec(argv=["/nonexistent/kernel", "{connection_file}"])
    )
    with pytest.raises(StartupError) as raised:
        await session.start()
    assert raised.value.code is ErrorCode.PROCESS_START_FAILED
    assert raised.value.exit_code == 2  # ENOENT
    assert "/nonexistent/kernel" in raised.value.message
    assert session.status is Status.EXITED
    assert not list(supervisor.runtime_dir.iterdir())


async def test_kernel_that_exits_during_start(supervisor: Supervisor) -> None:
    code = "import sys; print('cannot start today'); print('details', file=sys.stderr); sys.exit(7)"
    session = await supervisor.create_session(ipykernel_spec(argv=[sys.executable, "-c", code]))
    with pytest.raises(StartupError) as raised:
        await session.start()
    error = raised.value
    assert error.code is ErrorCode.PROCESS_ABNORMAL_EXIT
    assert error.exit_code == 7
    assert "cannot start today\n" in error.output
    assert "details\n" in error.output
    assert session.status is Status.EXITED
    assert not session.is_running
    assert not list(supervisor.runtime_dir.iterdir())


async def test_kernel_that_never_connects_times_out_and_is_killed(supervisor: Supervisor) -> None:
    code = "import time; print('sleeping', flush=True); time.sleep(600)"
    session = await supervisor.create_session(
        ipykernel_spec(argv=[sys.executable, "-c", code], connection_timeout=1.0)
    )
    with pytest.raises(StartupError) as raised:
        await session.start()
    assert raised.value.code is ErrorCode.SESSION_CONNECTION_TIMEOUT
    assert "sleeping\n" in raised.value.output
    assert session.status is Status.EXITED
    assert not psutil.Process().children(recursive=True)


async def test_events_wait_for_the_next_subscriber(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    with session.events.subscribe() as sub:
        await sub.receive()  # startup events, taken by an earlier client
    msg_id = await session.execute("for i in range(50): print(i)")
    with trio.fail_after(60):
        while session.execution_queue.active is not None:
            await trio.sleep(0.05)
    with session.events.subscribe() as sub:
        events = await collect_until(sub, is_done(msg_id))
    assert stdout_text(replies_to(events, msg_id)) == "".join(f"{i}\n" for i in range(50))
    kinds = [e.message.msg_type for e in events if isinstance(e, JupyterEvent)]
    assert kinds[0] == "status"
    assert kinds.index("execute_input") < kinds.index("stream")


async def test_execution_queue_holds_requests_while_the_kernel_is_busy(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    go_on = tmp_path / "go-on"
    with session.events.subscribe() as sub:
        # The first one runs until we have seen the queue behind it.
        first = await session.execute(
            f"import os, time\nwhile not os.path.exists({str(go_on)!r}): time.sleep(0.05)\na = 1"
        )
        second = await session.execute("b = a + 1")
        third = await session.execute("print(a + b)")
        assert session.execution_queue.active is not None
        assert session.execution_queue.active.msg_id == first
        assert [m.msg_id for m in session.execution_queue.pending] == [second, third]
        go_on.touch()
        events = await collect_until(sub, is_done(third))
    queued = [e.msg_id for e in events if isinstance(e, ExecutionQueuedEvent)]
    assert queued == [second, third]
    assert stdout_text(replies_to(events, third)) == "3\n"
    assert session.execution_queue.active is None


async def test_heartbeat_loss_and_recovery() -> None:
    config = SupervisorConfig(
        session=SessionConfig(
            heartbeat_interval=0.2, unattended_heartbeat_interval=0.2, heartbeat_timeout=1.0
        )
    )
    async with open_supervisor(config) as supervisor:
        session = await supervisor.create_session(ipykernel_spec())
        await session.start()
        with session.events.subscribe() as sub:
            await stop_until_offline(session, sub)
            events = await collect_until(
                sub, lambda e: isinstance(e, StatusEvent) and e.status is Status.IDLE
            )
    assert (Status.IDLE, "heartbeat detected after offline") in statuses(events)


async def test_kernel_output_lines_become_output_events(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    with session.events.subscribe() as sub:
        await session.execute("import os; os.write(2, b'straight to stderr\\n')")
        events = await collect_until(
            sub, lambda e: isinstance(e, OutputEvent) and "stderr" in e.text
        )
    assert events[-1] == OutputEvent("stderr", "straight to stderr\n")


async def test_delete_only_when_not_running(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    with pytest.raises(KallichoreError) as raised:
        await supervisor.delete("python-test")
    assert raised.value.code is ErrorCode.SESSION_RUNNING
    await session.shutdown()
    assert session.status is Status.EXITED
    await supervisor.delete("python-test")
    with pytest.raises(KallichoreError) as missing:
        supervisor.get("python-test")
    assert missing.value.code is ErrorCode.SESSION_NOT_FOUND


async def test_duplicate_and_invalid_session_ids(supervisor: Supervisor) -> None:
    await supervisor.create_session(ipykernel_spec())
    with pytest.raises(KallichoreError) as raised:
        await supervisor.create_session(ipykernel_spec())
    assert raised.value.code is ErrorCode.SESSION_EXISTS
    with pytest.raises(KallichoreError) as invalid:
        ipykernel_spec("../escape")
    assert invalid.value.code is ErrorCode.SESSION_CREATE_FAILED


async def test_leaving_the_supervisor_leaves_no_process_or_file(tmp_path: os.PathLike[str]) -> None:
    async with open_supervisor() as sup:
        runtime_dir = sup.runtime_dir
        sessions = [await sup.create_session(ipykernel_spec(f"python-{i}")) for i in range(3)]
        async with trio.open_nursery() as nursery:
            for session in sessions:
                nursery.start_soon(session.start)
        # One kernel is busy and one has a background child in its process group.
        await sessions[0].execute("import time; time.sleep(600)")
        await run(sessions[1], "import subprocess; p = subprocess.Popen(['sleep', '600'])")
        assert len(psutil.Process().children(recursive=True)) >= 4
        assert list(runtime_dir.iterdir())
    assert psutil.Process().children(recursive=True) == []
    assert not runtime_dir.exists()


async def test_an_error_in_the_block_comes_out_as_itself() -> None:
    with pytest.raises(ValueError, match="mine"):
        async with open_supervisor():
            raise ValueError("mine")


async def test_a_cancelled_start_leaves_nothing_running(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    with trio.move_on_after(0.05) as scope:
        await session.start()
    assert scope.cancelled_caught
    assert session.status is Status.EXITED
    assert not session.is_running
    assert psutil.Process().children(recursive=True) == []
    assert not list(supervisor.runtime_dir.iterdir())
    # The session can still be started afterwards.
    info = await session.start()
    assert info["status"] == "ok"


async def test_shutdown_kills_a_kernel_that_does_not_exit_in_time(supervisor: Supervisor) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    pid = session.process_id
    with session.events.subscribe() as sub:
        msg_id = await session.execute(SLEEPING)
        await collect_until(sub, printed(msg_id, "sleeping\n"))
        await session.shutdown(grace=0.5)
        events = await collect_until(sub, lambda e: isinstance(e, ExitedEvent))
    assert session.status is Status.EXITED
    # A busy ipykernel does not act on shutdown_request: the grace period ran out.
    assert events[-1] == ExitedEvent(-signal.SIGKILL)
    assert pid is not None
    assert not psutil.pid_exists(pid)


async def test_a_watched_session_beats_at_the_attended_interval(tmp_path: os.PathLike[str]) -> None:
    config = SupervisorConfig(
        session=SessionConfig(
            heartbeat_interval=0.2, unattended_heartbeat_interval=1000.0, heartbeat_timeout=1.0
        )
    )
    async with open_supervisor(config) as sup:
        session = await sup.create_session(ipykernel_spec())
        with session.events.subscribe() as sub:  # a client is attached
            await session.start()
            await trio.sleep(0.5)  # past the first beat: later ones come every 0.2 s
            await stop_until_offline(session, sub)


async def stop_until_offline(session: KernelSession, sub: Subscription) -> None:
    """Stop the kernel (SIGSTOP) until the session reports it offline, then let it go on."""
    pid = session.process_id
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        await collect_until(
            sub, lambda e: isinstance(e, StatusEvent) and e.status is Status.OFFLINE
        )
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_a_burst_of_output_while_the_supervisor_is_busy_is_not_dropped(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    """While our event loop is blocked, ZeroMQ's own threads keep the kernel's output: none of
    it may be lost on our side.

    The kernel's PUB socket drops what it cannot queue for a subscriber that falls behind
    (1,000 messages, ZeroMQ's default, which ipykernel keeps), and how far behind ours falls
    depends on the machine's load. So the burst stays within that queue, and every message must
    arrive however the threads are scheduled. (Our SUB socket's queue is larger, so that bigger
    bursts survive a busy event loop whenever ZeroMQ's thread gets the CPU, but that is a race
    no test can pin down.)
    """
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    # 10 KB messages: more than the loopback TCP buffers hold, so the queues hold the rest.
    count = 900
    sent = tmp_path / "burst-sent"
    code = (
        "_k = get_ipython().kernel\n"
        "_parent = _k.get_parent()\n"
        "_content = {'data': {'text/plain': 'x' * 10_000}, 'metadata': {}, 'transient': {}}\n"
        f"for _ in range({count}):\n"
        "    _k.session.send(_k.iopub_socket, 'display_data', _content, parent=_parent)\n"
        f"open({str(sent)!r}, 'w').close()\n"
    )
    with session.events.subscribe() as sub:
        msg_id = await session.execute(code)
        # Block the event loop (only ZeroMQ's threads run) until the kernel has sent it all.
        deadline = time.monotonic() + 60
        while not sent.exists():
            assert time.monotonic() < deadline, "the kernel did not send its burst"
            time.sleep(0.01)  # noqa: ASYNC251
        events = await collect_until(sub, is_done(msg_id))
    assert len(of_type(replies_to(events, msg_id), "display_data")) == count


async def test_a_kernel_asking_for_input_at_once_is_heard_however_slow_the_stdin_connection(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    """The kernel's stdin ROUTER drops an input_request for a peer whose ZeroMQ handshake is not
    done, and the kernel then waits forever. A proxy in front of the kernel's stdin port holds
    our connection, as a loaded machine may: the session must not be ready before it is done."""
    session = await supervisor.create_session(ipykernel_spec("python-adopted", argv=()))
    info = session.external_connection_info()
    connection_file = tmp_path / "kernel.json"
    connection_file.write_text(json.dumps(info.to_dict()))
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy_port = listener.socket.getsockname()[1]
    accepted, release, adopted = trio.Event(), trio.Event(), trio.Event()

    async def hold_then_forward(client: trio.SocketStream) -> None:
        accepted.set()
        await release.wait()
        kernel = await trio.open_tcp_stream("127.0.0.1", info.stdin_port)
        async with client, kernel, trio.open_nursery() as pipes:
            pipes.start_soon(forward, client, kernel)
            pipes.start_soon(forward, kernel, client)

    async def adopt() -> None:
        await session.adopt(attrs.evolve(info, stdin_port=proxy_port))
        adopted.set()

    process = await trio.lowlevel.open_process(
        [*IPYKERNEL_ARGV[:-1], str(connection_file)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, hold_then_forward, [listener])
            nursery.start_soon(adopt)
            with trio.fail_after(60):
                await accepted.wait()
            # Every task now waits for something; only the held connection can free adopt().
            await trio.testing.wait_all_tasks_blocked()
            assert not adopted.is_set()
            release.set()
            with trio.fail_after(60):
                await adopted.wait()
            with session.events.subscribe(backlog=False) as sub:
                msg_id = await session.execute("print('hi', input('who? '))")
                asked = await collect_until(
                    sub,
                    lambda e: isinstance(e, JupyterEvent) and e.message.msg_type == "input_request",
                )
                [request] = of_type(replies_to(asked, msg_id), "input_request")
                reply = session.message("input_reply", {"value": "there"}, parent=request.header)
                await session.send(Channel.STDIN, reply)
                events = await collect_until(sub, is_done(msg_id))
            assert stdout_text(replies_to(events, msg_id)) == "hi there\n"
            await session.shutdown()
            nursery.cancel_scope.cancel()
    except BaseException:
        process.kill()
        raise
    with trio.fail_after(30):
        await process.wait()


async def forward(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    """Copy one direction of a proxied connection until either side closes it."""
    with contextlib.suppress(trio.BrokenResourceError):
        while data := await source.receive_some():
            await sink.send_all(data)


async def test_a_control_request_during_an_execution_keeps_the_session_busy(
    supervisor: Supervisor, tmp_path: os.PathLike[str]
) -> None:
    """The kernel publishes busy/idle for a kernel_info_request on control while code runs;
    that idle must neither make the session idle nor send the queued execution early."""
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    go_on = os.path.join(tmp_path, "go-on")
    with session.events.subscribe() as sub:
        # Runs until the test says so, however slow the machine.
        first = await session.execute(
            "import os, time; print('running', flush=True)\n"
            f"while not os.path.exists({go_on!r}): time.sleep(0.05)"
        )
        await collect_until(sub, printed(first, "running\n"))
        second = await session.execute("6 * 7")
        info = session.message("kernel_info_request")
        await session.send(Channel.CONTROL, info)
        events = await collect_until(sub, is_idle_for(info.msg_id))
        assert Status.IDLE not in [e.status for e in events if isinstance(e, StatusEvent)]
        assert session.status is not Status.IDLE  # busy (or offline, on a loaded machine)
        queue = session.execution_queue
        assert queue.active is not None
        assert queue.active.msg_id == first
        assert [m.msg_id for m in queue.pending] == [second]
        Path(go_on).touch()
        events += await collect_until(sub, is_done(second))
    started = [
        e.message.parent_msg_id
        for e in events
        if isinstance(e, JupyterEvent) and e.message.msg_type == "execute_input"
    ]
    assert started == [second]


async def test_an_embedded_session_with_a_subscriber_gets_resource_usage() -> None:
    """Whether a client is attached is a fact of the event log, not of the HTTP layer."""
    config = SupervisorConfig(resource_sample_interval_ms=100)
    async with open_supervisor(config) as sup:
        session = await sup.create_session(ipykernel_spec())
        await session.start()
        assert not session.connected
        with session.events.subscribe() as sub:
            assert session.connected
            [usage] = [
                e
                for e in await collect_until(sub, lambda e: isinstance(e, ResourceUsageEvent))
                if isinstance(e, ResourceUsageEvent)
            ]
        assert not session.connected
    assert usage.usage.memory_bytes > 0
    assert session.resource_usage is not None


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
async def test_kernels_listen_where_the_transport_says_and_leave_no_socket_file(
    short_dir: Path, transport: KernelTransport
) -> None:
    """ipc (the default): Unix sockets in a 0700 directory of the run, gone once the kernel is,
    even one killed before it could remove them; tcp: loopback ports."""
    config = attrs.evolve(
        supervisor_config(short_dir),
        session=SessionConfig(kernel_transport=transport, shutdown_grace=5.0),
    )
    async with open_supervisor(config) as sup:
        session = await sup.create_session(ipykernel_spec())
        await session.start()
        info = session.connection_info
        assert info is not None
        assert info.transport == transport
        if transport == "ipc":
            directory = Path(info.ip).parent
            assert directory.parent == short_dir
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            shell = Path(info.address(Channel.SHELL).removeprefix("ipc://"))
            assert stat.S_ISSOCK(shell.stat().st_mode)
        else:
            assert info.ip == "127.0.0.1"
            assert info.address(Channel.SHELL).startswith("tcp://")
        msg_id, events = await execute_and_collect(session, "print(6 * 7)")
        assert stdout_text(replies_to(events, msg_id)) == "42\n"
        with session.events.subscribe() as sub:
            await session.kill()
            await collect_until(sub, lambda e: isinstance(e, ExitedEvent))
        assert list(short_dir.iterdir()) == []
