"""`kallichore ls` and `kallichore kernelspecs`: what a daemon has, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from kallichore.client import KallichoreClient
from kallichore.commands.terminal import Terminal

SESSION_COLUMNS = ("SESSION", "STATUS", "LANGUAGE", "NAME", "PID", "CLIENT", "STARTED")
KERNELSPEC_COLUMNS = ("NAME", "LANGUAGE", "DISPLAY NAME")


async def list_sessions(
    client: KallichoreClient, args: argparse.Namespace, terminal: Terminal
) -> int:
    """The daemon's sessions, one a row (`--json`: as the API gives them)."""
    sessions = await client.list_sessions()
    rows = [
        (
            s["session_id"],
            s["status"],
            s["language"],
            s["display_name"],
            str(s.get("process_id") or "-"),
            "connected" if s["connected"] else "-",
            _local_time(s["started"]),
        )
        for s in sessions
    ]
    if not (rows or args.json):
        terminal.note("no sessions (start one: kallichore start, or any client of the daemon)")
        return 0
    return _show(terminal, sessions if args.json else None, SESSION_COLUMNS, rows)


async def list_kernelspecs(
    client: KallichoreClient, args: argparse.Namespace, terminal: Terminal
) -> int:
    """The kernelspecs the daemon can start, its default marked with `*`."""
    specs = await client.kernelspecs()
    default = specs.get("default")
    rows = [
        (
            name + (" *" if name == default else ""),
            entry["spec"].get("language", ""),
            entry["spec"].get("display_name", ""),
        )
        for name, entry in sorted(specs["kernelspecs"].items())
    ]
    return _show(terminal, specs if args.json else None, KERNELSPEC_COLUMNS, rows)


def _show(
    terminal: Terminal, answer: object, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> int:
    """The API's `answer` as JSON if there is one, else the table."""
    if answer is not None:
        terminal.out.write(json.dumps(answer, indent=2) + "\n")
    else:
        terminal.out.write(table(columns, rows))
    return 0


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart, a header line first."""
    lines = [tuple(columns), *(tuple(str(cell) for cell in row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in lines
    )


def _local_time(iso: str) -> str:
    """An ISO 8601 time as the local date and time to the minute (as given if unreadable)."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso
