"""Which session `run` and `attach` act on: the one named, else the only one running, else a
new one from the daemon's default kernelspec (so that `kallichore run CODE` works on a fresh
daemon, and the next call finds the same kernel, its state kept)."""

from __future__ import annotations

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
    kernel_name = (await client.kernelspecs())["default"]
    started = await client.start_kernelspec(kernel_name)
    terminal.note(f"started session {started} (kernelspec {kernel_name})")
    return await client.get_session(started)
