"""`kallichore mcp`: its flags, and a clear word when the MCP SDK is not installed."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import httpx
import trio

from kallichore.client import ApiError

INSTALL_HINT = (
    "Error: `kallichore mcp` needs the MCP SDK, version 2 (the `mcp` package), which is not "
    "installed here. Install kallichore's `mcp` extra: pip install 'kallichore[mcp]' (from a "
    "clone of kallichore: pip install '.[mcp]'), or the SDK itself: pip install 'mcp>=2.3,<3'."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kallichore mcp",
        description=(
            "A Model Context Protocol server on stdio, for an MCP client (an AI assistant or "
            "agent) to start: its tools list_sessions, start_session, execute_code, interrupt "
            "and restart run code in Jupyter kernels. With --connection-file it drives that "
            "daemon's sessions; without, it runs its own kernels in this process, starting a "
            "Python one at once. When stdin ends, or on SIGTERM or SIGINT, it shuts down the "
            "kernels it started (never a daemon's others) and exits."
        ),
    )
    parser.add_argument(
        "--connection-file",
        type=Path,
        help="the connection file of a running daemon (its --connection-file): use its sessions",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="what to log on stderr (default: %(default)s)",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        from kallichore.mcp.server import serve  # noqa: PLC0415 (the SDK is optional)
    except ImportError as error:
        if error.name is None or error.name.split(".")[0] not in ("mcp", "mcp_types"):
            raise
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(serve, args.connection_file)
    except (OSError, ValueError, httpx.HTTPError, ApiError) as error:
        # Mostly before serving: the connection file cannot be read, or its daemon reached.
        where = f"{args.connection_file}: " if args.connection_file else ""
        print(f"Error: {where}{error}", file=sys.stderr)
        return 1
    return 0
