"""Resource sampling against small real process trees (no kernels).

Every process here runs `NODE`: it allocates and burns what its spec asks, starts its children,
reports their pids, and on end-of-input stops its children (waiting for them) before exiting,
so closing a root's stdin takes its whole tree down, including descendants in other sessions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from kallichore.session import resources
from kallichore.session.resources import (
    MAX_SAMPLE_INTERVAL_MS,
    TREE_REFRESH_SAMPLES,
    ResourceSampler,
    ResourceUsage,
    SampleInterval,
)

MB = 1 << 20

NODE = """
import json, subprocess, sys, threading, time

spec = json.loads(sys.argv[1])
ballast = b"\\x01" * (spec.get("alloc_mb", 0) << 20)  # written, so resident
stop = threading.Event()
for _ in range(spec.get("threads", 0)):
    threading.Thread(target=stop.wait, daemon=True).start()


def burn():
    while not stop.is_set():
        pass


if spec.get("burn"):
    threading.Thread(target=burn, daemon=True).start()
while time.process_time() < spec.get("cpu_seconds_before_ready", 0):
    pass
children = []


def spawn(child_spec):
    child = subprocess.Popen(
        [sys.executable, __file__, json.dumps(child_spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=child_spec.get("setsid", False),
    )
    children.append(child)
    return [child.pid, *json.loads(child.stdout.readline())["descendants"]]


def report(specs):
    print(json.dumps({"descendants": [pid for s in specs for pid in spawn(s)]}), flush=True)


report(spec.get("children", []))
for _ in sys.stdin:
    report(spec.get("on_demand", []))
stop.set()
for child in children:
    child.stdin.close()
for child in children:
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
"""


class Node:
    """A root process running NODE in a session (and process group) of its own."""

    def __init__(self, script: Path, spec: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(script), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.descendants: list[int] = self._read_report()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_report(self) -> list[int]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the node exited before reporting"
        pids: list[int] = json.loads(line)["descendants"]
        return pids

    def spawn_on_demand(self) -> list[int]:
        assert self.process.stdin is not None
        self.process.stdin.write("spawn\n")
        self.process.stdin.flush()
        pids = self._read_report()
        self.descendants += pids
        return pids

    def stop(self) -> None:
        """End the tree: politely (end of input), then by killing the root's group."""
        assert self.process.stdin is not None
        self.process.stdin.close()  # nothing is left buffered to fail on
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()


Spawn = Callable[..., Node]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start NODE trees; stop them all afterwards and check that nothing was left behind."""
    script = tmp_path / "node.py"
    script.write_text(NODE)
    me = psutil.Process()
    children_before = set(me.children(recursive=True))
    nodes: list[Node] = []
    watched: list[psutil.Process] = []

    def start(**spec: Any) -> Node:
        node = Node(script, spec)
        nodes.append(node)
        watched.append(psutil.Process(node.pid))
        watched.extend(psutil.Process(pid) for pid in node.descendants)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()
    # Descendants spawned on demand after start() are covered by the children check unless
    # they left the session, which no test does after start().
    assert set(me.children(recursive=True)) <= children_before
    assert [p for p in watched if p.is_running()] == []


def test_memory_threads_and_the_usage_fields(spawn: Spawn) -> None:
    node = spawn(alloc_mb=60, threads=4)
    usage = ResourceSampler().sample(node.pid, 1234)
    assert usage is not None
    assert usage.memory_bytes >= 50 * MB
    assert usage.thread_count >= 5  # the main thread and the four started
    assert usage.cpu_percent == 0  # the first sample of a process
    assert usage.sampling_period_ms == 1234
    assert abs(usage.timestamp - time.time() * 1000) < 10_000
    assert list(usage.to_dict()) == [
        "cpu_percent",
        "memory_bytes",
        "thread_count",
        "sampling_period_ms",
        "timestamp",
    ]
    assert ResourceUsage(**usage.to_dict()) == usage


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def use_cpu(pid: int, seconds: float) -> None:
    """Wait until `pid` has used `seconds` more of CPU: "a while" that no load can shorten."""
    target = cpu_seconds(pid) + seconds
    deadline = time.monotonic() + 60
    while cpu_seconds(pid) < target:
        assert time.monotonic() < deadline, f"{pid} is not burning CPU"
        time.sleep(0.01)


def shows_the_cpu_it_used(usage: ResourceUsage | None, used: float, window: float) -> bool:
    """`usage` accounts for at least `used` CPU seconds in at most `window` seconds; at most
    one core (a burning thread), with margin for the kernel's CPU-time ticks."""
    assert usage is not None
    return used / window * 100 - 1 <= usage.cpu_percent <= 150


def test_a_busy_process_shows_cpu_and_an_idle_one_does_not(spawn: Spawn) -> None:
    busy = spawn(burn=True)
    idle = spawn()
    sampler = ResourceSampler()
    start = time.monotonic()
    for node in (busy, idle):
        first = sampler.sample(node.pid, 1000)
        assert first is not None
        assert first.cpu_percent == 0
    use_cpu(busy.pid, 0.3)
    busy_usage = sampler.sample(busy.pid, 1000)
    idle_usage = sampler.sample(idle.pid, 1000)
    assert shows_the_cpu_it_used(busy_usage, 0.3, time.monotonic() - start)
    assert idle_usage is not None
    assert idle_usage.cpu_percent < 50


def test_forget_starts_the_cpu_measurement_afresh(spawn: Spawn) -> None:
    node = spawn(burn=True)
    sampler = ResourceSampler()
    start = time.monotonic()
    sampler.sample(node.pid, 1000)
    use_cpu(node.pid, 0.3)
    usage = sampler.sample(node.pid, 1000)
    assert shows_the_cpu_it_used(usage, 0.3, time.monotonic() - start)
    sampler.forget(node.pid)
    use_cpu(node.pid, 0.1)
    usage = sampler.sample(node.pid, 1000)
    assert usage is not None
    assert usage.cpu_percent == 0


# Two descendants in the root's group (a child and a grandchild, 40 MB each) and one child in a
# session of its own (100 MB, with a 100 MB child of its own) that must not be counted.
TREE = {
    "children": [
        {"alloc_mb": 40, "children": [{"alloc_mb": 40}]},
        {"alloc_mb": 100, "setsid": True, "children": [{"alloc_mb": 100}]},
    ]
}


def proc_children_supported() -> bool:
    return resources._descendants is resources._descendants_from_proc


@pytest.mark.parametrize(
    "descendants",
    [
        pytest.param(
            resources._descendants_from_proc,
            id="proc",
            marks=pytest.mark.skipif(
                not proc_children_supported(), reason="no /proc/<pid>/task/<tid>/children"
            ),
        ),
        pytest.param(resources._descendants_from_psutil, id="psutil"),
    ],
)
def test_the_tree_is_the_descendants_in_the_root_group(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch, descendants: Callable[[int, int], list[int]]
) -> None:
    node = spawn(**TREE)
    child, grandchild, _outsider, _outsiders_child = node.descendants
    assert set(descendants(node.pid, node.pid)) == {child, grandchild}

    monkeypatch.setattr(resources, "_descendants", descendants)
    usage = ResourceSampler().sample(node.pid, 1000)
    assert usage is not None
    members = [psutil.Process(pid) for pid in (node.pid, child, grandchild)]
    expected_memory = sum(p.memory_info().rss for p in members)
    assert usage.memory_bytes >= 80 * MB
    assert abs(usage.memory_bytes - expected_memory) < 20 * MB  # far from the outsiders' 200 MB
    assert usage.thread_count == sum(p.num_threads() for p in members)


def test_a_new_busy_child_is_picked_up_within_a_few_samples(spawn: Spawn) -> None:
    node = spawn(on_demand=[{"burn": True, "alloc_mb": 60}])
    sampler = ResourceSampler()
    usage = sampler.sample(node.pid, 1000)
    assert usage is not None
    assert usage.memory_bytes < 50 * MB
    [child] = node.spawn_on_demand()
    # The tree is walked again within TREE_REFRESH_SAMPLES samples; the child's CPU counts from
    # the sample after the one that first saw it.
    history = []
    for _ in range(TREE_REFRESH_SAMPLES):
        use_cpu(child, 0.05)
        start = time.monotonic()
        usage = sampler.sample(node.pid, 1000)
        assert usage is not None
        history.append(usage)
    assert history[-1].memory_bytes >= 60 * MB
    use_cpu(child, 0.3)
    assert shows_the_cpu_it_used(sampler.sample(node.pid, 1000), 0.3, time.monotonic() - start)


def test_an_exited_root_samples_as_none(spawn: Spawn) -> None:
    sampler = ResourceSampler()
    node = spawn()
    assert sampler.sample(node.pid, 1000) is not None
    # Killed but not yet waited for: a zombie is no kernel any more.
    os.kill(node.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while psutil.Process(node.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sampler.sample(node.pid, 1000) is None
    node.process.wait()
    assert sampler.sample(node.pid, 1000) is None


def test_a_reused_root_pid_is_measured_as_a_new_process(spawn: Spawn) -> None:
    """Really reuse a pid, by steering the kernel's next pid (root only, Linux only)."""
    ns_last_pid = Path("/proc/sys/kernel/ns_last_pid")
    if not os.access(ns_last_pid, os.W_OK):
        pytest.skip("cannot steer pid allocation here")
    sampler = ResourceSampler()
    old = spawn()
    pid = old.pid
    sampler.sample(pid, 1000)
    time.sleep(0.2)
    assert sampler.sample(pid, 1000) is not None
    old.stop()
    # The new process has used far more CPU than the old one did; were it taken for the old
    # one, that difference would show as CPU use. Other processes may take the pid first.
    for _ in range(50):
        ns_last_pid.write_text(str(pid - 1))
        new = spawn(cpu_seconds_before_ready=0.5)
        if new.pid == pid:
            break
        new.stop()
    else:
        pytest.skip("the pid was always taken by another process")
    usage = sampler.sample(pid, 1000)
    assert usage is not None
    assert usage.cpu_percent == 0


@pytest.mark.parametrize("milliseconds", [-1, MAX_SAMPLE_INTERVAL_MS + 1, 10**312])
def test_an_interval_that_could_overflow_a_timer_is_refused(milliseconds: int) -> None:
    with pytest.raises(ValueError, match="sampling interval"):
        SampleInterval(milliseconds)
    interval = SampleInterval(1000)
    with pytest.raises(ValueError, match="sampling interval"):
        interval.milliseconds = milliseconds
    assert interval.milliseconds == 1000
