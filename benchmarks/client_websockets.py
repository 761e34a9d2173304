"""A benchmark client on the `websockets` package (its sync or its asyncio client), in a process
of its own: `python -m benchmarks.client_websockets sync|asyncio tcp|unix ADDRESS RESOURCE`.

It speaks the protocol of `benchmarks.clients`: a line `{"ready": true}` once connected, then
for each line `{"code": ...}` on stdin, one execution (an execute_request, then every frame
until its execute_reply and iopub idle), timed here, around the WebSocket calls only, and
answered with one line of what it measured. ADDRESS is `host:port` (tcp) or a socket's path
(unix); RESOURCE the channels' path. The package's defaults are kept (it offers
permessage-deflate; kallichore does not take it), but for the frame size limit: outputs come
in large frames.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as async_connect
from websockets.asyncio.client import unix_connect as async_unix_connect
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect
from websockets.sync.client import unix_connect as sync_unix_connect

from benchmarks.wsclient import QUIET_SECONDS, TIMEOUT, Execution, Tally
from kallichore.client import execute_request


def answer(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def measured(execution: Execution) -> dict[str, Any]:
    return {
        "seconds": execution.seconds,
        "iopub_messages": execution.iopub_messages,
        "stream_bytes": execution.stream_bytes,
        "complete": execution.complete,
    }


def request(code: str) -> tuple[Tally, str]:
    """A tally started now and the execute_request's frame."""
    frame = execute_request(code)
    tally = Tally()
    tally.msg_id = frame["header"]["msg_id"]
    return tally, json.dumps(frame)


def count(tally: Tally, text: str | bytes) -> None:
    """Decode a frame (as any client of the channels must) and count it if it is the
    execution's (frames of kind `kernel` are the supervisor's events)."""
    frame = json.loads(text)
    parent = frame.get("kind") != "kernel" and frame.get("parent_header")
    if parent and parent.get("msg_id") == tally.msg_id:
        tally.add(frame["channel"], frame["header"]["msg_type"], frame["content"])


def wait_for(tally: Tally) -> float:
    """How long to wait for the next frame: once the reply is in, a lost idle ends it."""
    return QUIET_SECONDS if tally.replied else TIMEOUT


def execute_sync(websocket: SyncConnection, code: str) -> Execution:
    tally, frame = request(code)
    websocket.send(frame)
    while not tally.done:
        try:
            text = websocket.recv(timeout=wait_for(tally))
        except TimeoutError:
            break
        count(tally, text)
    return tally.result()


def run_sync(transport: str, address: str, resource: str) -> None:
    if transport == "tcp":
        websocket = sync_connect(f"ws://{address}{resource}", max_size=None)
    else:
        websocket = sync_unix_connect(address, f"ws://localhost{resource}", max_size=None)
    with websocket:
        answer({"ready": True})
        for line in sys.stdin:
            answer(measured(execute_sync(websocket, json.loads(line)["code"])))


async def execute_async(websocket: AsyncConnection, code: str) -> Execution:
    tally, frame = request(code)
    await websocket.send(frame)
    while not tally.done:
        try:
            async with asyncio.timeout(wait_for(tally)):
                text = await websocket.recv()
        except TimeoutError:
            break
        count(tally, text)
    return tally.result()


async def run_async(transport: str, address: str, resource: str) -> None:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    if transport == "tcp":
        opening = async_connect(f"ws://{address}{resource}", max_size=None)
    else:
        opening = async_unix_connect(address, f"ws://localhost{resource}", max_size=None)
    async with opening as websocket:
        answer({"ready": True})
        while line := await commands.readline():
            answer(measured(await execute_async(websocket, json.loads(line)["code"])))


def main(argv: list[str]) -> None:
    flavour, transport, address, resource = argv
    if flavour == "sync":
        run_sync(transport, address, resource)
    else:
        asyncio.run(run_async(transport, address, resource))


if __name__ == "__main__":
    main(sys.argv[1:])
