"""Parsing and running the subcommands: each is a function of a client, the parsed arguments
and the terminal, whose value is the exit status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence

import httpx
import trio

from kallichore.client import ApiError, KallichoreClient
from kallichore.commands.attach import attach
from kallichore.commands.daemon_address import add_address_arguments, open_client
from kallichore.commands.errors import CommandError
from kallichore.commands.listing import list_kernelspecs, list_sessions
from kallichore.commands.run import run
from kallichore.commands.sessions import start as start_session
from kallichore.commands.terminal import Terminal

Command = Callable[[KallichoreClient, argparse.Namespace, Terminal], Awaitable[int]]
COMMANDS: dict[str, Command] = {
    "ls": list_sessions,
    "start": start_session,
    "run": run,
    "kernelspecs": list_kernelspecs,
    "attach": attach,
}
SUMMARY = (
    "commands for a running daemon (kallichore COMMAND --help):\n"
    "  ls           the daemon's sessions, as a table\n"
    "  start [NAME] start a session from a kernelspec, print its id\n"
    "  run CODE|-   run code in a session, print its outputs (status 1 on an error)\n"
    "  kernelspecs  the kernels the daemon can start\n"
    "  attach [ID]  a line console on a session, beside its other clients"
)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Talk to a running kallichore daemon.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SUMMARY,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = commands.add_parser(
        "ls",
        help="the daemon's sessions",
        description="List the daemon's sessions (exited ones included): id, status, language, "
        "display name, kernel process, whether a Kallichore channels client (e.g. Positron) "
        "is connected, and when it started.",
    )
    ls.add_argument("--json", action="store_true", help="the API's session objects as JSON")
    run_parser = commands.add_parser(
        "run",
        help="run code and print its outputs",
        description="Run CODE in a session through the execution queue it shares with its other "
        "clients (whoever watches the session sees it run), printing outputs as they come: "
        "stdout to stdout, stderr and tracebacks to stderr, a result or display as its plain "
        "text. The exit status is 0 if the code ran without error, 1 otherwise (an error, a "
        "timeout, an execution aborted). The kernel's state stays for the next run. Ctrl-C "
        "interrupts the kernel.",
        epilog="Without --session: the only running session, or, when none runs, a new one "
        "from the daemon's default kernelspec (said on stderr; it stays for the next run).",
    )
    run_parser.add_argument("code", metavar="CODE", help="the code, or - to read it from stdin")
    run_parser.add_argument("-s", "--session", metavar="ID", help="the session to run it in")
    run_parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="interrupt the code after this long (the kernel is restarted if it does not stop: "
        "its state is then gone); default: no limit",
    )
    run_parser.add_argument(
        "--json",
        action="store_true",
        help="print the output items as the API streams them, one JSON object a line, the "
        'last one {"type": "result", ...} (images whole, base64)',
    )
    start = commands.add_parser(
        "start",
        help="start a session",
        description="Start a session running a kernelspec and print its id once the kernel "
        "answers. It runs until the daemon stops or a client shuts it down.",
    )
    start.add_argument(
        "kernelspec", nargs="?", help="its name (default: the daemon's default kernelspec)"
    )
    start.add_argument(
        "-s", "--session", metavar="ID", help="the session's id (default: NAME-<8 hex digits>)"
    )
    kernelspecs = commands.add_parser(
        "kernelspecs",
        help="the kernels the daemon can start",
        description="List the kernelspecs the daemon can start; * marks its default.",
    )
    kernelspecs.add_argument("--json", action="store_true", help="the API's answer as JSON")
    attach_parser = commands.add_parser(
        "attach",
        help="a line console on a session",
        description="A line console on a session: type code, see its outputs as they come, and "
        "what the session's other clients run as they run it. It is one more client of the "
        "kernel's Jupyter channels: it never displaces the session's own client (a person's "
        "Positron keeps its console). A statement runs once the kernel says it is complete "
        "(a blank line ends a block); the code's input() reads the next line. Ctrl-C "
        "interrupts the kernel, whatever it runs; Ctrl-D (end of input), exit or quit "
        "detach and leave the session running. Where the daemon serves no Jupyter channels (its "
        "API on a Unix socket), statements run through POST /execute, and only the console's "
        "own show.",
        epilog="Without ID: the only running session, or a new one from the default kernelspec.",
    )
    attach_parser.add_argument("session", nargs="?", metavar="ID", help="the session")
    for subparser in (ls, start, run_parser, kernelspecs, attach_parser):
        add_address_arguments(subparser)
    return parser


def run_command(argv: Sequence[str], prog: str = "kallichore") -> int:
    """Run the subcommand `argv` names (its first word); the exit status."""
    args = build_parser(prog).parse_args(argv)
    terminal = Terminal(sys.stdout, sys.stderr)
    try:
        return trio.run(_run, args, terminal)
    except BaseException as error:
        leaf = error
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        terminal.note(f"Error: {_explained(leaf)}")
        if not isinstance(leaf, CommandError | ApiError | httpx.TransportError | OSError):
            raise
        return 1


def _explained(error: BaseException) -> str:
    if isinstance(error, ApiError):
        return f"the daemon refused: {error}"
    if isinstance(error, httpx.TransportError | OSError):
        return f"cannot reach the daemon: {error or type(error).__name__}"
    return str(error)


async def _run(args: argparse.Namespace, terminal: Terminal) -> int:
    command = COMMANDS[args.command]
    async with open_client(args) as client:
        return await command(client, args, terminal)
