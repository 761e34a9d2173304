"""`kallichore mcp` through the MCP SDK's stdio client, as an MCP client runs it: embedded (its
own kernels) and on a daemon (through its connection file); and how it ends."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, ImageContent, TextContent

from kallichore.entry import main
from kallichore.mcp.command import INSTALL_HINT
from tests.conftest import IPYKERNEL_ARGV, TIMEOUT, daemon

ROOT = Path(__file__).parent.parent
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
SHOW_PNG = f"from IPython.display import Image, display\ndisplay(Image({PNG!r}))"


@asynccontextmanager
async def mcp_server(*args: str) -> AsyncIterator[Client]:
    """`kallichore mcp ARGS` started by the SDK's stdio client (which closes its stdin at the
    end, and waits for it to exit)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = StdioServerParameters(
        command=sys.executable, args=["-m", "kallichore", "mcp", *args], env=env
    )
    async with Client(command) as client:
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> CallToolResult:
    with trio.fail_after(TIMEOUT):
        return await client.call_tool(tool, arguments)


def text(result: CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, TextContent))


async def kernel_pid(client: Client, session_id: str | None = None) -> int:
    ids = {} if session_id is None else {"session_id": session_id}
    return int(text(await call(client, "execute_code", code="import os; os.getpid()", **ids)))


def running(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def until_gone(pid: int) -> None:
    """(A process's end is seen a moment after what ended it.)"""
    with contextlib.suppress(psutil.NoSuchProcess), trio.fail_after(TIMEOUT):
        process = psutil.Process(pid)
        while running(process):
            await trio.sleep(0.05)


async def test_embedded_a_python_session_that_keeps_its_state() -> None:
    async with mcp_server() as client:
        tools = {tool.name for tool in (await client.list_tools()).tools}
        assert tools == {"list_sessions", "start_session", "execute_code", "interrupt", "restart"}

        assert text(await call(client, "execute_code", code="x = 6\nprint('set')")) == "set\n"
        result = await call(client, "execute_code", code="print(x * 7)\nx * 7")
        assert (result.is_error, text(result)) == (False, "42\n42\n")

        [png] = (await call(client, "execute_code", code=SHOW_PNG)).content
        assert isinstance(png, ImageContent)
        assert png.mime_type == "image/png"
        assert base64.b64decode(png.data) == PNG

        failed = await call(client, "execute_code", code="def f():\n    1 / 0\nf()")
        assert failed.is_error
        assert "in f()" in text(failed)
        assert text(failed).endswith("ZeroDivisionError: division by zero\n")

        async with trio.open_nursery() as nursery:
            results: list[CallToolResult] = []

            async def sleep() -> None:
                results.append(
                    await call(client, "execute_code", code="import time\ntime.sleep(30)")
                )

            nursery.start_soon(sleep)
            listed: list[dict[str, Any]] = []
            while not any(s["status"] == "busy" for s in listed):
                listed = (await call(client, "list_sessions")).structured_content["sessions"]
            assert text(await call(client, "interrupt")).startswith("Interrupted session mcp-")
        assert "KeyboardInterrupt" in text(results[0])
        [session] = listed
        assert (session["started_here"], session["default"], session["language"]) == (
            True,
            True,
            "python",
        )
        unknown = await call(client, "start_session", kernelspec="cobol")
        assert unknown.is_error
        assert "no kernelspec named 'cobol'; there are: " in text(unknown)
        assert "python3" in text(unknown).split("there are: ")[1].split(", ")
        pid = await kernel_pid(client)
    # The client closed our stdin and waited for us to exit: our kernel goes with us.
    await until_gone(pid)


async def test_on_a_daemon_it_uses_any_session_and_ends_only_its_own(tmp_path: Path) -> None:
    connection_file = tmp_path / "kallichore.json"
    async with (
        daemon(tmp_path, connection_file=connection_file) as kallichore,
        kallichore.client() as person,
    ):
        await person.create_session("person", IPYKERNEL_ARGV, display_name="Console")
        await person.start("person")
        async with mcp_server("--connection-file", str(connection_file)) as client:
            # A person's session, named: its state is theirs and ours.
            await call(client, "execute_code", session_id="person", code="shared = 6 * 7")
            read = await call(client, "execute_code", session_id="person", code="print(shared)")
            assert text(read) == "42\n"
            # Its own session, started at the first call that needs it.
            assert text(await call(client, "execute_code", code="print(6 * 7)")) == "42\n"
            own = (await call(client, "start_session", kernelspec="python3")).structured_content
            listed = (await call(client, "list_sessions")).structured_content["sessions"]
            assert {s["session_id"]: s["started_here"] for s in listed} == {
                "person": False,
                own["session_id"]: True,
                next(s["session_id"] for s in listed if s["default"]): True,
            }
            await call(client, "execute_code", session_id=own["session_id"], code="x = 1")
            restarted = await call(client, "restart", session_id=own["session_id"])
            assert restarted.is_error is False
            lost = await call(client, "execute_code", session_id=own["session_id"], code="x")
            assert lost.is_error
            assert "NameError" in text(lost)
            own_kernel = psutil.Process(await kernel_pid(client, own["session_id"]))
            missing = await call(client, "interrupt", session_id="nobody")
            assert missing.is_error
            assert "nobody" in text(missing)

            # SIGTERM, with stdin still open: the server ends its own sessions and exits.
            [server] = [p for p in psutil.Process().children() if "mcp" in p.cmdline()[2:4]]
            server.send_signal(signal.SIGTERM)
            await until_gone(server.pid)
        assert [s["session_id"] for s in await person.list_sessions()] == ["person"]
        assert not running(own_kernel)
        # The person's kernel, untouched.
        assert (await person.get_session("person"))["status"] == "idle"


def test_without_the_sdk_it_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """(As if not installed: the SDK's modules, imported by this test module, are hidden.)"""
    for module in [name for name in sys.modules if name.split(".")[0] in ("mcp", "mcp_types")]:
        monkeypatch.setitem(sys.modules, module, None)
    for module in [name for name in sys.modules if name.startswith("kallichore.mcp.")]:
        monkeypatch.delitem(sys.modules, module)
    assert main(["mcp"]) == 1
    assert capsys.readouterr().err.strip() == INSTALL_HINT
    assert "pip install 'kallichore[mcp]'" in INSTALL_HINT


def test_a_connection_file_it_cannot_use_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.json"
    assert main(["mcp", "--connection-file", str(missing)]) == 1
    assert capsys.readouterr().err.startswith(f"Error: {missing}: [Errno 2] No such file")


def test_the_rest_of_kallichore_runs_without_the_sdk() -> None:
    """The daemon (and `import kallichore`) never import the SDK: it is an optional extra."""
    check = "import sys, kallichore.cli, kallichore.client; assert 'mcp' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", check], env=env, check=True, timeout=TIMEOUT)
