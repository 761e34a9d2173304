"""A kernel on another machine, run by our shim through a local command (`ssh`, `srun`).

The local command is our child; on the far side it runs `remote_shim`, which starts the
kernel, registers its ports with us (JEP 66, with its own address) and relays its output and
exit. We hold the command's stdin: the launch order goes down it first (secrets never on a
command line), then signals and kills. What differs between the engines (the command, how a
signal travels, what a queue looks like, why a job ended) is a `RemotePlan`.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import trio

from kallichore.session import process as kernel_process
from kallichore.session.launch.remote_shim import EVENT_PREFIX, SOURCE

logger = logging.getLogger(__name__)

# How long a kernel asked to stop may take to report its exit before its command is killed.
STOP_SECONDS = 10.0
# An ssh client's exit status when the connection failed (the remote command's otherwise).
CONNECTION_FAILED = 255
# A POSIX shell's exit status when it cannot find the command (here: the shim's Python).
COMMAND_NOT_FOUND = 127
RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 5.0
# How long a registration request may wait for the shim's word that it is its own.
VOUCH_SECONDS = 30.0
# Commands waiting for the shim while the connection to it is being made again.
COMMAND_QUEUE = 16
# Beside each local command: SIGTERM to its process group once our end of the watchdog's stdin
# is closed, which only the daemon's death does (we kill the watchdog when the command ends).
# A running shim notices a dead daemon itself (its stdin ends), but srun waiting for a queued
# job reads nothing and would wait with it; srun cancels the job on SIGTERM.
WATCHDOG = ["sh", "-c", 'read -r _; kill -TERM -"$1"', "watchdog"]

LineHandler = Callable[[Literal["stdout", "stderr"], str], None]


def shim_python(configured: str | None, argv: Sequence[str]) -> str:
    """The interpreter that runs the shim: the configured one, else the kernel's own when its
    argv starts with a Python (it has pyzmq), else `python3`."""
    if configured:
        return configured
    if argv and Path(argv[0]).name.startswith("python"):
        return argv[0]
    return "python3"


def shim_command(python: str, *args: str) -> list[str]:
    """The shim run by `python`, as argv (its source inline: nothing to install there)."""
    return [python, "-c", SOURCE, *args]


def shell_command(argv: Sequence[str]) -> str:
    """`argv` as one POSIX shell command line (what ssh hands the remote shell)."""
    return "exec " + " ".join(shlex.quote(arg) for arg in argv)


class RemotePlan(Protocol):
    """What one engine does its own way."""

    @property
    def name(self) -> str: ...

    @property
    def own_session(self) -> bool:
        """The kernel in a process group of its own, signalled by the shim (ssh), or in the
        shim's group, so that the engine's signal to the job reaches it once (slurm)."""

    @property
    def reconnect_seconds(self) -> float:
        """How long the shim keeps the kernel through a dropped connection (0: not at all)."""

    def command(self, python: str) -> list[str]:
        """The local command that runs the shim (the order follows on its stdin)."""

    def attach_command(self, python: str, path: str) -> list[str] | None:
        """The local command that reattaches to a shim after the connection to it dropped
        (None: the engine cannot)."""

    def details(self) -> dict[str, Any]:
        """Where the kernel runs, for the session's details (job id, host)."""

    def waiting(self, line: str) -> str | None:
        """The reason the kernel is not started yet, if the command's `line` says it is waiting
        (a job in the queue); None for other lines."""

    def announced(self, info: Mapping[str, Any]) -> None:
        """The shim told us where the kernel runs (its `kallichore` registration block)."""

    async def deliver(self, kernel: RemoteKernel, signum: int) -> None:
        """Deliver `signum` to the kernel (SIGKILL: end it)."""

    async def exit_reason(self, returncode: int) -> str:
        """Why the kernel's run ended, as a person reads it."""

    async def start_failure(self, returncode: int, python: str) -> str:
        """Why the command ended before the shim started the kernel, and what to check."""


class RemoteKernel:
    """The local command that runs the shim, and what the shim reported."""

    def __init__(
        self,
        plan: RemotePlan,
        python: str,
        order: Mapping[str, Any],
        on_line: LineHandler,
        on_waiting: Callable[[str], None],
    ) -> None:
        self.plan = plan
        self._python = python
        self._order = order
        self._on_line = on_line
        self._on_waiting = on_waiting
        self.process: trio.Process | None = None
        # The kernel's pid on its host, and the shim's socket to reattach to.
        self.remote_pid: int | None = None
        self._attach_path: str | None = None
        self.exit_code: int | None = None
        self.reason: str | None = None
        self.ended = trio.Event()
        # Whether the shim took the latest attach ("attached"): its end is then a new drop.
        self._attached = False
        # The registration requests the shim vouched for, by digest; set at each new one.
        self._vouched_for: set[str] = set()
        self._vouching = trio.Event()
        self._send_commands, self._commands = trio.open_memory_channel[int](COMMAND_QUEUE)
        self._watchdogs: dict[trio.Process, trio.Process] = {}

    @property
    def pid(self) -> int | None:
        """The local command's pid (ssh or srun), which the daemon's footprint records."""
        return None if self.process is None else self.process.pid

    def details(self) -> dict[str, Any]:
        details = {"launcher": self.plan.name, **self.plan.details()}
        if self.remote_pid is not None:
            details["pid"] = self.remote_pid
        return details

    def announced(self, info: Mapping[str, Any]) -> None:
        self.plan.announced(info)
        pid = info.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool):
            self.remote_pid = pid
        attach = info.get("attach")
        if isinstance(attach, str):
            self._attach_path = attach

    async def start(self) -> None:
        """Run the command and hand it the launch order."""
        self.process = await self._spawn(self.plan.command(self._python))
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(self._order).encode() + b"\n")

    async def _spawn(self, argv: list[str]) -> trio.Process:
        # A session of its own: a Ctrl-C in the daemon's terminal is not an interrupt.
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        # Shielded: the command is not ours to end until it is returned.
        with trio.CancelScope(shield=True):
            self._watchdogs[process] = await trio.lowlevel.open_process(
                [*WATCHDOG, str(process.pid)], stdin=subprocess.PIPE, start_new_session=True
            )
        return process

    async def _unwatch(self, process: trio.Process) -> None:
        """End the watchdog of `process`, which has ended."""
        watchdog = self._watchdogs.pop(process, None)
        if watchdog is not None:
            watchdog.kill()
            with trio.CancelScope(shield=True):
                await watchdog.wait()
                if watchdog.stdin is not None:
                    await watchdog.stdin.aclose()

    def signal(self, signum: int) -> bool:
        """Queue `signum` for the kernel; False once it has ended."""
        if self.ended.is_set():
            return False
        try:
            self._send_commands.send_nowait(signum)
        except trio.WouldBlock:
            logger.warning("%s kernel: too many signals waiting; dropped one", self.plan.name)
        return True

    async def vouched(self, digest: str) -> bool:
        """Whether the shim vouches for the registration request of `digest`, waiting a while
        for its word (the request may overtake the launcher's output)."""
        with trio.move_on_after(VOUCH_SECONDS):
            while digest not in self._vouched_for:
                await self._vouching.wait()
        return digest in self._vouched_for

    async def write_line(self, line: str) -> bool:
        """Write a command line to the shim; False if its connection is down."""
        process = self.process
        if process is None or process.stdin is None or process.returncode is not None:
            return False
        try:
            await process.stdin.send_all(line.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def run(self) -> None:
        """Relay output and commands until the kernel has ended (reattaching where the engine
        can, when the connection to the shim drops)."""
        assert self.process is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver_commands)
            returncode = await self._follow(self.process)
            if self.exit_code is None:
                returncode = await self._reattach(returncode)
            nursery.cancel_scope.cancel()
        if self.exit_code is None:
            self.exit_code = returncode
        if self.reason is None:
            self.reason = await self._explain(self.exit_code)
        self.ended.set()

    async def _explain(self, returncode: int) -> str:
        """Why the run ended: the kernel's end, or else what kept the shim from starting it."""
        if self.remote_pid is None:
            return await self.plan.start_failure(returncode, self._python)
        return await self.plan.exit_reason(returncode)

    async def _follow(self, process: trio.Process) -> int:
        """Read one command's output until it exits; its exit status."""
        async with trio.open_nursery() as readers:
            assert process.stdout is not None
            assert process.stderr is not None
            readers.start_soon(kernel_process.read_lines, process.stdout, "stdout", self._line)
            readers.start_soon(kernel_process.read_lines, process.stderr, "stderr", self._line)
            returncode = await process.wait()
            await self._unwatch(process)
            readers.cancel_scope.deadline = trio.current_time() + 1.0
        return returncode

    def _line(self, stream: Literal["stdout", "stderr"], text: str) -> None:
        if text.startswith(EVENT_PREFIX):
            self._event(text[len(EVENT_PREFIX) :])
            return
        if stream == "stderr" and (reason := self.plan.waiting(text)) is not None:
            self._on_waiting(reason)
            return
        self._on_line(stream, text)

    def _event(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            logger.warning("%s kernel: unreadable event from the shim", self.plan.name)
            return
        if not isinstance(event, dict):
            return
        if event.get("event") == "started":
            self.announced(event)
        elif event.get("event") == "registering" and isinstance(event.get("digest"), str):
            self._vouched_for.add(event["digest"])
            self._vouching.set()
            self._vouching = trio.Event()
        elif event.get("event") == "attached":
            self._attached = True
            logger.info("%s kernel: reconnected", self.plan.name)
        elif event.get("event") == "exited" and isinstance(event.get("returncode"), int):
            self.exit_code = event["returncode"]

    async def _reattach(self, returncode: int) -> int:
        """Connect to the shim again while its reconnect window is open, and relay until the
        kernel ends; the last command's exit status.

        A window opens whenever a command ends without the kernel's exit (the connection
        dropped, or somebody killed our ssh client), the first one's or that of an attach the
        shim took ("attached"). An attach that ends with ssh's 255 did not connect: try again.
        Any other end without the kernel's means the shim is gone.
        """
        path = self._attach_path
        command = None if path is None else self.plan.attach_command(self._python, path)
        if command is None:
            return returncode
        logger.warning("%s kernel: the connection dropped; reconnecting", self.plan.name)
        closes = trio.current_time() + self.plan.reconnect_seconds
        delay = RECONNECT_FIRST_DELAY
        while self.exit_code is None and trio.current_time() < closes:
            with trio.move_on_at(closes) as window:
                self._attached = False
                attach = self.process = await self._spawn(command)
            if window.cancelled_caught:
                break
            returncode = await self._follow(attach)
            if self.exit_code is not None or returncode != CONNECTION_FAILED:
                break
            if self._attached:
                logger.warning("%s kernel: the connection dropped again", self.plan.name)
                closes = trio.current_time() + self.plan.reconnect_seconds
                delay = RECONNECT_FIRST_DELAY
            else:
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
        return returncode

    async def _deliver_commands(self) -> None:
        async for signum in self._commands:
            await self.plan.deliver(self, signum)

    async def stop(self) -> None:
        """Make sure the kernel has ended: kill it, and its local command if that does not
        end with it. Called shielded once the run is over, however it ended."""
        process = self.process
        if not self.ended.is_set() and process is not None and process.returncode is None:
            with trio.move_on_after(STOP_SECONDS):
                await self.plan.deliver(self, signal.SIGKILL)
                await self._follow(process)
        if process is not None and process.returncode is None:
            kernel_process.kill_group(process.pid)
            process.kill()
            await process.wait()
        if process is not None:
            await self._unwatch(process)
        if self.exit_code is None:
            ended = None if process is None else process.returncode
            self.exit_code = -signal.SIGKILL if ended is None else ended
        if self.reason is None:
            self.reason = await self._explain(self.exit_code)
        self.ended.set()
