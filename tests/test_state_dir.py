"""`--state-dir`: a daemon killed outright comes back with its sessions, kernels and token."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from pathlib import Path

import psutil
import pytest
import trio
import trio_websocket

from kallichore.client import (
    ChannelEvent,
    Channels,
    KernelMessage,
    StatusChanged,
    execute_request,
)
from kallichore.jupyter.connection import ConnectionInfo
from kallichore.session.model import Status
from kallichore.session.record import ProcessIdentity, SessionRecord
from kallichore.session.state import READOPTED
from kallichore.state_dir import StateDir, StateDirError
from kallichore.supervisor import SupervisorConfig, open_supervisor
from tests.conftest import TIMEOUT, Daemon, daemon, ipykernel_spec, started_session


async def kill_daemon(d: Daemon) -> None:
    d.process.send_signal(signal.SIGKILL)
    assert await d.wait() == -signal.SIGKILL


async def read_to_the_end(channels: Channels) -> None:
    while True:
        await channels.receive()


def is_status(event: ChannelEvent, msg_id: str, state: str) -> bool:
    return (
        isinstance(event, KernelMessage)
        and event.msg_type == "status"
        and event.parent_msg_id == msg_id
        and event.content["execution_state"] == state
    )


async def wait_until_gone(pid: int) -> None:
    with trio.fail_after(TIMEOUT):
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            await trio.sleep(0.05)


async def test_a_killed_daemon_comes_back_with_its_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    # The daemon's own parent asks kernels to die with it: detached kernels must not inherit it.
    monkeypatch.setenv("JPY_PARENT_PID", str(os.getpid()))
    args = ("--transport", "tcp", "--state-dir", str(state))
    pids: dict[str, int] = {}
    try:
        await kill_and_come_back(tmp_path, args, pids)
    finally:
        # Kernels under a state dir outlive their daemon: a failed test must not leave them.
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


async def kill_and_come_back(tmp_path: Path, args: tuple[str, ...], pids: dict[str, int]) -> None:
    state = tmp_path / "state"
    async with daemon(tmp_path, *args) as first:
        client = first.client()
        await started_session(client, "python-1", interrupt_mode="signal")
        await started_session(client, "python-2")
        sessions = {s["session_id"]: s for s in await client.list_sessions()}
        pids.update({name: s["process_id"] for name, s in sessions.items()})
        # (Beside them, the directories of the kernels' ipc sockets.)
        runtime = (state / "runtime").iterdir()
        connection_files = {p.name for p in runtime if p.is_file()}
        assert connection_files == {"kernel-python-1.json", "kernel-python-2.json"}
        async with client.channels("python-1", resume=True) as channels:
            assert (await channels.execute("x = 41")).status == "ok"
            await kill_daemon(first)
            with pytest.raises(trio_websocket.ConnectionClosed):
                await read_to_the_end(channels)
            resume_point = channels.resume_point
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for record in (state / "sessions").iterdir():
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
    # Both kernels outlived their daemon; one is killed while no daemon runs.
    assert all(psutil.pid_exists(pid) for pid in pids.values())
    os.kill(pids["python-2"], signal.SIGKILL)
    await wait_until_gone(pids["python-2"])

    port = first.connection["port"]
    async with client, daemon(tmp_path, *args, "--port", str(port)) as second:
        assert second.connection["bearer_token"] == first.token
        # The client of the first daemon carries on, as after a network drop.
        sessions = {s["session_id"]: s for s in await client.list_sessions()}
        assert sessions["python-1"]["status"] == "idle"
        assert sessions["python-1"]["process_id"] == pids["python-1"]
        assert sessions["python-2"]["status"] == "exited"
        # A resuming client continues from its point in the session's previous life.
        async with client.channels("python-1", resume=resume_point) as channels:
            marker = await channels.receive_until(lambda e: isinstance(e, StatusChanged))
            assert marker[-1] == StatusChanged("idle", READOPTED)
            result = await channels.execute("print(x + 1)")
            assert result.stdout == "42\n"
            # Interrupts by signal reach the re-adopted kernel's process group.
            msg_id = await channels.send(execute_request("import time; time.sleep(600)"))
            await channels.receive_until(lambda e: is_status(e, msg_id, "busy"))
            await client.interrupt("python-1")
            [*_, reply] = await channels.receive_until(
                lambda e: (
                    isinstance(e, KernelMessage)
                    and e.msg_type == "execute_reply"
                    and e.parent_msg_id == msg_id
                )
            )
            assert isinstance(reply, KernelMessage)
            assert reply.content["ename"] == "KeyboardInterrupt"
        # A re-adopted kernel is killed by its pid, and its exit is seen.
        await client.kill("python-1")
        assert (await client.get_session("python-1"))["status"] == "exited"
        await wait_until_gone(pids["python-1"])
        await client.delete_session("python-2")
        assert not (state / "sessions" / "python-2.json").exists()
        assert (state / "sessions" / "python-1.json").exists()


def recorded_session(
    tmp_path: Path, process: ProcessIdentity | None, status: Status = Status.IDLE
) -> Path:
    """A state directory holding the record of one session, python-1, at unused ports."""
    path = tmp_path / "state"
    state_dir = StateDir.open(path)
    state_dir.save(
        SessionRecord(
            spec=ipykernel_spec("python-1"),
            key="k",
            created=time.time(),
            status=status,
            working_directory=str(tmp_path),
            connection=ConnectionInfo.on_ports([1, 2, 3, 4, 5], "k"),
            process=process,
        )
    )
    state_dir.close()
    return path


async def test_a_pid_that_started_later_is_not_our_kernel(tmp_path: Path) -> None:
    """A record whose pid now belongs to another process: that process is left alone."""
    stranger = await trio.lowlevel.open_process(["sleep", "600"])
    try:
        started = psutil.Process(stranger.pid).create_time()
        path = recorded_session(tmp_path, ProcessIdentity(stranger.pid, started - 10))
        async with open_supervisor(SupervisorConfig(state_dir=path)) as supervisor:
            session = supervisor.get("python-1")
            assert session.status == "exited"
            assert session.process_id is None
        assert stranger.returncode is None
    finally:
        stranger.kill()
        await stranger.wait()


@pytest.mark.parametrize(
    ("recorded", "restored"),
    [
        (Status.UNINITIALIZED, Status.UNINITIALIZED),
        (Status.EXITED, Status.EXITED),
        # Adopted from somebody else: no process to verify, so not re-adopted.
        (Status.IDLE, Status.EXITED),
    ],
)
async def test_sessions_without_a_kernel_process(
    tmp_path: Path, recorded: Status, restored: Status
) -> None:
    path = recorded_session(tmp_path, None, recorded)
    async with open_supervisor(SupervisorConfig(state_dir=path)) as supervisor:
        assert supervisor.get("python-1").status is restored


async def test_one_daemon_per_state_dir(tmp_path: Path) -> None:
    async with open_supervisor(SupervisorConfig(state_dir=tmp_path)):
        with pytest.raises(StateDirError, match="in use by another kallichore"):
            StateDir.open(tmp_path)
    StateDir.open(tmp_path).close()
