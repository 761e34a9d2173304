"""The MCP tools and the server that offers them.

The tools' docstrings and parameter descriptions are what the model reads to decide what to
call: they say what a tool does to the kernel, not how it is built.
"""

from __future__ import annotations

import functools
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import httpx
import trio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import Field

from kallichore import __version__
from kallichore.client import ApiError
from kallichore.errors import KallichoreError
from kallichore.jupyter.kernelspec import KernelSpecError
from kallichore.mcp.content import outcome_result
from kallichore.mcp.kernels import Kernels, daemon_kernels, embedded_kernels
from kallichore.mcp.stdio import serve_stdio

logger = logging.getLogger(__name__)

INSTRUCTIONS = """\
Runs code in Jupyter kernels supervised by kallichore. `execute_code` runs code in a session and
returns what it printed and displayed (text, and images for PNG and JPEG displays) and the
traceback of an error. Variables, imports and definitions persist between calls to the same
session, as in a notebook. Without a session_id, code runs in this server's own session (of
the default kernelspec, python3), started on first use. `list_sessions` shows every session
(on a daemon, a person's consoles too: use those only when asked to), `start_session` starts
another kernel, `interrupt` stops code that runs too long, `restart` gives a session a fresh
kernel (its state is lost)."""

SessionId = Annotated[
    str | None,
    Field(description="The session (see list_sessions); default: this server's own session."),
]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What the tools' errors are made of: refusals we expect, told to the model as they are.
EXPECTED_ERRORS = (ApiError, KallichoreError, KernelSpecError, httpx.HTTPError)

P = ParamSpec("P")
R = TypeVar("R")


def telling_errors(tool: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """`tool`, its expected refusals (an unknown session, a kernel that failed to start, an
    unreachable daemon) turned into tool errors the model reads, not crashes the SDK logs."""

    @functools.wraps(tool)
    async def told(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await tool(*args, **kwargs)
        except EXPECTED_ERRORS as error:
            raise ToolError(str(error)) from error

    return told


def new_session_id(kind: str) -> str:
    """Ids that say where a session came from, in a daemon's listing or a person's IDE."""
    return f"mcp-{kind}-{secrets.token_hex(4)}"


class KernelTools:
    """The tools, over a `Kernels`; the default session is started on first use."""

    def __init__(self, kernels: Kernels) -> None:
        self._kernels = kernels
        self._default: str | None = None
        self._default_lock = trio.Lock()

    async def default_session(self) -> str:
        """This server's own session, started from the default kernelspec the first time."""
        async with self._default_lock:
            if self._default is None:
                self._default = new_session_id("default")
                try:
                    await self._kernels.start(self._default, None)
                except BaseException:
                    self._default = None
                    raise
            return self._default

    async def _session(self, session_id: str | None) -> str:
        if session_id is not None:
            return session_id
        if self._default is None:
            raise ToolError("this server has no session of its own yet: name one (list_sessions)")
        return await self.default_session()  # once it has started, if it is starting

    @telling_errors
    async def list_sessions(self) -> dict[str, Any]:
        """List the kernel sessions: id, kernel (display name and language), status (idle, busy,
        starting, exited, ...), whether a frontend is attached, working directory, and whether
        this server started it (those are shut down when the server stops)."""
        started = self._kernels.started
        sessions = await self._kernels.sessions()
        for session in sessions:
            session["started_here"] = session["session_id"] in started
            session["default"] = session["session_id"] == self._default
        return {"sessions": sessions}

    @telling_errors
    async def start_session(
        self,
        kernelspec: Annotated[
            str, Field(description="The name of the kernelspec to run (python3, ir, ...).")
        ] = "python3",
    ) -> dict[str, Any]:
        """Start a new kernel session and return its session_id, to pass to execute_code. It
        is shut down when this server stops."""
        session_id = new_session_id(kernelspec)
        await self._kernels.start(session_id, kernelspec)
        return {"session_id": session_id}

    @telling_errors
    async def execute_code(
        self,
        code: Annotated[str, Field(description="The code to run, as in a notebook cell.")],
        session_id: SessionId = None,
        timeout_seconds: Annotated[
            float | None,
            Field(
                gt=0,
                description="Interrupt the code after this many seconds (a kernel that does "
                "not stop is restarted); default: no limit.",
            ),
        ] = None,
    ) -> CallToolResult:
        """Run code in a kernel session and return its output in order: printed text, results,
        images (PNG, JPEG), and an error's traceback. State persists between calls. Executions
        in one session run one at a time, after those already queued."""
        session = session_id if session_id is not None else await self.default_session()
        return outcome_result(await self._kernels.execute(session, code, timeout_seconds))

    @telling_errors
    async def interrupt(self, session_id: SessionId = None) -> str:
        """Interrupt the code running in a session (as Ctrl-C would: Python raises
        KeyboardInterrupt); its state is kept."""
        session = await self._session(session_id)
        await self._kernels.interrupt(session)
        return f"Interrupted session {session}."

    @telling_errors
    async def restart(self, session_id: SessionId = None) -> str:
        """Restart a session's kernel: whatever runs is stopped and every variable, import and
        definition is lost; the session id stays the same."""
        session = await self._session(session_id)
        await self._kernels.restart(session)
        return f"Restarted session {session}: it has a fresh kernel."


def build_server(tools: KernelTools) -> MCPServer:
    """The MCP server offering `tools`."""
    server: MCPServer = MCPServer("kallichore", instructions=INSTRUCTIONS, version=__version__)
    read_only = ToolAnnotations(read_only_hint=True)
    server.add_tool(tools.list_sessions, structured_output=True, annotations=read_only)
    server.add_tool(tools.start_session, structured_output=True)
    server.add_tool(tools.execute_code)
    server.add_tool(tools.interrupt)
    server.add_tool(tools.restart, annotations=ToolAnnotations(destructive_hint=True))
    return server


async def serve(connection_file: Path | None) -> None:
    """Serve MCP on stdio: for the daemon that wrote `connection_file`, or else for a
    supervisor of our own, whose Python session starts at once (ready for the first call).

    Until stdin ends, or SIGTERM or SIGINT; then the kernels this server started are shut
    down, with further signals ignored meanwhile (an MCP client signals a server that has not
    exited a moment after stdin closed, and kills it a moment later)."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        kernels = daemon_kernels(connection_file) if connection_file else embedded_kernels()
        async with kernels as backend, trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_signal, signals, nursery.cancel_scope)
            tools = KernelTools(backend)
            if connection_file is None:
                nursery.start_soon(warm_up, tools)
            await serve_stdio(build_server(tools))
            nursery.cancel_scope.cancel()


async def cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


async def warm_up(tools: KernelTools) -> None:
    """Start the default session now; a failure is told again to the first call that needs it."""
    try:
        await tools.default_session()
    except EXPECTED_ERRORS as error:
        logger.warning("the default session did not start: %s", error)
