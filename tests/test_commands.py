"""The subcommands for a running daemon (`kallichore ls`, `run`, `kernelspecs`, `attach`), each
run as a user runs it, a subprocess, against one real daemon on TCP with a real ipykernel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from kallichore.client import KallichoreClient
from tests.conftest import IPYKERNEL_ARGV, TIMEOUT, TOKEN, daemon_command


@attrs.frozen
class Daemon:
    connection_file: Path
    url: str
    http: httpx.Client


def kallichore(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`kallichore ARGS` run to its end, with no KALLICHORE_* variable but those of `env`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KALLICHORE_")}
    return subprocess.run(
        daemon_command(*args),
        input=stdin,
        capture_output=True,
        text=True,
        env=environment | (env or {}),
        timeout=TIMEOUT,
        check=False,
    )


def read_when_written(path: Path, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + TIMEOUT
    while not (path.exists() and path.read_text()):
        assert process.poll() is None, "the daemon exited"
        assert time.monotonic() < deadline, "the daemon wrote no connection file"
        time.sleep(0.05)
    return path.read_text()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module, with a token, and an ipykernel session `shared` (the session
    a person's Positron would have)."""
    base = tmp_path_factory.mktemp("commands")
    token_file = base / "token"
    token_file.write_text(TOKEN)
    connection_file = base / "connection.json"
    arguments = ["--transport", "tcp", "--connection-file", str(connection_file)]
    with (base / "daemon.log").open("wb") as log:
        process = subprocess.Popen(
            daemon_command(*arguments, "--token", str(token_file)), stdout=log, stderr=log
        )
    try:
        url = json.loads(read_when_written(connection_file, process))["base_path"]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT) as http:
            body = {
                "session_id": "shared",
                "argv": list(IPYKERNEL_ARGV),
                "display_name": "Shared",
                "language": "python",
                "username": "tester",
            }
            assert http.put("/sessions", json=body).status_code == 200
            assert http.post("/sessions/shared/start").status_code == 200
            yield Daemon(connection_file, url, http)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)


def test_help_says_what_each_command_does() -> None:
    daemon_help = kallichore("--help")
    assert daemon_help.returncode == 0
    assert "--port" in daemon_help.stdout  # the daemon's own flags, as they were
    assert "ls | start | run | kernelspecs | attach" in " ".join(daemon_help.stdout.split())
    attach_help = kallichore("attach", "--help")
    assert attach_help.returncode == 0
    assert "never displaces the session's own client" in " ".join(attach_help.stdout.split())
    for flag in ("--connection-file", "--url", "--unix-socket", "--token", "KALLICHORE_TOKEN"):
        assert flag in attach_help.stdout


def test_kernelspecs(daemon: Daemon) -> None:
    listed = kallichore("kernelspecs", "--connection-file", str(daemon.connection_file))
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "LANGUAGE", "DISPLAY", "NAME"]
    assert any(row.split()[:3] == ["python3", "*", "python"] for row in rows)
    as_json = kallichore(
        "kernelspecs", "--json", "--url", daemon.url, env={"KALLICHORE_TOKEN": TOKEN}
    )
    assert json.loads(as_json.stdout)["default"] == "python3"


def test_ls_and_where_the_daemon_is(daemon: Daemon) -> None:
    listed = kallichore("ls", env={"KALLICHORE_CONNECTION_FILE": str(daemon.connection_file)})
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["SESSION", "STATUS", "LANGUAGE", "NAME", "PID", "CLIENT", "STARTED"]
    [shared] = [row.split() for row in rows if row.startswith("shared ")]
    assert shared[1:4] == ["idle", "python", "Shared"]
    assert int(shared[4]) > 0  # the kernel's pid
    nowhere = kallichore("ls", "--url", "http://127.0.0.1:1")
    assert nowhere.returncode == 1
    assert nowhere.stderr.startswith("Error: cannot reach the daemon")
    refused = kallichore("kernelspecs", "--url", daemon.url, "--token", "wrong")
    assert refused.returncode == 1
    assert refused.stderr.startswith("Error: the daemon refused: HTTP 401")
    missing = kallichore("ls", "--connection-file", "/nonexistent/kallichore.json")
    assert missing.returncode == 1
    assert "cannot read the connection file" in missing.stderr


class Console:
    """`kallichore attach` in a subprocess: what it printed so far, and its input."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stdout = ""
        self.stderr = ""

    async def collect(self, stream: trio.abc.ReceiveStream, name: str) -> None:
        async for chunk in stream:
            setattr(self, name, getattr(self, name) + chunk.decode())

    async def type(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(text.encode())

    async def until(self, text: str, name: str = "stdout") -> None:
        with trio.fail_after(TIMEOUT):
            while text not in getattr(self, name):
                await trio.sleep(0.05)


@asynccontextmanager
async def attached(daemon: Daemon, *args: str) -> AsyncIterator[Console]:
    process = await trio.lowlevel.open_process(
        daemon_command("attach", "--connection-file", str(daemon.connection_file), *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    console = Console(process)
    async with trio.open_nursery() as nursery:
        assert process.stdout is not None
        assert process.stderr is not None
        nursery.start_soon(console.collect, process.stdout, "stdout")
        nursery.start_soon(console.collect, process.stderr, "stderr")
        try:
            yield console
        finally:
            if process.returncode is None:
                with trio.move_on_after(TIMEOUT):
                    await process.wait()
                process.kill()


async def test_attach_beside_the_sessions_own_client(daemon: Daemon) -> None:
    """A console on `shared` while its Kallichore channels client (Positron) stays connected:
    each sees what the other runs; input(), Ctrl-C and blocks work; Ctrl-D detaches."""
    async with (
        KallichoreClient.from_connection_file(daemon.connection_file) as client,
        client.channels("shared") as positron,
        attached(daemon, "shared") as console,
    ):
        await console.until("Ctrl-D detaches", "stderr")
        await console.type("for i in range(2):\n    print('line', i)\n\n")
        await console.until("line 0\nline 1\n")
        await console.type("name = input('who? ')\nalice\nprint('hi', name)\n")
        await console.until("who? hi alice\n")
        seen = await positron.execute("print('from positron')")
        assert seen.stdout == "from positron\n"
        await console.until("from positron\n")
        assert "(another client): print('from positron')" in console.stderr
        await console.type("import time; print('sleeping', flush=True); time.sleep(30)\n")
        await console.until("sleeping\n")
        console.process.send_signal(signal.SIGINT)
        await console.until("KeyboardInterrupt", "stderr")
        await console.type("6 * 7\n")
        await console.until("]: 42\n")
        assert daemon.http.get("/sessions/shared").json()["connected"] is True
        assert (await positron.execute("print(name)")).stdout == "alice\n"
        assert console.process.stdin is not None
        await console.process.stdin.aclose()
        with trio.fail_after(TIMEOUT):
            assert await console.process.wait() == 0
        # Positron was never displaced: its connection still works.
        assert (await positron.execute("print('still here')")).stdout == "still here\n"
