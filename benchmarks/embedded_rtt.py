"""Round trip of execute_request("1") through the embedded API vs jupyter_client, interleaved.

Both clients talk to an ipykernel of the same kind; batches alternate (A B A B ...) so the
machine's drift hits both alike. A round trip ends when both the execute_reply and the iopub
`idle` for the request have arrived.

    python benchmarks/embedded_rtt.py [--batches 10] [--per-batch 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio
from jupyter_client.manager import KernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kallichore import JupyterEvent, KernelSession, SessionSpec, open_supervisor, python_kernelspec


async def kallichore_batch(session: KernelSession, count: int) -> list[float]:
    times = []
    with session.events.subscribe(backlog=False) as events:
        for _ in range(count):
            start = time.perf_counter()
            msg_id = await session.execute("1")
            replied = idle = False
            while not (replied and idle):
                for event in await events.receive():
                    if isinstance(event, JupyterEvent) and event.message.parent_msg_id == msg_id:
                        replied |= event.message.msg_type == "execute_reply"
                        idle |= (
                            event.message.msg_type == "status"
                            and event.message.content["execution_state"] == "idle"
                        )
            times.append(time.perf_counter() - start)
    return times


def jupyter_client_batch(client: Any, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        msg_id = client.execute("1")
        replied = idle = False
        while not replied:
            reply = client.get_shell_msg(timeout=30)
            replied = reply["parent_header"].get("msg_id") == msg_id
        while not idle:
            message = client.get_iopub_msg(timeout=30)
            idle = (
                message["parent_header"].get("msg_id") == msg_id
                and message["msg_type"] == "status"
                and message["content"]["execution_state"] == "idle"
            )
        times.append(time.perf_counter() - start)
    return times


async def main(batches: int, per_batch: int) -> None:
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel()
    client = manager.blocking_client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    try:
        async with open_supervisor() as supervisor:
            session = await supervisor.create_session(
                SessionSpec.from_kernelspec("bench", python_kernelspec())
            )
            await session.start()
            await kallichore_batch(session, 20)
            jupyter_client_batch(client, 20)
            ours: list[float] = []
            theirs: list[float] = []
            for _ in range(batches):
                ours += await kallichore_batch(session, per_batch)
                theirs += jupyter_client_batch(client, per_batch)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    ours_ms = statistics.median(ours) * 1000
    theirs_ms = statistics.median(theirs) * 1000
    print(f"round trips per client: {len(ours)}")
    print(f"kallichore embedded     median {ours_ms:.2f} ms")
    print(f"jupyter_client blocking median {theirs_ms:.2f} ms")
    print(f"ratio embedded / jupyter_client: {ours_ms / theirs_ms:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--per-batch", type=int, default=50)
    arguments = parser.parse_args()
    trio.run(main, arguments.batches, arguments.per_batch)
