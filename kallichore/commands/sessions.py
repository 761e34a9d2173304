"""Sessions by name: `kallichore start`, and which session `run` and `attach` act on: the one
named, else the only one running, else a new one from the daemon's default kernelspec (so that
`kallichore run CODE` works on a fresh daemon, and the next call finds the same kernel, its
state kept)."""

from __future__ import annotations

import argparse

from kallichore.client import ApiError, KallichoreClient
from kallichore.client.events import JSON
from kallichore.commands.errors import CommandError
from kallichore.commands.terminal import Terminal

NOT_RUNNING = ("exited", "uninitialized")


async def choose_session(
    client: KallichoreClient, session_id: str | None, terminal: Terminal
) -> JSON:
    """The chosen session, as `GET /sessions/{id}` describes it."""
    if session_id is not None:
        try:
            return await client.get_session(session_id)
        except ApiError as error:
            if error.status == 404:
                raise CommandError(f"no session {session_id} (kallichore ls lists them)") from None
            raise
    running = [s for s in await client.list_sessions() if s["status"] not in NOT_RUNNING]
    if len(running) == 1:
        return running[0]
    if running:
        names = ", ".join(s["session_id"] for s in running)
        raise CommandError(f"{len(running)} sessions are running ({names}): choose one by its id")
    started = await _start(client, None, None, terminal)
    return await client.get_session(started)


async def start(client: KallichoreClient, args: argparse.Namespace, terminal: Terminal) -> int:
    """Start a session from a kernelspec; its id on stdout, for the next commands."""
    started = await _start(client, args.kernelspec, args.session, terminal)
    terminal.out.write(started + "\n")
    return 0


async def _start(
    client: KallichoreClient, kernel_name: str | None, session_id: str | None, terminal: Terminal
) -> str:
    """The id of a new session of `kernel_name` (default: the daemon's default kernelspec),
    once its kernel answers."""
    kernel_name = kernel_name or (await client.kernelspecs())["default"]
    started = await client.start_kernelspec(kernel_name, session_id)
    terminal.note(f"started session {started} (kernelspec {kernel_name})")
    return started
