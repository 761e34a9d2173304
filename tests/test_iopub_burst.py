"""A burst of kernel output while the daemon's event loop is held up: every message arrives.

The kernel's iopub PUB drops, silently, what it cannot hand on once the daemon's iopub queue is
full, and ZeroMQ's thread fills that queue while the event loop is busy. Here the (in-process)
daemon's loop is blocked for the whole burst, whatever the machine's speed: the burst waits in
ZeroMQ's queues and then has to come out whole, on both channel APIs, with no loss notice.
(With the 10,000-message queue it had, 3,510 of these 16,000 were lost, and no notice said so.)
"""

from __future__ import annotations

import contextlib
import json
import os
import select
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio
from wsproto.utilities import LocalProtocolError

from benchmarks.workloads import small_messages_code
from benchmarks.wsclient import v1_message
from kallichore.client import KallichoreClient
from kallichore.client.events import execute_request
from kallichore.server.http import RunningServer
from kallichore.supervisor import Supervisor
from tests.conftest import TIMEOUT, TOKEN, started_session
from tests.jupyter.test_jupyter_channels import connect

# Within what the event log holds (its byte bound, ~2 KiB an event), far past the old queue.
BURST = 16_000
DISPLAY_DATA = '"display_data"'


def burst_code(count: int, fifo: Path) -> str:
    """`count` display_data messages, then a byte to `fifo` from the kernel's iopub thread once
    it has handed them all to ZeroMQ. The kernel's own queue (ZeroMQ's default, 1,000) is raised
    to 2,500 so that a kernel short of CPU drops none itself: still far below the burst."""
    return (
        "import os, zmq\n"
        "_io = get_ipython().kernel.iopub_thread\n"
        "_io.schedule(lambda: _io.socket.setsockopt(zmq.SNDHWM, 2500))\n"
        f"{small_messages_code(count)}"
        "def _sent():\n"
        f"    fd = os.open({str(fifo)!r}, os.O_WRONLY)\n"
        "    os.write(fd, b'.')\n"
        "    os.close(fd)\n"
        "_io.schedule(_sent)\n"
    )


async def count_burst(
    send: Callable[[str], Awaitable[str]],
    receive: Callable[[], Awaitable[str | bytes]],
    decode: Callable[[str | bytes], dict[str, Any]],
    fifo: Path,
) -> tuple[int, list[str]]:
    """Run the burst; the display_data messages received, and the loss notices. The count ends
    at the idle of an execution sent after it (iopub is ordered; the burst's own idle may be
    among what is lost)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        burst = await send(burst_code(BURST, fifo))
        after: str | None = None
        count, notices = 0, []
        with trio.fail_after(TIMEOUT):
            while True:
                frame = await receive()
                text = frame if isinstance(frame, str) else frame.decode(errors="replace")
                if DISPLAY_DATA in text:
                    count += 1
                    continue
                if "eventsDropped" in text or "events_dropped" in text:
                    notices.append(text)
                message = decode(frame)
                parent = (message.get("parent_header") or {}).get("msg_id")
                if (
                    parent == burst
                    and after is None
                    and message["header"]["msg_type"] == "execute_input"
                ):
                    hold_up_until_written(fd)
                    after = await send("pass")
                elif after is not None and parent == after and is_idle_status(message):
                    return count, notices
    finally:
        os.close(fd)


def is_idle_status(message: dict[str, Any]) -> bool:
    return bool(
        message["header"]["msg_type"] == "status"
        and message["content"]["execution_state"] == "idle"
    )


@contextlib.contextmanager
def close_race_ignored() -> Iterator[None]:
    """trio-websocket's reader answers a keepalive ping that came in as the client closes, which
    wsproto refuses in that state: a client-side error after everything was counted."""
    try:
        yield
    except* LocalProtocolError:
        pass


def hold_up_until_written(fd: int) -> None:
    """Block this thread, and the daemon's event loop with it, until `fd` has data."""
    readable, _, _ = select.select([fd], [], [], TIMEOUT)
    assert readable, "the kernel never finished its burst"
    assert os.read(fd, 1) == b"."


async def test_a_burst_while_the_loop_is_held_up_arrives_whole(
    client: KallichoreClient, server: RunningServer, supervisor: Supervisor, tmp_path: Path
) -> None:
    await started_session(client, "burst")
    fifo = tmp_path / "sent"
    os.mkfifo(fifo)

    with close_race_ignored():
        async with client.channels("burst") as channels:

            async def send_kallichore(code: str) -> str:
                return await channels.send(execute_request(code))

            count, notices = await count_burst(
                send_kallichore, channels.websocket.get_message, json.loads, fifo
            )
    assert (count, notices) == (BURST, [])

    kernel_id = supervisor.get("burst").spec.kernel_id
    with close_race_ignored():
        async with connect(server, kernel_id, "lab", token=TOKEN) as lab:

            async def send_jupyter(code: str) -> str:
                return await lab.send("execute_request", {"code": code, "silent": False})

            def decode_v1(frame: str | bytes) -> dict[str, Any]:
                assert isinstance(frame, bytes)
                return v1_message(frame)

            count, notices = await count_burst(send_jupyter, lab.ws.get_message, decode_v1, fifo)
    assert (count, notices) == (BURST, [])
