"""`kallichore run`: code through a session's execution queue, its outputs as they come.

The code goes through `POST /sessions/{id}/execute`, streamed: it waits its turn behind the
session's other clients' executions and is announced to them, so whoever watches the session
sees what ran. Ctrl-C interrupts the kernel (the code then ends with KeyboardInterrupt). The
exit status is 0 if the code ran without error, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import trio

from kallichore.client import ExecuteOptions, KallichoreClient
from kallichore.commands.sessions import choose_session
from kallichore.commands.terminal import Terminal


async def run(client: KallichoreClient, args: argparse.Namespace, terminal: Terminal) -> int:
    code = sys.stdin.read() if args.code == "-" else args.code
    session_id = (await choose_session(client, args.session, terminal))["session_id"]
    result: dict[str, Any] = {}
    error_shown = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_interrupt_on_ctrl_c, client, session_id)
        options: ExecuteOptions = {} if args.timeout is None else {"timeout_seconds": args.timeout}
        async with client.execute_stream(session_id, code, **options) as items:
            async for item in items:
                if args.json:
                    terminal.out.write(json.dumps(item) + "\n")
                    terminal.out.flush()
                if item.get("type") == "result":
                    result = item
                elif not args.json:
                    terminal.show(item)
                    error_shown = error_shown or item.get("type") == "error"
        nursery.cancel_scope.cancel()
    if not args.json:
        _explain(result, terminal, error_shown=error_shown, timeout=args.timeout)
    return 0 if result.get("status") == "ok" else 1


def _explain(
    result: dict[str, Any], terminal: Terminal, *, error_shown: bool, timeout: float | None
) -> None:
    """Say why an execution did not end well, unless its traceback already did."""
    status = result.get("status")
    if status == "error" and not error_shown:
        terminal.note(f"{result.get('error_name')}: {result.get('error_message')}")
    elif status == "timeout":
        what = (
            "interrupted and restarted (its state is gone)"
            if result.get("restarted")
            else "interrupted"
        )
        terminal.note(f"timed out after {timeout:g} s: the kernel was {what}")
    elif status == "aborted":
        terminal.note("aborted: the kernel did not run it (an earlier execution failed)")


async def _interrupt_on_ctrl_c(client: KallichoreClient, session_id: str) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            await client.interrupt(session_id)
