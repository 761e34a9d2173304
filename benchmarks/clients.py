"""Benchmark clients on other stacks than ours: the `websockets` package (sync and asyncio) and
Node's `ws`, each in a process of its own, against the same daemon as our own client.

A client process connects to a session's channels, prints `{"ready": true}`, then runs one
execution per line `{"code": ...}` read from stdin and answers each with one line: the seconds
it took (timed in the client, around its WebSocket calls only), the iopub messages and stream
bytes it counted, and whether the idle came; or `{"error": ...}`. The pipes are outside the
timing, so each stack is measured as its users would see it.
"""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

import trio

from benchmarks.environment import PACKAGE_DIR, REPO_DIR, Processes
from benchmarks.wsclient import QUIET_SECONDS, TIMEOUT, Execution

# The `ws` package: tests/js's (`npm ci --prefix tests/js` installs it; CI does).
NODE_MODULES = REPO_DIR / "tests" / "js" / "node_modules"
READY_SECONDS = 60.0


class ClientFailed(Exception):
    """The client process answered an error, or ended."""


def client_argv(stack: str, transport: str, address: str, resource: str) -> list[str]:
    """How to start the client of `stack` ("websockets-sync", "websockets-asyncio" or
    "node-ws") for a transport ("tcp": address is host:port; "unix": a socket's path)."""
    if stack == "node-ws":
        node = shutil.which("node")
        if node is None or not (NODE_MODULES / "ws").is_dir():
            raise RuntimeError(
                "the node-ws client needs node and tests/js's packages: npm ci --prefix tests/js"
            )
        script = str(PACKAGE_DIR / "client_ws.mjs")
        return [node, script, str(NODE_MODULES), transport, address, resource, str(QUIET_SECONDS)]
    flavour = stack.removeprefix("websockets-")
    module = "benchmarks.client_websockets"
    return [sys.executable, "-m", module, flavour, transport, address, resource]


class ClientProcess:
    """One client process, connected to one session's channels."""

    def __init__(self, processes: Processes, process: trio.Process, name: str) -> None:
        self.processes = processes
        self.process = process
        self.name = name
        self._buffer = b""

    @classmethod
    async def start(cls, processes: Processes, argv: list[str], name: str) -> ClientProcess:
        process = await processes.spawn(argv, name, cwd=REPO_DIR, piped=True)
        client = cls(processes, process, name)
        try:
            with trio.fail_after(READY_SECONDS):
                await client._answer()
        except BaseException:
            await client.aclose()
            raise
        return client

    async def execute(self, code: str) -> Execution:
        assert self.process.stdin is not None
        try:
            await self.process.stdin.send_all(json.dumps({"code": code}).encode() + b"\n")
        except trio.BrokenResourceError as error:
            raise ClientFailed(f"{self.name} is gone: {self._log()}") from error
        with trio.fail_after(TIMEOUT):
            measured = await self._answer()
        return Execution(
            measured["seconds"],
            measured["iopub_messages"],
            measured["stream_bytes"],
            measured["complete"],
        )

    async def _answer(self) -> dict[str, Any]:
        """The client's next line, decoded; ClientFailed if it is an error or never comes."""
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            data = await self.process.stdout.receive_some()
            if not data:
                raise ClientFailed(f"{self.name} ended: {self._log()}")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        document: dict[str, Any] = json.loads(line)
        if "error" in document:
            raise ClientFailed(f"{self.name}: {document['error']}")
        return document

    def _log(self) -> str:
        """The last line the client wrote to its log: the exception that ended it, if any."""
        lines = self.processes.log_text(self.name).strip().splitlines()
        return lines[-1] if lines else "(nothing in its log)"

    async def aclose(self) -> None:
        await self.processes.stop(self.process, grace=5.0)
