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
from typing import Literal

import psutil
import trio

from kallichore.session.record import ProcessIdentity

logger = logging.getLogger(__name__)

# A line longer than this is passed on in pieces rather than buffered without bound.
MAX_LINE_BYTES = 64 * 1024

# How often `wait_gone` checks a process where there is no pidfd to wait on.
POLL_SECONDS = 0.5

LineHandler = Callable[[Literal["stdout", "stderr"], str], None]


async def launch(
    argv: Sequence[str], env: Mapping[str, str], cwd: str | None, *, tied_to_daemon: bool
) -> trio.Process:
    """Start the kernel with piped stdout/stderr, no stdin, in its own process group.

    A kernel `tied_to_daemon` is meant to end with the daemon. One that is not (the daemon keeps
    a state directory, and a restarted daemon re-adopts it) must not inherit a
    `JPY_PARENT_PID` from the daemon's own environment: ipykernel would exit when the daemon
    does.
    """
    env = dict(env)
    if not tied_to_daemon:
        env.pop("JPY_PARENT_PID", None)
    return await trio.lowlevel.open_process(
        list(argv),
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


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


def identify(pid: int) -> ProcessIdentity | None:
    """The identity of running process `pid` (None if it is gone)."""
    try:
        return ProcessIdentity(pid, psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def is_running(identity: ProcessIdentity) -> bool:
    """The process is still the one we started: same pid, same start time, not a zombie."""
    try:
        process = psutil.Process(identity.pid)
        started: float = process.create_time()
        status: str = process.status()
        return started == identity.started and status != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
