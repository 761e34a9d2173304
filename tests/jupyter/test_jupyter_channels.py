"""The Jupyter channels WebSocket on a real daemon with a real ipykernel, from a raw client.

The client here is trio-websocket and the framings' layout, nothing of our server's code but the
unpacking of frames (checked against jupyter_server's own in test_jupyter_framing).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from benchmarks.wsclient import v1_message
from kallichore.channels.jupyter_framing import pack_legacy, pack_v1, unpack_legacy
from kallichore.client import KallichoreClient
from kallichore.server.http import RunningServer
from kallichore.session.events import EVENT_OVERHEAD_BYTES
from kallichore.session.kernel_session import KernelSession
from kallichore.session.model import RestartOrigin, Status
from kallichore.supervisor import Supervisor, open_supervisor
from tests.conftest import (
    IPYKERNEL_ARGV,
    TIMEOUT,
    TOKEN,
    is_reply,
    kernel_events,
    new_session_body,
    serve,
    supervisor_config,
    until,
)

V1 = "v1.kernel.websocket.jupyter.org"
# Upgrades given up on before and after the live one, in the test of their waiting.
GIVEN_UP = 4
ECHO_COMM = """
def _echo(comm, open_msg):
    @comm.on_msg
    def _(msg):
        reversed_buffers = [bytes(b)[::-1] for b in msg["buffers"]]
        comm.send({"echo": msg["content"]["data"]}, buffers=reversed_buffers)
get_ipython().kernel.comm_manager.register_target("echo", _echo)
"""


class JupyterClient:
    """One channels connection, as a Jupyter frontend uses it (`session` is its session_id)."""

    def __init__(self, ws: WebSocketConnection, session: str) -> None:
        self.ws = ws
        self.session = session
        self.v1 = ws.subprotocol == V1

    async def send(
        self, msg_type: str, content: dict[str, Any], buffers: list[bytes] | None = None
    ) -> str:
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": msg_type, "session": self.session}
        header |= {"username": "u", "version": "5.3", "date": "2026-01-01T00:00:00Z"}
        parts = [json.dumps(p).encode() for p in (header, {}, {}, content)]
        if self.v1:
            await self.ws.send_message(pack_v1([b"shell", *parts, *(buffers or [])]))
            return msg_id
        message = {"header": header, "parent_header": {}, "metadata": {}, "content": content}
        if buffers:
            body = json.dumps({**message, "channel": "shell"}).encode()
            await self.ws.send_message(pack_legacy([body, *buffers]))
        else:  # no channel: shell, as jupyter_server assumes
            await self.ws.send_message(json.dumps({**message, "buffers": {}}))
        return msg_id

    async def receive(self) -> dict[str, Any]:
        frame = await self.ws.get_message()
        if self.v1:
            assert isinstance(frame, bytes)
            return v1_message(frame)
        if isinstance(frame, str):
            message: dict[str, Any] = json.loads(frame)
            return message
        first, *buffers = unpack_legacy(frame)
        return {**json.loads(first), "buffers": buffers}

    async def until(self, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Messages up to the first that is `done`."""
        seen = []
        with trio.fail_after(TIMEOUT):
            while True:
                seen.append(await self.receive())
                if done(seen[-1]):
                    return seen

    async def execute(self, code: str) -> list[dict[str, Any]]:
        """Run `code`; the messages up to both its idle and its reply."""
        msg_id = await self.send("execute_request", {"code": code, "silent": False})
        return await self.until_replied_and_idle(msg_id)

    async def until_replied_and_idle(self, msg_id: str) -> list[dict[str, Any]]:
        """The messages up to both the reply to `msg_id` and its idle status, in either order
        (shell and iopub are not ordered with each other)."""
        seen: list[dict[str, Any]] = []

        def done(message: dict[str, Any]) -> bool:
            seen.append(message)
            replied = any(m["header"]["msg_type"] == "execute_reply" for m in seen)
            return replied and any(is_idle(m, msg_id) for m in seen)

        await self.until(done)
        return seen


def is_idle(message: dict[str, Any], msg_id: str) -> bool:
    header, parent = message["header"], message["parent_header"]
    if header["msg_type"] != "status" or parent.get("msg_id") != msg_id:
        return False
    return bool(message["content"]["execution_state"] == "idle")


def of_type(messages: list[dict[str, Any]], msg_type: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["header"]["msg_type"] == msg_type]


@asynccontextmanager
async def connect(
    server: RunningServer, kernel_id: str, session: str, *, v1: bool = True, **auth: str
) -> AsyncIterator[JupyterClient]:
    query = f"session_id={session}" + "".join(f"&{k}={v}" for k, v in auth.items() if k == "token")
    headers = [(b"Authorization", auth["header"].encode())] if "header" in auth else None
    url = server.url.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels?{query}"
    async with open_websocket_url(
        url, subprotocols=[V1] if v1 else [], extra_headers=headers
    ) as ws:
        yield JupyterClient(ws, session)


async def kernel(client: KallichoreClient, supervisor: Supervisor, session_id: str) -> str:
    """Start a kernel through the Kallichore API; its Jupyter kernel id."""
    await client.create_session(**new_session_body(session_id))
    await client.start(session_id)
    return supervisor.get(session_id).spec.kernel_id


async def test_v1_execute_comm_buffers_and_fan_out(
    client: KallichoreClient, server: RunningServer, supervisor: Supervisor
) -> None:
    kernel_id = await kernel(client, supervisor, "fan")
    async with (
        connect(server, kernel_id, "lab-a", token=TOKEN) as a,
        connect(server, kernel_id, "lab-b", header=f"Bearer {TOKEN}") as b,
    ):
        assert a.v1
        headers = {"Authorization": f"token {TOKEN}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
            model = (await http.get(f"/api/kernels/{kernel_id}")).json()
        assert model["connections"] == 2
        messages = await a.execute("6*7")
        [result] = of_type(messages, "execute_result")
        assert result["content"]["data"]["text/plain"] == "42"
        assert result["channel"] == "iopub"
        assert set(result["header"]) >= {"msg_id", "msg_type", "session", "username", "version"}
        [reply] = [m for m in messages if m["channel"] == "shell"]
        assert reply["header"]["msg_type"] == "execute_reply"
        assert reply["parent_header"]["session"] == "lab-a"
        # b saw the iopub of a's execution, and no reply of a's.
        seen_by_b = await b.until(lambda m: m["header"]["msg_type"] == "execute_result")
        assert of_type(seen_by_b, "execute_result")[0]["content"] == result["content"]
        [registered] = [m for m in await b.execute(ECHO_COMM) if m["channel"] == "shell"]
        assert registered["parent_header"]["session"] == "lab-b"
        await b.send("comm_open", {"comm_id": "c1", "target_name": "echo", "data": {}})
        await b.send("comm_msg", {"comm_id": "c1", "data": {"n": 1}}, [b"\x00\x01\xff", b"ab"])
        echoed = await b.until(lambda m: m["header"]["msg_type"] == "comm_msg")
        assert echoed[-1]["content"]["data"] == {"echo": {"n": 1}}
        assert echoed[-1]["buffers"] == [b"\xff\x01\x00", b"ba"]
        # a's stream holds b's iopub but none of b's replies.
        later = await a.until(lambda m: m["header"]["msg_type"] == "comm_msg")
        assert all(m["channel"] == "iopub" for m in later)


def gated(code: str, gate: Path) -> str:
    """`code`, run once `gate` exists: output that begins after the client has gone."""
    return f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)\n{code}"


async def open_gate_and_wait_idle(gate: Path, session: KernelSession) -> None:
    gate.touch()
    with trio.fail_after(TIMEOUT):
        while session.status is not Status.IDLE:
            await trio.sleep(0.05)


async def test_legacy_buffers_replay_after_reconnect_and_discard(
    client: KallichoreClient, server: RunningServer, supervisor: Supervisor, tmp_path: Path
) -> None:
    kernel_id = await kernel(client, supervisor, "replay")
    async with connect(server, kernel_id, "nb", v1=False, header=f"token {TOKEN}") as nb:
        assert not nb.v1
        messages = await nb.execute("6*7")
        [result] = of_type(messages, "execute_result")
        assert result["content"]["data"]["text/plain"] == "42"
        assert (result["msg_type"], result["msg_id"]) == (
            "execute_result",
            result["header"]["msg_id"],
        )
        assert result["buffers"] == []
        await nb.execute(ECHO_COMM)
        await nb.send("comm_open", {"comm_id": "c2", "target_name": "echo", "data": {}})
        await nb.send("comm_msg", {"comm_id": "c2", "data": {}}, [b"\x00legacy"])
        echoed = await nb.until(lambda m: m["header"]["msg_type"] == "comm_msg")
        assert echoed[-1]["buffers"] == [b"ycagel\x00"]
        assert echoed[-1]["channel"] == "iopub"
        code = gated("print('while away')", tmp_path / "away")
        msg_id = await nb.send("execute_request", {"code": code, "silent": False})
        await nb.until(lambda m: m["header"]["msg_type"] == "execute_input")
    # Gone while the kernel works; the same session_id comes back and gets what it missed.
    await open_gate_and_wait_idle(tmp_path / "away", supervisor.get("replay"))
    async with connect(server, kernel_id, "nb", v1=False, token=TOKEN) as nb:
        # Its output is in once its idle is (iopub keeps its order); the execute_reply comes on
        # shell, which may overtake iopub (ipykernel publishes from a thread of its own).
        missed = await nb.until(
            lambda m: (
                m["header"]["msg_type"] == "status"
                and m["parent_header"].get("msg_id") == msg_id
                and m["content"]["execution_state"] == "idle"
            )
        )
        if not of_type(missed, "execute_reply"):
            missed += await nb.until(lambda m: m["header"]["msg_type"] == "execute_reply")
        assert "while away" in "".join(m["content"].get("text", "") for m in missed)
        [reply] = of_type(missed, "execute_reply")
        assert reply["parent_header"]["msg_id"] == msg_id
        await nb.execute("print('again')")
    async with connect(server, kernel_id, "first", token=TOKEN) as first:
        await first.send("execute_request", {"code": gated("print('x')", tmp_path / "x")})
        await first.until(lambda m: m["header"]["msg_type"] == "execute_input")
    await open_gate_and_wait_idle(tmp_path / "x", supervisor.get("replay"))
    async with connect(server, kernel_id, "other", token=TOKEN) as other:
        # Nothing of first's is replayed to another client: its next message is new output.
        messages = await other.execute("print('fresh')")
        replies = [m for m in messages if m["channel"] == "shell"]
        assert [m["parent_header"]["session"] for m in replies] == ["other"]
        assert "x\n" not in [m["content"].get("text") for m in messages]


async def test_the_same_session_id_replaces_its_stale_connection(
    client: KallichoreClient, server: RunningServer, supervisor: Supervisor
) -> None:
    kernel_id = await kernel(client, supervisor, "stale")
    async with (
        connect(server, kernel_id, "s", token=TOKEN) as old,
        connect(server, kernel_id, "s", token=TOKEN) as new,
    ):
        with trio.fail_after(TIMEOUT), pytest.raises(ConnectionClosed, match="replaced"):
            await drain(old.ws)
        assert server.hubs.connections(supervisor.get("stale")) == 1
        [result] = of_type(await new.execute("6*7"), "execute_result")
        assert result["content"]["data"]["text/plain"] == "42"


async def test_upgrades_given_up_while_the_kernel_starts_replace_nobody(
    client: KallichoreClient,
    server: RunningServer,
    supervisor: Supervisor,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """jupyter_server gives up on its channels connection while the kernel starts (leaving it
    open: tornado cannot cancel it) and asks again with the same session_id; neither what it
    left open before nor what hung up after may replace the live one once the kernel is
    ready. (A gate holds the kernel before its launch: its start takes as long as needed.)"""
    gate = tmp_path / "gate"
    wait_for_gate = f'while [ ! -e "{gate}" ]; do sleep 0.05; done; exec "$@"'
    argv = ["sh", "-c", wait_for_gate, "sh", *IPYKERNEL_ARGV]
    await client.create_session(**new_session_body("given-up", argv=argv))
    nursery.start_soon(client.start, "given-up")
    session = supervisor.get("given-up")
    with trio.fail_after(TIMEOUT):
        while session.status is not Status.STARTING:
            await trio.sleep(0.01)
    kernel_id = session.spec.kernel_id
    path = f"/api/kernels/{kernel_id}/channels?session_id=s&token={TOKEN}"
    upgrade = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()
    left_open: list[trio.SocketStream] = []

    async def ask() -> trio.SocketStream:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(upgrade)
        return stream

    async def round_trip() -> None:
        """One more request through the server: the upgrades above have been read."""
        async with httpx.AsyncClient() as http:
            await http.get(f"{server.url}/api/kernels", params={"token": TOKEN})

    # Whichever order the waiters wake in, some of them would come after the live one.
    left_open.extend([await ask() for _ in range(GIVEN_UP)])
    await round_trip()
    async with trio.open_nursery() as attempts:
        live: list[JupyterClient] = []

        async def connect_live() -> None:
            async with connect(server, kernel_id, "s", token=TOKEN) as jupyter:
                live.append(jupyter)
                await trio.sleep_forever()

        attempts.start_soon(connect_live)
        for _ in range(GIVEN_UP):
            await (await ask()).aclose()
        await round_trip()
        gate.touch()
        with trio.fail_after(TIMEOUT):
            while not live:
                await trio.sleep(0.01)
        [result] = of_type(await live[0].execute("6*7"), "execute_result")
        assert result["content"]["data"]["text/plain"] == "42"
        assert server.hubs.connections(session) == 1
        attempts.cancel_scope.cancel()
    for stream in left_open:
        await stream.aclose()


async def drain(ws: WebSocketConnection) -> None:
    while True:
        await ws.get_message()


async def test_auth_and_unknown_kernel_before_the_upgrade(
    client: KallichoreClient, server: RunningServer
) -> None:
    url = server.url.replace("http", "ws") + f"/api/kernels/{uuid.uuid4()}/channels"
    for extra in ("", "?token=wrong"):
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(url + extra):
                pass
        assert rejected.value.status_code == 401
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(f"{url}?token={TOKEN}"):
            pass
    assert rejected.value.status_code == 404
    assert json.loads(rejected.value.body or b"{}")["message"].startswith("Kernel does not exist")


async def test_loss_is_shown_past_the_bound(tmp_path: Path) -> None:
    config = supervisor_config(tmp_path)
    config = attrs.evolve(
        config, session=attrs.evolve(config.session, event_buffer_bytes=64 * EVENT_OVERHEAD_BYTES)
    )
    async with open_supervisor(config) as supervisor, trio.open_nursery() as nursery:
        server = await serve(supervisor, nursery)
        async with KallichoreClient(server.url, token=TOKEN, timeout=TIMEOUT) as client:
            kernel_id = await kernel(client, supervisor, "lossy")
            # Another client, reading all along, has every frame encoded (and cached) first.
            async with (
                connect(server, kernel_id, "watcher", token=TOKEN) as watcher,
                trio.open_nursery() as reading,
            ):
                reading.start_soon(drain, watcher.ws)
                # One message each (print's output is batched into as many as the kernel likes).
                code = gated("for i in range(500): display(i)", tmp_path / "go")
                async with connect(server, kernel_id, "nb", token=TOKEN) as nb:
                    msg_id = await nb.send("execute_request", {"code": code, "silent": False})
                    await nb.until(lambda m: m["header"]["msg_type"] == "execute_input")
                await open_gate_and_wait_idle(tmp_path / "go", supervisor.get("lossy"))
                async with connect(server, kernel_id, "nb", token=TOKEN) as nb:
                    notice = await nb.receive()
                    dropped = notice["metadata"]["kallichore"]["events_dropped"]
                    assert dropped > 0
                    assert notice["content"]["name"] == "stderr"
                    assert f"{dropped} kernel messages were lost" in notice["content"]["text"]
                    # What is left of the buffer follows, up to the idle status, which comes
                    # after all the outputs. The reply is not waited for: shell may overtake
                    # iopub (ipykernel publishes from a thread of its own), by more than the
                    # bound, and then the reply is among the lost.
                    rest = await nb.until(lambda m: is_idle(m, msg_id))
                    last = of_type(rest, "display_data")[-1]
                    assert last["content"]["data"]["text/plain"] == "499"
                reading.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_restarts_and_death_as_jupyter_server_announces_them(
    client: KallichoreClient, server: RunningServer, supervisor: Supervisor
) -> None:
    kernel_id = await kernel(client, supervisor, "life")
    session = supervisor.get("life")

    def synthetic(message: dict[str, Any]) -> bool:
        """Ours, not the kernel's own `starting` (which has no parent either)."""
        if message["header"]["msg_type"] != "status" or message["parent_header"]:
            return False
        return message["content"]["execution_state"] in {"restarting", "dead"}

    async with connect(server, kernel_id, "lab", token=TOKEN) as lab:
        # A restart the client asked for through the Jupyter API: nothing announced; one
        # through the Kallichore API: `restarting`, as jupyter_server's auto-restart.
        await session.restart(origin=RestartOrigin.JUPYTER)
        await session.restart()
        announced = [m for m in await lab.until(synthetic) if synthetic(m)]
        assert [m["content"]["execution_state"] for m in announced] == ["restarting"]
        [result] = of_type(await lab.execute("6*7"), "execute_result")
        assert result["content"]["data"]["text/plain"] == "42"
        await client.kill("life")
        dead = (await lab.until(synthetic))[-1]
        assert dead["content"]["execution_state"] == "dead"


async def test_the_kallichore_channel_beside_jupyter_clients(
    client: KallichoreClient, server: RunningServer, supervisor: Supervisor
) -> None:
    """Kallichore's client gets every kernel message (the Jupyter clients' replies too) and
    is displaced as before; the Jupyter clients are not counted or displaced by it."""
    kernel_id = await kernel(client, supervisor, "both")
    async with (
        client.channels("both") as first,
        connect(server, kernel_id, "lab", token=TOKEN) as lab,
    ):
        [reply] = [m for m in await lab.execute("6*7") if m["channel"] == "shell"]
        msg_id = reply["parent_header"]["msg_id"]
        await until(first, lambda f: is_reply(f, msg_id, "execute_reply"))
        async with client.channels("both") as second:
            displaced = await until(first, lambda f: bool(kernel_events([f], "clientDisconnected")))
            assert displaced
            assert server.hubs.connections(supervisor.get("both")) == 1
            [result] = of_type(await lab.execute("6*7"), "execute_result")
            assert result["content"]["data"]["text/plain"] == "42"
            await until(
                second, lambda f: is_reply(f, result["parent_header"]["msg_id"], "execute_reply")
            )
            # Asked once `second` reads the log: the displaced client lets go of it only after
            # its close handshake, and a request may now be answered within that window.
            assert (await client.get_session("both"))["connected"] is True
