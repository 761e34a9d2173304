"""Serving MCP on stdio until stdin ends or we are cancelled.

The SDK reads stdin in a worker thread, which no cancellation can stop: cancelled (on SIGTERM,
say) while the client keeps stdin open, the server would wait for the client's next line
before it could stop, and with it the shutdown of its kernels. So the SDK reads a pipe of
ours, and a trio task relays the real stdin into it: when the relay ends (the real stdin ended,
or we are cancelled), the pipe's end is an end of file the SDK's thread sees at once.
"""

from __future__ import annotations

import os

import trio
from mcp.server.mcpserver import MCPServer


async def serve_stdio(server: MCPServer) -> None:
    """Serve `server` on this process's stdin and stdout until either ends."""
    stdin = os.dup(0)
    blocking = os.get_blocking(0)
    read_end, write_end = os.pipe()
    os.dup2(read_end, 0)
    os.close(read_end)
    try:
        async with (
            trio.lowlevel.FdStream(os.dup(stdin)) as source,
            trio.lowlevel.FdStream(write_end) as sink,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(relay, source, sink)
            await server.run_stdio_async()
            nursery.cancel_scope.cancel()
    finally:
        # The real stdin back as it was (FdStream made it non-blocking: a terminal's shell
        # would get that after us).
        os.dup2(stdin, 0)
        os.close(stdin)
        os.set_blocking(0, blocking)


async def relay(source: trio.lowlevel.FdStream, sink: trio.lowlevel.FdStream) -> None:
    """Copy `source` to `sink` until `source` ends or we are cancelled, then close `sink`: the
    end of file that lets the SDK's reading thread, and so the server, finish."""
    try:
        async for chunk in source:
            await sink.send_all(chunk)
    finally:
        sink.close()
