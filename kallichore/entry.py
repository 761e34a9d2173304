"""The `kallichore` and `kcserver` commands: a subcommand for a running daemon when the first
argument names one (`kallichore.commands`), the MCP server for `mcp` (`kallichore.mcp`, whose
SDK is an optional extra), else the daemon with kcserver's flags
(`kallichore.cli`), exactly as before there were subcommands.

Each side imports only what it needs: a subcommand starts without the server's modules, the
daemon without the client's.
"""

import sys

from kallichore.commands import NAMES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in NAMES:
        from kallichore.commands.main import run_command  # noqa: PLC0415

        return run_command(argv)
    if argv[:1] == ["mcp"]:
        from kallichore.mcp.command import main as mcp  # noqa: PLC0415

        return mcp(argv[1:])
    from kallichore.cli import main as run_daemon  # noqa: PLC0415

    return run_daemon(argv)
