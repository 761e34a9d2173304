"""What every configuration shares: a private home, one kernelspec, the servers' virtualenv,
and the processes the run starts (every one of them stopped by the end of the run)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
import trio

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DEFAULT_CACHE_DIR = PACKAGE_DIR / ".cache"
# What goes into the servers' virtualenv (besides ipykernel, pinned to our version).
GATEWAY_PACKAGES = [
    "jupyter-kernel-gateway",
    "jupyter_server",
    # The clients of the Jupyter Server kernels API that the tests drive (tests/jupyter).
    "nbclient",
    "nbformat",
    "jupyterlab",
    "selenium",
]
# Removed again after the install: jsonschema's optional IRI format checker, which builds its
# grammar at import, 2 to 3 s of every Kernel Gateway, jupyter_server or nbclient start (it
# comes with jupyter_events; nothing here checks IRIs, and jsonschema does without it).
GATEWAY_WITHOUT = ["rfc3987-syntax"]
KERNEL_NAME = "python3"


def log(message: str) -> None:
    """Progress on stderr, with the time since the run began."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


_T0 = time.monotonic()


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Home:
    """A temporary HOME, IPYTHONDIR and Jupyter directories for every kernel and server.

    The kernelspec `python3` found there runs ipykernel in this interpreter, so every
    configuration runs the very same kernel.
    """

    root: Path
    env: dict[str, str]
    kernel_argv: list[str]

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def work(self) -> Path:
        return self.root / "work"


@contextlib.contextmanager
def private_home() -> Iterator[Home]:
    """Set up the directories and point this process's environment at them (undone after).

    The root is short and under /tmp: Unix socket paths are limited to about 104 bytes.
    """
    root = Path(tempfile.mkdtemp(prefix="kcb-", dir="/tmp"))
    dirs = {
        "HOME": root / "home",
        "IPYTHONDIR": root / "ipython",
        "JUPYTER_RUNTIME_DIR": root / "runtime",
        "JUPYTER_DATA_DIR": root / "data",
        "JUPYTER_CONFIG_DIR": root / "config",
        "JUPYTER_PATH": root / "share",
        "TMPDIR": root / "tmp",
    }
    for path in [*dirs.values(), root / "logs", root / "work"]:
        path.mkdir(parents=True)
    kernel_argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec_dir = dirs["JUPYTER_PATH"] / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": kernel_argv,
                "display_name": "Python 3 (benchmark)",
                "language": "python",
                "interrupt_mode": "signal",
            }
        )
    )
    overrides = {name: str(path) for name, path in dirs.items()}
    # debugpy's warning about frozen modules, printed by every kernel at start.
    overrides["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    overrides["JUPYTER_PLATFORM_DIRS"] = "1"
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield Home(root=root, env=dict(os.environ), kernel_argv=kernel_argv)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    """A free loopback port (bind to 0, read it, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the servers' virtualenv ----------------------------------------------------------------


def gateway_requirements() -> list[str]:
    ipykernel = version_of("ipykernel")
    if ipykernel is None:
        raise RuntimeError("ipykernel is not installed in this interpreter")
    return [*GATEWAY_PACKAGES, f"ipykernel=={ipykernel}"]


def _install_commands(venv: Path, requirements: list[str]) -> list[list[str]]:
    """The commands that make `venv` with `requirements`: uv's when uv is on PATH (ten times
    faster than pip, which matters in CI), else venv's and pip's."""
    python = str(venv / "bin" / "python")
    uv = shutil.which("uv")
    if uv is not None:
        return [
            [uv, "venv", "-q", "--python", sys.executable, str(venv)],
            [uv, "pip", "install", "-q", "--python", python, *requirements],
            [uv, "pip", "uninstall", "-q", "--python", python, *GATEWAY_WITHOUT],
        ]
    pip = [python, "-m", "pip", "-q", "--disable-pip-version-check"]
    return [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, "install", *requirements],
        [*pip, "uninstall", "-y", *GATEWAY_WITHOUT],
    ]


def ensure_gateway_venv(cache_dir: Path) -> Path:
    """A virtualenv with Jupyter Kernel Gateway, jupyter_server and the Jupyter clients the tests
    drive; made once, then reused.

    Its ipykernel is pinned to ours (although the kernels it starts come from our kernelspec,
    so they run this interpreter's ipykernel). Returns the virtualenv's `bin` directory.
    Processes that ask at once (the test suite's workers) take turns: the first builds it, the
    others then find it made.
    """
    venv = cache_dir / "venvs" / "gateways"
    bin_dir = venv / "bin"
    marker = venv / "bench-requirements.json"
    requirements = gateway_requirements()
    wanted = {"python": sys.version, "requirements": requirements, "without": GATEWAY_WITHOUT}
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / "gateways.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ready = all(
            (bin_dir / name).exists() for name in ("jupyter-kernelgateway", "jupyter-server")
        )
        if ready and marker.exists() and json.loads(marker.read_text()) == wanted:
            return bin_dir
        log(f"creating the servers' virtualenv in {venv} ({' '.join(requirements)})")
        shutil.rmtree(venv, ignore_errors=True)
        for command in _install_commands(venv, requirements):
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"could not install the servers:\n{done.stdout}\n{done.stderr}")
        marker.write_text(json.dumps(wanted))
    return bin_dir


def gateway_versions(bin_dir: Path) -> dict[str, str | None]:
    script = (
        "import importlib.metadata as m, json\n"
        "def v(p):\n"
        "    try:\n"
        "        return m.version(p)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({p: v(p) for p in ['jupyter-kernel-gateway', 'jupyter_server',"
        " 'jupyter_client', 'tornado', 'pyzmq', 'ipykernel']}))\n"
    )
    output = subprocess.run(
        [str(bin_dir / "python"), "-c", script], capture_output=True, text=True, check=True
    ).stdout
    versions: dict[str, str | None] = json.loads(output)
    return versions


# -- processes --------------------------------------------------------------------------------


@dataclass
class Processes:
    """Every process the run starts: each in its own session, each stopped (with whatever it
    started) by `stop` or, at the latest, by `stop_all`."""

    env: Mapping[str, str]
    logs: Path
    running: list[trio.Process] = field(default_factory=list)
    _log_files: list[IO[bytes]] = field(default_factory=list)

    async def spawn(
        self, argv: list[str], name: str, cwd: Path | None = None, *, piped: bool = False
    ) -> trio.Process:
        """Start `argv`, its output to `<name>.log`; with `piped`, its stdin and stdout are
        pipes (`process.stdin`, `process.stdout`) and only its stderr goes to the log."""
        output = (self.logs / f"{name}.log").open("ab")
        self._log_files.append(output)
        process = await trio.lowlevel.open_process(
            argv,
            stdout=subprocess.PIPE if piped else output,
            stderr=output if piped else subprocess.STDOUT,
            stdin=subprocess.PIPE if piped else subprocess.DEVNULL,
            env=dict(self.env),
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
        self.running.append(process)
        return process

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    async def stop(self, process: trio.Process, grace: float = 15.0) -> None:
        """SIGTERM, wait up to `grace`, then SIGKILL the process and all it started."""
        family = descendants(process.pid)
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await process.wait()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        kill_all(family)
        if process in self.running:
            self.running.remove(process)

    async def stop_all(self) -> None:
        with trio.CancelScope(shield=True):
            for process in reversed(list(self.running)):
                await self.stop(process, grace=5.0)
            for output in self._log_files:
                output.close()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads together (ZeroMQ's I/O thread
    included, and threads that have ended), its children left out: /proc/PID/stat's utime and
    stime, in clock ticks (10 ms), so a figure wants many round trips behind it."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # (After the command name in parentheses, which may hold spaces: state, then field 4...)
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def descendants(pid: int) -> list[psutil.Process]:
    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return children


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL whatever of `processes` still runs (and its process group)."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(os.getpgid(process.pid), signal.SIGKILL)
                process.kill()


def reap_own_children() -> int:
    """Kill anything this process started that is still alive; how many there were."""
    left = [p for p in descendants(os.getpid()) if p.status() != psutil.STATUS_ZOMBIE]
    kill_all(left)
    return len(left)


# -- metadata ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
    }


def our_versions() -> dict[str, str | None]:
    names = [
        "kallichore",
        "trio",
        "pyzmq",
        "ipykernel",
        "ipython",
        "jupyter_client",
        "hypercorn",
        "quart",
        "quart-trio",
        "trio-websocket",
        "wsproto",
        "httpx",
        "psutil",
        "matplotlib",
    ]
    return {name: version_of(name) for name in names}


def git_revision() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return result.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }
