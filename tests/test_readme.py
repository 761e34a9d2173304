"""Every fenced code block of README.md runs, as a newcomer would run it.

The rule, for blocks added later: the first block holds the newcomer's two commands (tested
below, one by one). Every other block runs in the temporary copy of the repository where the
first command made `.venv`, while the daemon that command started is up (port 8182, `--token
none`): `python` blocks as scripts with `.venv/bin/python`, `sh` blocks with `sh`. A block must
end with status 0 and print the result of its example, which is always `6*7`: its output must
contain 42. A `json` block is a kernelspec (`kernel.json`): it must read as one, with a valid
launcher block in its `metadata.kallichore`. A block in another language fails
`test_every_block_has_a_rule` until this module gets a rule for it.

The block of "Use JupyterLab with kallichore" is a server that runs until stopped: it runs
with JupyterLab (from the servers' virtualenv, tests/jupyter/servers.py) first on PATH, and
JupyterLab, once it serves, runs `print(6*7)` in a notebook's kernel, which the daemon lists;
once JupyterLab is stopped, that kernel is gone.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import psutil
import pytest
import trio

from kallichore.client import open_channels
from kallichore.jupyter.kernelspec import load_kernelspec
from kallichore.session.launch.options import LocalLauncher, parse_launcher
from tests.jupyter.servers import gateway_bin, stop

ROOT = Path(__file__).parent.parent
README_PORT = 8182
DAEMON_URL = f"http://127.0.0.1:{README_PORT}"
# Hang guards only: creating the venv and installing into it can take minutes on a slow box.
INSTALL_TIMEOUT = 900
RUN_TIMEOUT = 120
pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 4 * RUN_TIMEOUT)
# How a block of each language runs: program, and the suffix of the script file it gets.
RUNNERS = {"python": (".venv/bin/python", ".py"), "sh": ("sh", ".sh")}


@attrs.frozen
class Block:
    language: str
    section: str
    code: str

    @property
    def commands(self) -> list[str]:
        """The shell commands of an sh block, without its comments and blank lines."""
        lines = (line.strip() for line in self.code.splitlines())
        return [line for line in lines if line and not line.startswith("#")]


def readme_blocks() -> list[Block]:
    """The fenced blocks, each with its language and the heading of its section."""
    blocks = []
    section = ""
    fence: tuple[str, list[str]] | None = None
    for line in (ROOT / "README.md").read_text().splitlines(keepends=True):
        if fence is None:
            if line.startswith("```"):
                fence = (line[3:].strip(), [])
            elif line.startswith("#"):
                section = line.lstrip("#").strip()
        elif line.rstrip() == "```":
            blocks.append(Block(fence[0], section, "".join(fence[1])))
            fence = None
        else:
            fence[1].append(line)
    assert fence is None, "README.md ends inside a code block"
    return blocks


BLOCKS = readme_blocks()
FIRST, OTHERS = BLOCKS[0], BLOCKS[1:]
JUPYTERLAB_SECTION = "Use JupyterLab with kallichore"
[JUPYTERLAB] = [block for block in OTHERS if block.section == JUPYTERLAB_SECTION]
RUN_THROUGH = [block for block in OTHERS if block is not JUPYTERLAB and block.language != "json"]
KERNELSPECS = [block for block in OTHERS if block.language == "json"]


def test_every_block_has_a_rule() -> None:
    assert FIRST.language == "sh"
    assert len(FIRST.commands) == 2, "the first block is the newcomer's two commands"
    for block in OTHERS:
        known = block.language in RUNNERS or block.language == "json"
        assert known, f"no test runs the {block.language!r} block in {block}"


@pytest.mark.parametrize("block", KERNELSPECS, ids=[b.section for b in KERNELSPECS])
def test_kernelspec_block(block: Block, tmp_path: Path) -> None:
    """A kernelspec shown in the README is one, and its launcher block is valid."""
    (tmp_path / "kernel.json").write_text(block.code)
    kernelspec = load_kernelspec("example", tmp_path / "kernel.json")
    assert kernelspec.argv[-1] == "{connection_file}"
    launcher = parse_launcher(kernelspec.metadata["kallichore"])
    assert not isinstance(launcher, LocalLauncher)


@attrs.frozen
class Newcomer:
    """The first command, running in a temporary copy of the repository."""

    directory: Path
    shell: subprocess.Popen[bytes]
    daemon: psutil.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def newcomer_env() -> dict[str, str]:
    """Our environment without what would make the copy import this tree, pip's cache kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The suite's fixtures point HOME at a temporary directory; pip may use the real cache.
    caches = os.environ.get("XDG_CACHE_HOME") or Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache"
    env.setdefault("PIP_CACHE_DIR", str(Path(caches) / "pip"))
    return env


def copy_tracked_files(destination: Path) -> None:
    """The repository as a fresh clone has it (tracked files, as they are in the work tree)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    for name in listing.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())


def require_free_port() -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", README_PORT))
        except OSError as exc:
            pytest.fail(
                f"port {README_PORT} is taken ({exc.strerror}): the README's daemon listens "
                "there, so this test needs it; stop whatever uses it and run the tests again"
            )


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Newcomer]:
    """The first command run as written; it stays up until `test_ctrl_c_...` stops it."""
    require_free_port()
    directory = tmp_path_factory.mktemp("readme-copy")
    copy_tracked_files(directory)
    log = directory.parent / "newcomer.log"
    with log.open("wb") as output:
        shell = subprocess.Popen(
            ["sh", "-c", FIRST.commands[0]],
            cwd=directory,
            env=newcomer_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + INSTALL_TIMEOUT
        while f"Listening at 127.0.0.1:{README_PORT}" not in log.read_text(errors="replace"):
            if shell.poll() is not None:
                pytest.fail(f"the first command ended with {shell.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the daemon did not listen within {INSTALL_TIMEOUT} s")
            time.sleep(0.2)
        shell_process = psutil.Process(shell.pid)
        [daemon] = [
            p
            for p in [shell_process, *shell_process.children(recursive=True)]
            if any("kallichore" in part for part in p.cmdline()[:2])
        ]
        yield Newcomer(directory, shell, daemon, log)
    finally:
        if shell.poll() is None:  # a test failed before stopping it: Ctrl-C, then by force
            with contextlib.suppress(psutil.Error):
                for process in psutil.Process(shell.pid).children(recursive=True):
                    process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                shell.wait(timeout=RUN_TIMEOUT)
            if shell.poll() is None:
                os.killpg(shell.pid, signal.SIGKILL)
                shell.wait()


def test_the_first_command_installs_and_serves(newcomer: Newcomer) -> None:
    with httpx.Client(base_url=DAEMON_URL, timeout=RUN_TIMEOUT) as http:
        assert http.get("/status").json()["sessions"] == 0
        python = str(newcomer.directory / ".venv/bin/python")
        body = {
            "session_id": "readme-check",
            "display_name": "Python",
            "language": "python",
            "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        }
        assert http.put("/sessions", json=body).status_code == 200
        response = http.post("/sessions/readme-check/start")
    assert response.status_code == 200, response.text
    assert response.json()["language_info"]["name"] == "python"


@pytest.mark.parametrize(
    "block", RUN_THROUGH, ids=[f"{b.section}-{i}" for i, b in enumerate(RUN_THROUGH, start=1)]
)
def test_block(newcomer: Newcomer, block: Block) -> None:
    assert newcomer.shell.poll() is None, "the README's daemon is no longer running"
    program, suffix = RUNNERS[block.language]
    script = newcomer.directory / f"readme-block{suffix}"
    script.write_text(block.code)
    returncode, output = run_to_the_end([program, script.name], newcomer.directory)
    assert returncode == 0, output
    assert "42" in output, output


def run_to_the_end(command: list[str], directory: Path) -> tuple[int, str]:
    """Run `command`; on a hang, kill it and whatever it started (a kernel, say) and fail."""
    with subprocess.Popen(
        command,
        cwd=directory,
        env=newcomer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            output, _ = process.communicate()
            pytest.fail(f"{command} did not end within {RUN_TIMEOUT} s:\n{output}")
    return process.returncode, output


def test_jupyterlab_block(newcomer: Newcomer, tmp_path: Path) -> None:
    path = f"{gateway_bin()}{os.pathsep}{os.environ['PATH']}"
    # CI runs as root, which JupyterLab refuses unless its configuration allows it.
    config = tmp_path / "jupyter-config"
    config.mkdir()
    (config / "jupyter_server_config.json").write_text('{"ServerApp": {"allow_root": true}}')
    # (BROWSER: JupyterLab opens no browser on a desktop that runs the tests.)
    env = newcomer_env() | {"PATH": path, "BROWSER": "true", "JUPYTER_CONFIG_DIR": str(config)}
    log = tmp_path / "jupyterlab.log"
    with log.open("wb") as output:
        lab = subprocess.Popen(
            ["sh", "-c", JUPYTERLAB.code],
            cwd=newcomer.directory,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        host, port, token = jupyterlab_address(lab, log)
        kernel_id, stdout = trio.run(run_in_a_notebook, host, port, token, "print(6*7)")
        assert stdout == "42\n"
        listed = httpx.get(f"{DAEMON_URL}/sessions/{kernel_id}", timeout=RUN_TIMEOUT).json()
        assert listed["kernel_id"] == kernel_id
    finally:
        # SIGTERM to the shell's whole group: the shell does not pass it on to JupyterLab,
        # which deletes its kernels on the daemon before it exits.
        family = [psutil.Process(lab.pid), *psutil.Process(lab.pid).children(recursive=True)]
        os.killpg(lab.pid, signal.SIGTERM)
        psutil.wait_procs(family, timeout=RUN_TIMEOUT)
        stop(lab)
    gone = httpx.get(f"{DAEMON_URL}/api/kernels/{kernel_id}", timeout=RUN_TIMEOUT)
    assert gone.status_code == 404, gone.text


def jupyterlab_address(lab: subprocess.Popen[bytes], log: Path) -> tuple[str, int, str]:
    """The host, port and token JupyterLab prints once it serves."""
    pattern = re.compile(r"http://(127\.0\.0\.1|localhost):(\d+)/lab\?token=(\w+)")
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (found := pattern.search(log.read_text(errors="replace"))):
        assert lab.poll() is None, f"JupyterLab ended with {lab.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"JupyterLab did not serve:\n{log.read_text()}"
        time.sleep(0.2)
    return found[1], int(found[2]), found[3]


async def run_in_a_notebook(host: str, port: int, token: str, code: str) -> tuple[str, str]:
    """As JupyterLab's page does: a notebook session with a kernel, then `code` over the
    kernel's channels through JupyterLab; the kernel's id and what it printed."""
    headers = {"Authorization": f"token {token}"}
    url = f"http://{host}:{port}"
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=RUN_TIMEOUT) as http:
        body = {"path": "readme.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        response = await http.post("/api/sessions", json=body)
    assert response.status_code == 201, response.text
    kernel_id: str = response.json()["kernel"]["id"]
    stream = await trio.open_tcp_stream(host, port)
    resource = f"/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4()}"
    with trio.fail_after(RUN_TIMEOUT):
        async with open_channels(stream, f"{host}:{port}", resource, list(headers.items())) as ws:
            result = await ws.execute(code)
    return kernel_id, result.stdout


def test_the_second_command_is_what_ci_runs() -> None:
    """`nox` runs this very suite: running it here would recurse, so we check that CI's entry
    point runs exactly the README's command (and so that CI keeps the README's promise)."""
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert ci[-1] == FIRST.commands[1]


def test_ctrl_c_stops_the_daemon_and_its_kernels(newcomer: Newcomer) -> None:
    """Last in this module: the other tests use the daemon."""
    kernels = newcomer.daemon.children(recursive=True)
    assert kernels, "the daemon runs no kernel: the tests above should have started some"
    newcomer.daemon.send_signal(signal.SIGINT)
    assert newcomer.shell.wait(timeout=RUN_TIMEOUT) == 0, newcomer.output()
    assert not [k for k in kernels if k.is_running()]
    assert "Traceback" not in newcomer.output()
