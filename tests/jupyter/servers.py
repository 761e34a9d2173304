"""The servers that real Jupyter clients are tested against, behind one interface.

A scenario names its target with one parameter, `server`: "kg" is Jupyter Kernel Gateway 3.x
(the reference, run from the benchmarks' servers' virtualenv), "ours" is our daemon. Both run
as subprocesses on loopback with the same kernelspec (`python3`: ipykernel in this
interpreter), so that the only difference a client sees is the server. jupyter_server, started
as a gateway client of either, is here too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import httpx
import psutil

from benchmarks.environment import DEFAULT_CACHE_DIR, ensure_gateway_venv, free_port

KERNEL_NAME = "python3"
NO_EXTENSIONS = dict.fromkeys(
    ("jupyterlab", "jupyter_lsp", "jupyter_server_terminals", "notebook_shim"), False
)
# Hang guards, not measures of speed.
START_SECONDS = 90.0
STOP_SECONDS = 30.0

# The values of the `server_kind` parameter (tests/jupyter/conftest.py).
SERVERS = ["kg", "ours"]


@cache
def gateway_bin() -> Path:
    """The `bin` of the servers' virtualenv (Kernel Gateway, jupyter_server, nbclient): the
    benchmarks' own, built once per cache directory and shared with them."""
    return ensure_gateway_venv(DEFAULT_CACHE_DIR)


def write_kernelspec(share: Path) -> None:
    """`python3` under `share/kernels` (a JUPYTER_PATH entry), running this interpreter's
    ipykernel, with a logo among its resources."""
    spec_dir = share / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {
        "argv": argv,
        "display_name": "Python 3 (clients)",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": False},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


@dataclass
class Server:
    """A server process on loopback: its URL, its token, its log."""

    name: str
    url: str
    token: str | None
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def wait_ready(self) -> None:
        """Until GET /api/kernelspecs answers 200."""
        deadline = time.monotonic() + START_SECONDS
        with httpx.Client(base_url=self.url, headers=self.headers) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log_text()}")
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/api/kernelspecs").status_code == 200:
                        return
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer in {START_SECONDS} s: {self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def kernel_processes(self) -> list[psutil.Process]:
        """The ipykernel processes this server started and that still run."""
        try:
            family = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        kernels = []
        for child in family:
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE and "ipykernel_launcher" in " ".join(
                    child.cmdline()
                ):
                    kernels.append(child)
        return kernels


def server_env(root: Path) -> dict[str, str]:
    """This process's environment (the tests' private home) with the tests' kernelspec first."""
    share = root / "share"
    write_kernelspec(share)
    env = dict(os.environ)
    env["JUPYTER_PATH"] = str(share)
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return env


@contextlib.contextmanager
def running(
    argv: list[str], url: str, token: str | None, root: Path, name: str, *, wait: bool
) -> Iterator[Server]:
    """Start `argv` in its own process group, wait until it answers (unless not `wait`: then
    the caller calls `wait_ready`, so that servers start side by side), and stop it (with
    whatever it started) on the way out."""
    log = root / f"{name}.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            argv,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=server_env(root),
            cwd=root,
            start_new_session=True,
        )
    server = Server(name, url, token, process, log)
    try:
        if wait:
            server.wait_ready()
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then after a grace SIGKILL the process and everything it started."""
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_SECONDS)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for child in family:
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def kernel_server(
    kind: str, root: Path, token: str | None, *, wait: bool = True
) -> Iterator[Server]:
    """The server of the kernels API named `kind` ("kg" or "ours"), with `token` (None: auth
    off), its kernels' working directories relative to `root`."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if kind == "kg":
        argv = [
            str(gateway_bin() / "jupyter-kernelgateway"),
            "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={port}",
            "--KernelGatewayApp.port_retries=0",
            f"--KernelGatewayApp.auth_token={token or ''}",
            # The gateway client polls GET /api/kernels, which Kernel Gateway refuses by default.
            "--JupyterWebsocketPersonality.list_kernels=True",
        ]
    else:
        token_arg = "none"
        if token is not None:
            token_file = root / "token"
            token_file.write_text(token)
            token_arg = str(token_file)
        argv = [sys.executable, "-m", "kallichore", "--port", str(port), "--token", token_arg]
    with running(argv, url, token, root, f"server-{kind}", wait=wait) as server:
        yield server


@contextlib.contextmanager
def jupyter_server(
    gateway: Server, root: Path, token: str, *, wait: bool = True, lab: bool = False
) -> Iterator[Server]:
    """`jupyter server --gateway-url` at `gateway` with its token, itself with `token`, its
    notebooks under `root`; without the server extensions that come with JupyterLab (a few
    seconds to load, and nothing the kernels API needs). With `lab`, `jupyter lab` instead,
    JupyterLab's extensions loaded and its calls to the Internet (news, updates) turned off."""
    port = free_port()
    if lab:
        app = [
            str(gateway_bin() / "jupyter-lab"),
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
    else:
        app = [
            str(gateway_bin() / "jupyter-server"),
            f"--ServerApp.jpserver_extensions={NO_EXTENSIONS}",
        ]
    argv = [
        *app,
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False",
        "--ServerApp.allow_root=True",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        f"--gateway-url={gateway.url}",
        f"--GatewayClient.auth_token={gateway.token or ''}",
    ]
    url = f"http://127.0.0.1:{port}"
    name = "jupyter-lab" if lab else "jupyter-server"
    with running(argv, url, token, root, name, wait=wait) as server:
        yield server
