"""Sampling the CPU, memory and thread use of a kernel's process tree.

A kernel's tree is its own process plus the descendants still in its process group (kernels
lead a group of their own), so a server the kernel launched with `setsid` is not charged to it.

The sampler must stay cheap with many sessions on a machine with a huge process table: kcserver
burned a whole core scanning every process on each tick (posit-dev/positron#15706), and
`psutil.Process.children()` reads the stat file of every process on the machine. On Linux the
tree is found instead by walking `/proc/<pid>/task/<tid>/children` down from the kernel, which
costs only what the tree itself costs; that walk is cached and redone every few samples.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import attrs
import psutil
import trio

# How many samples reuse a cached tree before it is walked again. A process the kernel spawns
# is counted from the next walk on (its CPU from the sample after), so at the default 1 s
# interval a new busy subprocess shows up within about 4 s.
TREE_REFRESH_SAMPLES = 3
# The longest sampling interval: a day. Bounded so that no interval overflows a timer.
MAX_SAMPLE_INTERVAL_MS = 24 * 3600 * 1000


@attrs.frozen
class ResourceUsage:
    """One sample, as sent in `resourceUsage` events and `resource_usage` (CPU: 100 = a core)."""

    cpu_percent: int
    memory_bytes: int
    thread_count: int
    sampling_period_ms: int
    timestamp: int

    def to_dict(self) -> dict[str, int]:
        return {
            "cpu_percent": self.cpu_percent,
            "memory_bytes": self.memory_bytes,
            "thread_count": self.thread_count,
            "sampling_period_ms": self.sampling_period_ms,
            "timestamp": self.timestamp,
        }


def _descendants_from_proc(pid: int, pgid: int) -> list[int]:
    """Descendants of `pid` in group `pgid`, read from the children files of each thread.

    A child outside the group is not descended into: its own children are in its group (or a
    session of its own), and cannot rejoin the kernel's group without an explicit `setpgid`.
    """
    found: list[int] = []
    seen = {pid}
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:  # it has exited
            continue
        for tid in tids:
            try:
                children = Path(f"/proc/{parent}/task/{tid}/children").read_bytes().split()
            except OSError:  # the thread has exited
                continue
            for child in map(int, children):
                if child in seen:
                    continue
                seen.add(child)
                try:
                    in_group = os.getpgid(child) == pgid
                except OSError:
                    continue
                if in_group:
                    found.append(child)
                    stack.append(child)
    return found


def _descendants_from_psutil(pid: int, pgid: int) -> list[int]:
    """Descendants of `pid` in group `pgid`, where the kernel offers no children files.

    psutil reads the whole process table for this, which is why it is only the fallback.
    """
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found: list[int] = []
    for child in children:
        try:
            if os.getpgid(child.pid) == pgid:
                found.append(child.pid)
        except OSError:
            continue
    return found


_descendants = (
    _descendants_from_proc
    if Path(f"/proc/self/task/{os.getpid()}/children").exists()
    else _descendants_from_psutil
)


def _read(proc: psutil.Process) -> tuple[float, int, int] | None:
    """(user + system CPU seconds, RSS bytes, threads) of `proc`; None once it has exited."""
    try:
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            cpu = proc.cpu_times()
            return cpu.user + cpu.system, proc.memory_info().rss, proc.num_threads()
    except psutil.Error:  # it has exited, or is not ours to read
        return None


@attrs.define
class _Tree:
    """What the sampler remembers about one root between its samples."""

    root: psutil.Process
    pgid: int = 0
    members: list[int] = attrs.Factory(list)
    samples_until_refresh: int = 0
    # CPU seconds at the previous sample, keyed by psutil.Process, whose equality and hash are
    # (pid, creation time): a process that reuses a pid is a new key rather than a delta.
    cpu_seconds: dict[psutil.Process, float] = attrs.Factory(dict)
    last_sampled: float | None = None


class ResourceSampler:
    """Samples the resource use of kernel process trees; one instance serves all sessions."""

    def __init__(self) -> None:
        self._trees: dict[int, _Tree] = {}

    def sample(self, pid: int, sampling_period_ms: int) -> ResourceUsage | None:
        """Sum the use of `pid`'s tree; None if `pid` has exited (its state is then dropped).

        `cpu_percent` is the tree's CPU time since the previous sample of `pid` over the wall
        time between them; a process seen for the first time contributes 0.
        """
        now = time.monotonic()
        tree = self._tree(pid)
        reading = None if tree is None else _read(tree.root)
        if tree is None or reading is None:
            self.forget(pid)
            return None

        readings = {tree.root: reading}
        for member in tree.members:
            try:
                if os.getpgid(member) != tree.pgid:
                    continue  # it left the group since the walk, or the pid was reused outside
                proc = psutil.Process(member)
            except (OSError, psutil.Error):  # it has exited
                continue
            reading = _read(proc)
            if reading is not None:
                readings[proc] = reading

        cpu_used = 0.0
        for proc, (seconds, _, _) in readings.items():
            previous = tree.cpu_seconds.get(proc)
            if previous is not None:
                cpu_used += seconds - previous
        tree.cpu_seconds = {proc: seconds for proc, (seconds, _, _) in readings.items()}
        cpu_percent = 0
        if tree.last_sampled is not None:
            cpu_percent = round(cpu_used / (now - tree.last_sampled) * 100)
        tree.last_sampled = now
        return ResourceUsage(
            cpu_percent=cpu_percent,
            memory_bytes=sum(rss for _, rss, _ in readings.values()),
            thread_count=sum(threads for _, _, threads in readings.values()),
            sampling_period_ms=sampling_period_ms,
            timestamp=time.time_ns() // 1_000_000,
        )

    def _tree(self, pid: int) -> _Tree | None:
        """The remembered tree of `pid`, walked again if due; None if `pid` has exited."""
        try:
            root = psutil.Process(pid)
            tree = self._trees.get(pid)
            if tree is None or tree.root != root:  # new, or the pid now names another process
                tree = self._trees[pid] = _Tree(root)
            if tree.samples_until_refresh == 0:
                tree.pgid = os.getpgid(pid)
                tree.members = _descendants(pid, tree.pgid)
                tree.samples_until_refresh = TREE_REFRESH_SAMPLES
        except (psutil.NoSuchProcess, ProcessLookupError):
            return None
        tree.samples_until_refresh -= 1
        return tree

    def forget(self, pid: int) -> None:
        """Drop what is remembered about root `pid` (its session ended, or it exited)."""
        self._trees.pop(pid, None)


class SampleInterval:
    """How often sessions sample their kernel's resources, shared by a supervisor's sessions.

    Changing it wakes every sampler, so the next sample comes one new period from the change.
    0 means never.
    """

    def __init__(self, milliseconds: int) -> None:
        self._milliseconds = _checked(milliseconds)
        self._changed = trio.Event()

    @property
    def milliseconds(self) -> int:
        return self._milliseconds

    @milliseconds.setter
    def milliseconds(self, value: int) -> None:
        self._milliseconds = _checked(value)
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self) -> int:
        """Sleep one full period in which the interval did not change; returns the period."""
        while True:
            changed = self._changed
            period = self._milliseconds
            with trio.move_on_after(period / 1000 if period > 0 else math.inf):
                await changed.wait()
                continue
            return period


def _checked(milliseconds: int) -> int:
    if not 0 <= milliseconds <= MAX_SAMPLE_INTERVAL_MS:
        raise ValueError(
            f"a sampling interval is 0 (never) to {MAX_SAMPLE_INTERVAL_MS} ms, not {milliseconds}"
        )
    return milliseconds
