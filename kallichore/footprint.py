"""What a daemon leaves on the machine, recorded so that the next daemon can sweep it away.

A daemon that is SIGKILLed cleans nothing up: its connection file (with the bearer token), the
kernels' connection files (with their keys), its runtime and socket directories stay, and so
does any kernel that does not notice its parent died (ipykernel does: `process.watch_parent`).
So each daemon keeps a record of what it created, one JSON file per daemon in a private
per-user directory, rewritten (atomically) whenever a kernel starts or exits; a daemon that
exits normally removes its record with everything else.

When a daemon starts, it sweeps the records of daemons that are dead (by pid *and* process
start time, so a recycled pid never passes for a live daemon): it kills their kernels that
still run, verified the same way, and deletes their files and directories. A live daemon's
record is never touched. Kernels started to outlive their daemon (a state directory) are
marked `detached`: they and their files are left alone, and the record is kept with just them
until they are gone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import threading
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

import attrs
import trio
from jupyter_core.paths import jupyter_runtime_dir

from kallichore.jupyter.connection import write_json_file
from kallichore.session import process as kernel_process

logger = logging.getLogger(__name__)

# Bumped when a field changes meaning; a record of another format is left alone.
FORMAT = 1


def record_directory() -> Path:
    """The user's directory of daemon records: under $XDG_RUNTIME_DIR (cleared at logout and
    reboot), else under the Jupyter runtime directory in the user's home."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime or jupyter_runtime_dir()) / "kallichore"


@attrs.define
class KernelEntry:
    pid: int
    started: float
    # Started to outlive the daemon (a state directory): never killed, its files never swept.
    detached: bool
    paths: list[str]


@attrs.define
class Record:
    """One daemon's record: who it is, the paths it created, the kernels it runs."""

    pid: int
    started: float
    paths: list[str] = attrs.Factory(list)
    kernels: list[KernelEntry] = attrs.Factory(list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **attrs.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> Record:
        """Raises KeyError, TypeError or ValueError for anything but a record of our format."""
        if data.get("format") != FORMAT:
            raise ValueError(f"record format {data.get('format')!r}")
        kernels = [
            KernelEntry(int(k["pid"]), float(k["started"]), bool(k["detached"]), list(k["paths"]))
            for k in data["kernels"]
        ]
        return cls(int(data["pid"]), float(data["started"]), list(data["paths"]), kernels)


class Footprint:
    """This daemon's record, kept up to date; see the module docstring.

    `Footprint(None)` records nothing (an embedded supervisor, or no private directory).
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        started = kernel_process.start_time(os.getpid()) if path is not None else None
        self._record = Record(os.getpid(), started or 0.0)
        # Every change gets a version; a write never replaces a newer one (see `_save`).
        self._version = 0
        self._written = 0
        self._writing = threading.Lock()
        self._write()

    @classmethod
    def open(cls, directory: Path | None = None) -> Footprint:
        """Sweep what dead daemons left in `directory` (default: `record_directory()`), then
        start this daemon's record there."""
        directory = directory or record_directory()
        if not _private_directory(directory):
            return cls(None)
        sweep(directory)
        return cls(directory / f"daemon-{os.getpid()}.json")

    def add_path(self, path: Path) -> None:
        """A file or directory of ours, to be deleted if we die without removing it."""
        if self._path is not None and str(path) not in self._record.paths:
            self._record.paths.append(str(path))
            self._write()

    def discard_path(self, path: Path) -> None:
        if self._path is not None and str(path) in self._record.paths:
            self._record.paths.remove(str(path))
            self._write()

    async def kernel_started(self, pid: int, *, detached: bool, paths: Iterable[Path]) -> None:
        """A kernel we launched, with the files that go with it (its connection file)."""
        started = kernel_process.start_time(pid)
        if self._path is None or started is None:
            return
        entry = KernelEntry(pid, started, detached, [str(p) for p in paths])
        self._record.kernels.append(entry)
        await self._save()

    async def kernel_exited(self, pid: int) -> None:
        if self._path is None:
            return
        self._record.kernels = [k for k in self._record.kernels if k.pid != pid]
        await self._save()

    def close(self) -> None:
        """The daemon has cleaned up after itself: the record goes too (after any write a
        worker thread is doing, and no write comes after it)."""
        with self._writing:
            if self._path is not None:
                self._path.unlink(missing_ok=True)
                self._path = None
                self._written = 2**63  # any write still queued is older: skipped

    def _write(self) -> None:
        if self._path is not None:
            self._write_version(self._path, *self._snapshot())

    async def _save(self) -> None:
        """Write the record from a worker thread: renaming a file over another makes ext4 flush
        its data, which took tens of milliseconds of the event loop per kernel when 50 kernels
        started at once. Writes that queue up behind a newer one are skipped."""
        if self._path is not None:
            await trio.to_thread.run_sync(self._write_version, self._path, *self._snapshot())

    def _snapshot(self) -> tuple[int, dict[str, Any]]:
        self._version += 1
        return self._version, self._record.to_dict()

    def _write_version(self, path: Path, version: int, contents: dict[str, Any]) -> None:
        with self._writing:
            if version <= self._written:
                return
            try:
                # Not synced: it only matters if the daemon dies, and a crash of the machine
                # takes the kernels with it (and, under $XDG_RUNTIME_DIR, the files too).
                write_json_file(path, contents, fsync=False)
            except OSError as exc:
                logger.warning("could not record what this daemon created in %s: %s", path, exc)
            self._written = version


def sweep(directory: Path) -> None:
    """Clear up after every dead daemon whose record is in `directory`; leave live ones be."""
    for path in sorted(directory.glob("daemon-*.json")):
        try:
            record = Record.from_dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            continue  # swept by another daemon starting at the same time
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("ignoring the daemon record %s: %s", path, exc)
            continue
        if kernel_process.is_process(record.pid, record.started):
            continue  # alive (or this very daemon)
        left = _sweep_record(record)
        if left.kernels:
            write_json_file(path, left.to_dict())
        else:
            path.unlink(missing_ok=True)


def _sweep_record(record: Record) -> Record:
    """Kill the record's orphaned kernels and delete its paths; returns what is left: the
    detached kernels still running, and the paths holding their files."""
    killed = []
    removed = []
    kept: list[KernelEntry] = []
    for kernel in record.kernels:
        alive = kernel_process.is_process(kernel.pid, kernel.started)
        if kernel.detached and alive:
            kept.append(kernel)
            continue
        if alive and not kernel.detached:
            kernel_process.kill_group(kernel.pid)
            # It may have left its process group; the identity was checked just above.
            with suppress(ProcessLookupError):
                os.kill(kernel.pid, signal.SIGKILL)
            killed.append(kernel.pid)
        removed += [p for p in kernel.paths if _remove(p)]
    kept_files = [Path(p) for kernel in kept for p in kernel.paths]
    holding = [p for p in record.paths if any(f.is_relative_to(p) for f in kept_files)]
    removed += [p for p in record.paths if p not in holding and _remove(p)]
    if killed or removed:
        logger.info(
            "swept what dead daemon %d left: killed %s, removed %s",
            record.pid,
            ", ".join(f"kernel {pid}" for pid in killed) or "no kernel",
            ", ".join(removed) or "no file",
        )
    return attrs.evolve(record, paths=holding, kernels=kept)


def _remove(path: str) -> bool:
    """Delete a file, socket or directory tree; whether anything was there."""
    target = Path(path)
    try:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("could not remove %s, left by a dead daemon: %s", path, exc)
        return False
    return True


def _private_directory(directory: Path) -> bool:
    """Make `directory` (0700) or check that it is ours and nobody else can write to it:
    records there are trusted to say what to kill and delete."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as exc:
        logger.warning("not recording what this daemon creates: %s", exc)
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        logger.warning("not recording what this daemon creates: %s is not our directory", directory)
        return False
    if stat.S_IMODE(info.st_mode) & 0o022:
        logger.warning("not recording what this daemon creates: others can write to %s", directory)
        return False
    return True
