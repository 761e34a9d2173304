"""Nothing orphaned: kernels die with a SIGKILLed daemon, and the next daemon sweeps the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import psutil
import pytest
import trio

from kallichore.footprint import Footprint, KernelEntry, Record, sweep
from kallichore.jupyter.connection import write_json_file
from kallichore.session import process as kernel_process
from kallichore.session.model import SessionConfig
from kallichore.supervisor import Supervisor, SupervisorConfig, open_supervisor
from tests.conftest import TIMEOUT, daemon, ipykernel_spec, new_session_body

# ipykernel, but deaf to JPY_PARENT_PID, as a kernel that does not watch its parent would be.
DEAF_KERNEL_ARGV = [
    sys.executable,
    "-c",
    "import os; os.environ.pop('JPY_PARENT_PID', None); "
    "from ipykernel import kernelapp; kernelapp.launch_new_instance()",
    "-f",
    "{connection_file}",
]


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private record directory of our own, for the daemons this test starts."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    return tmp_path / "jupyter-runtime" / "kallichore"


def gone(pid: int) -> bool:
    """No process `pid` runs (a zombie waiting for init to reap it counts as gone)."""
    return kernel_process.start_time(pid) is None


async def wait_until_gone(pids: list[int]) -> float:
    """Seconds until every one of `pids` has exited (guarded against hangs)."""
    start = time.monotonic()
    with trio.fail_after(TIMEOUT):
        while not all(gone(pid) for pid in pids):
            await trio.sleep(0.05)
    return time.monotonic() - start


async def test_sigkill_of_the_daemon_leaves_nothing_behind(tmp_path: Path, records: Path) -> None:
    async with daemon(tmp_path, "--transport", "tcp") as first, first.client() as client:
        for session_id in ("python-a", "python-b"):
            await client.create_session(**new_session_body(session_id))
            await client.start(session_id)
        await client.create_session(**new_session_body("deaf", argv=DEAF_KERNEL_ARGV))
        await client.start("deaf")
        pids = {s["session_id"]: s["process_id"] for s in await client.list_sessions()}
        record_path = records / f"daemon-{first.process.pid}.json"
        record = Record.from_dict(json.loads(record_path.read_bytes()))
        assert sorted(k.pid for k in record.kernels) == sorted(pids.values())
        left_paths = record.paths + [p for k in record.kernels for p in k.paths]
        assert str(tmp_path / "connection-0.json") in left_paths
        for pid in pids.values():  # JPY_PARENT_PID names the kernel's parent: the daemon
            assert psutil.Process(pid).ppid() == first.process.pid
        first.process.send_signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL

    seconds = await wait_until_gone([pids["python-a"], pids["python-b"]])
    print(f"ipykernel exited {seconds:.2f} s after its daemon was killed")
    assert not gone(pids["deaf"])
    assert all(Path(p).exists() for p in left_paths)  # the token, the keys, the directories

    async with daemon(tmp_path, "--transport", "tcp") as second:
        await wait_until_gone([pids["deaf"]])
        assert not any(Path(p).exists() for p in left_paths)
        assert not record_path.exists()
        assert (records / f"daemon-{second.process.pid}.json").exists()
        assert (
            f"swept what dead daemon {first.process.pid} left: killed kernel {pids['deaf']}"
            in second.log.read_text()
        )
    assert not (records / f"daemon-{second.process.pid}.json").exists()


@pytest.mark.parametrize("outlive", [False, True])
async def test_kernels_tied_to_the_daemon_or_detached(tmp_path: Path, outlive: bool) -> None:
    footprint = Footprint.open(tmp_path / "records")
    config = SupervisorConfig(
        runtime_dir=tmp_path / "runtime",
        session=SessionConfig(tied_to_daemon=not outlive),
        footprint=footprint,
    )
    async with open_supervisor(config) as supervisor:
        pid = await start_kernel(supervisor)
        assert kernel_process.start_time(pid) is not None
        env = (supervisor.get("python-test")).initial_env
        assert env.get("JPY_PARENT_PID") == (None if outlive else str(os.getpid()))
        record = json.loads((tmp_path / "records" / f"daemon-{os.getpid()}.json").read_bytes())
        assert [(k["pid"], k["detached"]) for k in record["kernels"]] == [(pid, outlive)]
    record = json.loads((tmp_path / "records" / f"daemon-{os.getpid()}.json").read_bytes())
    assert record["kernels"] == []
    footprint.close()


async def start_kernel(supervisor: Supervisor) -> int:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    assert session.process_id is not None
    return session.process_id


# -- the sweep, on records written by hand -------------------------------------------------------


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Four long sleeps standing in for kernels, each leading its process group."""
    processes = [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(4)]
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def entry(process: subprocess.Popen[bytes], *paths: Path, detached: bool = False) -> KernelEntry:
    started = kernel_process.start_time(process.pid)
    assert started is not None
    return KernelEntry(process.pid, started, detached, [str(p) for p in paths])


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write(path: Path, record: Record) -> None:
    write_json_file(path, record.to_dict())


def test_the_sweep_spares_live_daemons_recycled_pids_and_detached_kernels(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    live, recycled, detached, orphan = sleepers
    files = {name: tmp_path / name for name in ("live", "orphan", "connection")}
    for path in files.values():
        path.write_text("{}")
    runtime_dir = tmp_path / "runtime"
    (runtime_dir / "inner").mkdir(parents=True)
    detached_dir = tmp_path / "detached-runtime"
    detached_dir.mkdir()
    files["detached"] = detached_dir / "kernel.json"
    files["detached"].write_text("{}")
    records = tmp_path / "records"
    records.mkdir(mode=0o700)
    me = kernel_process.start_time(os.getpid())
    assert me is not None
    alive_record = Record(os.getpid(), me, [str(files["live"])], [entry(live)])
    write(records / "daemon-1.json", alive_record)
    dead_daemon = dead_pid()
    dead_record = Record(
        dead_daemon,
        me,
        [str(files["connection"]), str(runtime_dir), str(detached_dir)],
        [
            # The same pid, another start: somebody else's process now.
            attrs.evolve(entry(recycled), started=me - 10),
            entry(detached, files["detached"], detached=True),
            entry(orphan, files["orphan"]),
        ],
    )
    write(records / "daemon-2.json", dead_record)

    sweep(records)

    assert orphan.wait(timeout=TIMEOUT) == -signal.SIGKILL
    assert not files["orphan"].exists()
    assert not files["connection"].exists()
    assert not runtime_dir.exists()
    assert recycled.poll() is None
    assert detached.poll() is None
    assert files["detached"].exists()
    kept = Record.from_dict(json.loads((records / "daemon-2.json").read_bytes()))
    # The directory holding the detached kernel's file stays while the kernel runs.
    assert (kept.paths, [k.pid for k in kept.kernels]) == ([str(detached_dir)], [detached.pid])
    # The live daemon's record, kernel and files are untouched.
    assert Record.from_dict(json.loads((records / "daemon-1.json").read_bytes())) == alive_record
    assert live.poll() is None
    assert files["live"].exists()

    # Once the detached kernel is gone, its files go at the next sweep, and so does the record.
    detached.kill()
    detached.wait()
    sweep(records)
    assert not detached_dir.exists()
    assert not (records / "daemon-2.json").exists()
    assert (records / "daemon-1.json").exists()


def test_a_directory_others_can_write_to_is_not_trusted(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    records.chmod(0o777)
    victim = tmp_path / "victim"
    victim.write_text("")
    write(records / "daemon-1.json", Record(dead_pid(), 1.0, [str(victim)]))
    footprint = Footprint.open(records)
    footprint.add_path(tmp_path)
    assert victim.exists()
    assert sorted(p.name for p in records.iterdir()) == ["daemon-1.json"]
