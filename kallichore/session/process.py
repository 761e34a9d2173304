"""The kernel as an operating-system process: launching it, reading its output, signalling it.

Kernels run in a session (and process group) of their own, as jupyter_client runs them: a
Ctrl-C in the supervisor's terminal does not reach them, and the whole tree a kernel spawned
can be signalled at once through the group.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import psutil
import trio

from kallichore.session.record import ProcessIdentity

logger = logging.getLogger(__name__)

# A line longer than this is passed on in pieces rather than buffered without bound.
MAX_LINE_BYTES = 64 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Readings of one process's start time agree to well within this (they are rounded floats).
START_TIME_SLACK = 0.001

# How often `wait_gone` checks a process where there is no pidfd to wait on.
POLL_SECONDS = 0.5

LineHandler = Callable[[Literal["stdout", "stderr"], str], None]


async def launch(argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> trio.Process:
    """Start the kernel with piped stdout/stderr, no stdin, in its own process group.

    No PR_SET_PDEATHSIG for a second tie to our life: it fires when the *thread* that forked
    the child exits, and trio forks in a cached worker thread that exits after 10 idle seconds
    (tried: the kernel was killed 10.1 s after its start). `watch_parent` and the next
    daemon's sweep (`kallichore.footprint`) cover a kernel that outlives us.
    """
    return await trio.lowlevel.open_process(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def watch_parent(env: dict[str, str], *, outlive: bool) -> None:
    """Tell a kernel in `env` whether to exit when its parent, this process, dies.

    ipykernel polls its parent once a second and exits when the pid `JPY_PARENT_PID` names is
    no longer its parent. We are the kernel's parent (a startup shell `exec`s the kernel), so a
    kernel that honours it goes within about a second of a SIGKILLed daemon. A kernel meant to
    outlive us gets no JPY_PARENT_PID at all: one inherited from our own environment would make
    ipykernel exit as soon as it is handed to init.
    """
    if outlive:
        env.pop("JPY_PARENT_PID", None)
    else:
        env["JPY_PARENT_PID"] = str(os.getpid())


def start_time(pid: int) -> float | None:
    """When process `pid` started, a number no later process with this pid can share; None
    if there is no such process (or only its zombie).

    On Linux, the start in seconds after boot from /proc, exact and immune to clock changes
    (psutil's epoch time moves with the wall clock, which could make a live daemon look dead);
    elsewhere psutil's create_time, fixed when the process starts.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except OSError:
        return None
    else:
        # Fields after the command name, which may itself hold spaces and parentheses.
        fields = stat.rpartition(b")")[2].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19]) / CLOCK_TICKS
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        started: float = process.create_time()
    except psutil.Error:
        return None
    return started


def is_process(pid: int, started: float) -> bool:
    """Whether `pid` is still the process that started at `started` (see `start_time`)."""
    now = start_time(pid)
    return now is not None and abs(now - started) < START_TIME_SLACK


def signal_group(pid: int, signum: int) -> bool:
    """Send `signum` to the process group led by `pid`; False if no such group exists."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        logger.warning("not allowed to signal process group %d", pid)
        return False
    return True


def kill_group(pid: int) -> bool:
    return signal_group(pid, signal.SIGKILL)


def describe_exit(returncode: int) -> str:
    """How a process ended, as a person reads it: `exited with code 3`, `was killed by SIGKILL`."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"


def identify(pid: int) -> ProcessIdentity | None:
    """The identity of running process `pid` (None if it is gone)."""
    started = start_time(pid)
    return None if started is None else ProcessIdentity(pid, started)


def is_running(identity: ProcessIdentity) -> bool:
    """The process is still the one we started: same pid, same start time, not a zombie."""
    return is_process(identity.pid, identity.started)


async def wait_gone(identity: ProcessIdentity) -> None:
    """Return once a process that is not our child has ended (it cannot be waited for).

    A pidfd (Linux) becomes readable when the process exits; elsewhere, poll.
    """
    try:
        pidfd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while is_running(identity):  # noqa: ASYNC110 (nothing to wait on but time)
            await trio.sleep(POLL_SECONDS)
        return
    try:
        # Checked after opening: the pid may have been recycled before the pidfd pinned it.
        if is_running(identity):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def current_directory(pid: int) -> str | None:
    """The working directory of process `pid`; None if it cannot be read.

    Read after every execution: the /proc link is much cheaper than psutil, which remains for
    systems without /proc.
    """
    try:
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


async def read_lines(
    stream: trio.abc.ReceiveStream,
    name: Literal["stdout", "stderr"],
    on_line: LineHandler,
) -> None:
    """Call `on_line` for each line (newline included) until end of file."""
    pending = bytearray()
    async for chunk in stream:
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) != -1:
            on_line(name, pending[start : end + 1].decode(errors="replace"))
            start = end + 1
        del pending[:start]
        while len(pending) >= MAX_LINE_BYTES:
            on_line(name, pending[:MAX_LINE_BYTES].decode(errors="replace"))
            del pending[:MAX_LINE_BYTES]
    if pending:
        on_line(name, pending.decode(errors="replace"))
