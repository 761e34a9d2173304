"""The Jupyter channels' hot path against the Kallichore channel's, in one run.

    python -m benchmarks.jupyter_hot_path [--rounds 300] [--messages 3000]

Serves an embedded daemon with two ipykernel sessions and runs the client in a subprocess (so
that the client's work does not share the server's event loop): per channel, the round trip of
`kernel_info_request` (median of `--rounds`) and the rate of iopub messages from
`for i in range(N): display(i)`. Prints one JSON object with both and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from kallichore.api.app import ServerState
from kallichore.channels.jupyter_framing import pack_v1, unpack_v1
from kallichore.server.http import serve_api
from kallichore.session.model import SessionSpec
from kallichore.supervisor import SupervisorConfig, open_supervisor

V1 = "v1.kernel.websocket.jupyter.org"
REPEATS = 5


class Channel:
    """One channels connection, Kallichore's or Jupyter's (v1), reduced to what is measured."""

    def __init__(self, ws: WebSocketConnection, jupyter: bool) -> None:
        self.ws = ws
        self.jupyter = jupyter
        self.session = uuid.uuid4().hex

    async def send(self, msg_type: str, content: dict[str, Any]) -> str:
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": msg_type, "session": self.session}
        header |= {"username": "bench", "version": "5.3"}
        if self.jupyter:
            parts = [json.dumps(p).encode() for p in (header, {}, {}, content)]
            await self.ws.send_message(pack_v1([b"shell", *parts]))
        else:
            frame: dict[str, Any] = {"header": header, "parent_header": None, "channel": "shell"}
            frame |= {"content": content, "metadata": {}, "buffers": []}
            await self.ws.send_message(json.dumps(frame))
        return msg_id

    async def receive(self) -> tuple[str, str | None, dict[str, Any]]:
        """msg_type, parent msg_id and content of the next kernel message."""
        while True:
            frame = await self.ws.get_message()
            if self.jupyter:
                assert isinstance(frame, bytes)
                _, header, parent, _, content, *_ = unpack_v1(frame)
                parent_header = json.loads(parent)
                return (
                    json.loads(header)["msg_type"],
                    parent_header.get("msg_id"),
                    json.loads(content),
                )
            data = json.loads(frame)
            if data.get("kind") == "jupyter":
                parent_header = data["parent_header"] or {}
                return data["header"]["msg_type"], parent_header.get("msg_id"), data["content"]

    async def round_trip(self) -> float:
        started = time.perf_counter()
        msg_id = await self.send("kernel_info_request", {})
        while (await self.receive())[:2] != ("kernel_info_reply", msg_id):
            pass
        return time.perf_counter() - started

    async def throughput(self, messages: int) -> float:
        """iopub messages a second, from the request to its idle."""
        code = f"for i in range({messages}): display(i)"
        started = time.perf_counter()
        msg_id = await self.send("execute_request", {"code": code, "silent": False})
        seen = 0
        while True:
            msg_type, parent, content = await self.receive()
            if parent != msg_id:
                continue
            seen += msg_type == "display_data"
            if msg_type == "status" and content.get("execution_state") == "idle":
                break
        assert seen == messages, seen
        return seen / (time.perf_counter() - started)


async def client(base: str, kernel_id: str, rounds: int, messages: int) -> None:
    """Both channels measured in turns (`REPEATS` times), so that a busy machine weighs on
    both alike; the medians of the turns."""
    ws = base.replace("http", "ws")
    jupyter_url = f"{ws}/api/kernels/{kernel_id}/channels?session_id=bench"
    results: dict[str, dict[str, list[float]]] = {}
    async with (
        open_websocket_url(f"{ws}/sessions/k/channels") as k,
        open_websocket_url(jupyter_url, subprotocols=[V1]) as j,
    ):
        channels = {"kallichore": Channel(k, jupyter=False), "jupyter_v1": Channel(j, jupyter=True)}
        for channel in channels.values():
            for _ in range(20):  # warm up
                await channel.round_trip()
        for _ in range(REPEATS):
            for name, channel in channels.items():
                times = [await channel.round_trip() for _ in range(rounds // REPEATS)]
                result = results.setdefault(name, {"rtt_median_us": [], "iopub_per_s": []})
                result["rtt_median_us"].append(statistics.median(times) * 1e6)
                result["iopub_per_s"].append(await channel.throughput(messages // REPEATS))
    kallichore, jupyter = (
        {key: statistics.median(values) for key, values in results[name].items()}
        for name in channels
    )
    ratios = {
        "rtt_jupyter_over_kallichore": jupyter["rtt_median_us"] / kallichore["rtt_median_us"],
        "iopub_jupyter_over_kallichore": jupyter["iopub_per_s"] / kallichore["iopub_per_s"],
    }
    print(json.dumps({"kallichore": kallichore, "jupyter_v1": jupyter, **ratios}, indent=2))


async def server(rounds: int, messages: int) -> None:
    with tempfile.TemporaryDirectory() as runtime:
        config = SupervisorConfig(runtime_dir=Path(runtime))
        async with open_supervisor(config) as supervisor, trio.open_nursery() as nursery:
            running = await nursery.start(serve_api, supervisor, ServerState(token=None))
            kernel_ids = {}
            for name in ("k", "j"):
                argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
                spec = SessionSpec(session_id=name, argv=argv, connection_timeout=60.0)
                session = await supervisor.create_session(spec)
                await session.start()
                kernel_ids[name] = spec.kernel_id
            argv = [sys.executable, "-m", "benchmarks.jupyter_hot_path", "--client", running.url]
            argv += [kernel_ids["j"], "--rounds", str(rounds), "--messages", str(messages)]
            await trio.run_process(argv, stdout=None, stderr=None)
            running.lifetime.request_shutdown()
            await running.finished.wait()
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", nargs=2, metavar=("URL", "KERNEL_ID"))
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    if args.client:
        url, kernel_id = args.client
        trio.run(partial(client, url, kernel_id, args.rounds, args.messages))
    else:
        trio.run(partial(server, args.rounds, args.messages))


if __name__ == "__main__":
    main()
