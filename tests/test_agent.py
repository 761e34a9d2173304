"""The agent API (`POST /sessions/{id}/execute`) through the real server on loopback, with real
ipykernel sessions, and `kallichore.client`'s methods for it."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from kallichore.client import (
    ApiError,
    ChannelEvent,
    ExecutionRequested,
    KallichoreClient,
    KernelMessage,
)
from kallichore.supervisor import open_supervisor
from tests.conftest import TIMEOUT, TOKEN, serve, started_session, supervisor_config

# A 1x1 PNG: binary MIME data must come back as the kernel sent it (base64), byte for byte.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
# How long an interrupted execution may take to end before its kernel is restarted.
INTERRUPT_GRACE = 1.0


@pytest.fixture
async def agent(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[KallichoreClient]:
    """A client of a served supervisor (short interrupt grace) with session `python-1` (as
    Positron makes it: interrupted by `interrupt_request`)."""
    config = supervisor_config(tmp_path / "runtime")
    config = attrs.evolve(
        config, session=attrs.evolve(config.session, interrupt_grace=INTERRUPT_GRACE)
    )
    async with open_supervisor(config) as supervisor:
        running = await serve(supervisor, nursery)
        async with KallichoreClient(running.url, token=TOKEN, timeout=TIMEOUT) as client:
            await started_session(client)
            yield client
        nursery.cancel_scope.cancel()


def wait_for(gate: Path) -> str:
    """Code that waits until the test creates `gate`: output before it cannot be the end's."""
    return f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)"


def items(outcome: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [item for item in outcome["output"] if item["type"] == kind]


async def test_outputs_come_in_order_and_state_is_kept(agent: KallichoreClient) -> None:
    code = f"""
import sys, base64
from IPython.display import Image, display
print('one'); print('two', flush=True)
print('oops', file=sys.stderr, flush=True)
print('three')
display(Image(data=base64.b64decode({base64.b64encode(PNG).decode()!r})))
answer = 6 * 7
answer
"""
    with trio.fail_after(TIMEOUT):
        outcome = await agent.execute("python-1", code)
    assert outcome["status"] == "ok"
    assert isinstance(outcome["execution_count"], int)
    assert [item["type"] for item in outcome["output"]] == [
        "stream",
        "stream",
        "stream",
        "display_data",
        "execute_result",
    ]
    first, err, last, shown, result = outcome["output"]
    assert first == {"type": "stream", "stream_name": "stdout", "text": "one\ntwo\n"}
    assert err == {"type": "stream", "stream_name": "stderr", "text": "oops\n"}
    assert last["text"] == "three\n"
    assert base64.b64decode(shown["data"]["image/png"]) == PNG
    assert result["data"]["text/plain"] == "42"
    assert outcome["data"] == result["data"]
    assert "error_name" not in outcome

    kept = await agent.execute("python-1", "answer + 1")
    assert kept["data"] == {"text/plain": "43"}
    assert kept["execution_count"] == outcome["execution_count"] + 1

    failed = await agent.execute("python-1", "print('before')\n1 / 0")
    assert failed["status"] == "error"
    assert failed["error_name"] == "ZeroDivisionError"
    assert failed["error_message"] == "division by zero"
    assert any("ZeroDivisionError" in line for line in failed["error_traceback"])
    assert [item["type"] for item in failed["output"]] == ["stream", "error"]
    assert items(failed, "error")[0]["error_name"] == "ZeroDivisionError"

    cleared = await agent.execute(
        "python-1",
        "from IPython.display import clear_output\n"
        "print('gone'); clear_output(); print('stays')\n"
        "print('going'); clear_output(wait=True); print('last')",
    )
    assert [item.get("text") for item in cleared["output"]] == ["last\n"]

    quiet = await agent.execute("python-1", "answer", silent=True)
    assert quiet["status"] == "ok"
    assert quiet["output"] == []


async def test_refusals(agent: KallichoreClient) -> None:
    with pytest.raises(ApiError) as unknown:
        await agent.execute("nobody", "1")
    assert unknown.value.status == 404
    url = agent.http.base_url.join("/sessions/python-1/execute")
    async with httpx.AsyncClient(timeout=TIMEOUT) as anonymous:
        denied = await anonymous.post(url, json={"code": "1"})
    assert denied.status_code == 401
    assert denied.content == b""
    for body in (
        {},
        {"code": 5},
        {"code": "1", "timeout_seconds": "3"},
        {"code": "1", "timeout_seconds": 0},
    ):
        bad = await agent.http.post("/sessions/python-1/execute", json=body)
        assert bad.status_code == 400, body
        assert bad.json()["code"] == "400"
    await agent.kill("python-1")
    with pytest.raises(ApiError) as stopped:
        await agent.execute("python-1", "1")
    assert stopped.value.status == 400
    assert stopped.value.code == "KS-3"


async def test_a_timeout_interrupts_and_the_next_call_works(agent: KallichoreClient) -> None:
    await agent.execute("python-1", "import time\nkept = 'yes'")
    with trio.fail_after(TIMEOUT):
        slept = await agent.execute(
            "python-1", "print('sleeping', flush=True); time.sleep(30)", timeout_seconds=0.5
        )
    assert slept["status"] == "timeout"
    assert "restarted" not in slept
    assert slept["output"][0] == {"type": "stream", "stream_name": "stdout", "text": "sleeping\n"}
    assert items(slept, "error")[0]["error_name"] == "KeyboardInterrupt"
    after = await agent.execute("python-1", "kept")
    assert after["status"] == "ok", after
    assert after["data"] == {"text/plain": "'yes'"}

    # Stuck where SIGINT cannot reach it: the kernel is restarted and its state is gone.
    with trio.fail_after(TIMEOUT):
        stuck = await agent.execute(
            "python-1",
            "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(30)",
            timeout_seconds=0.5,
        )
    assert stuck["status"] == "timeout"
    assert stuck["restarted"] is True
    fresh = await agent.execute("python-1", "'kept' in globals()")
    assert fresh["status"] == "ok"
    assert fresh["data"] == {"text/plain": "False"}
    statuses = [entry["status"] for entry in await agent.history("python-1")]
    assert statuses == ["ok", "timeout", "ok", "timeout", "ok"]


async def test_concurrent_executes_are_serialised_and_seen_by_the_attached_client(
    agent: KallichoreClient,
) -> None:
    outcomes: dict[int, dict[str, Any]] = {}

    async def run(n: int) -> None:
        code = f"import time\nfor i in range(3):\n    print({n}, i, flush=True); time.sleep(0.01)"
        outcomes[n] = await agent.execute("python-1", code)

    announced: dict[str, ExecutionRequested] = {}
    finished: list[str] = []

    def all_finished(event: ChannelEvent) -> bool:
        if isinstance(event, ExecutionRequested):
            announced[event.msg_id] = event
        elif (
            isinstance(event, KernelMessage)
            and event.msg_type == "status"
            and event.content["execution_state"] == "idle"
            and event.parent_msg_id in announced
        ):
            finished.append(event.parent_msg_id)
        return len(finished) == 5

    async with agent.channels("python-1") as channels:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(run, n)
            seen = await channels.receive_until(all_finished)
    for n, outcome in outcomes.items():
        assert outcome["output"] == [
            {"type": "stream", "stream_name": "stdout", "text": f"{n} 0\n{n} 1\n{n} 2\n"}
        ]
    counts = sorted(outcome["execution_count"] for outcome in outcomes.values())
    assert counts == list(range(counts[0], counts[0] + 5))
    assert {event.source for event in announced.values()} == {"api"}
    # The attached client saw each execution whole, one after the other, as the kernel ran it.
    inputs = [e for e in seen if isinstance(e, KernelMessage) and e.msg_type == "execute_input"]
    assert [e.parent_msg_id for e in inputs] == finished
    assert [e.content["code"] for e in inputs] == [announced[m].code for m in finished]


async def test_output_streams_as_it_comes(agent: KallichoreClient, tmp_path: Path) -> None:
    gate = tmp_path / "go-on"
    code = "print('first', flush=True)\n" + wait_for(gate) + "\nprint('second')\n'done'"
    with trio.fail_after(TIMEOUT):
        async with agent.execute_stream("python-1", code) as stream:
            first = await anext(stream)
            # The code is still waiting: this item cannot have come at the end.
            assert first == {"type": "stream", "stream_name": "stdout", "text": "first\n"}
            gate.touch()
            rest = [item async for item in stream]
    assert rest[0] == {"type": "stream", "stream_name": "stdout", "text": "second\n"}
    assert rest[1]["type"] == "execute_result"
    result = rest[-1]
    assert result["type"] == "result"
    assert result["status"] == "ok"
    assert result["data"] == {"text/plain": "'done'"}
    assert "output" not in result
    with pytest.raises(ApiError) as unknown:
        async with agent.execute_stream("nobody", "1"):
            pass
    assert unknown.value.status == 404


async def test_a_caller_that_goes_away_leaves_the_session_usable(
    agent: KallichoreClient, tmp_path: Path
) -> None:
    gate = tmp_path / "go-on"
    code = "print('waiting', flush=True)\n" + wait_for(gate)
    with trio.fail_after(TIMEOUT):
        async with agent.execute_stream("python-1", code) as stream:
            assert (await anext(stream))["text"] == "waiting\n"
        # The execution goes on without its caller, and the next one waits its turn.
        gate.touch()
        after = await agent.execute("python-1", "6 * 7")
    assert after["data"] == {"text/plain": "42"}
    [first, second] = await agent.history("python-1")
    assert (first["status"], second["status"]) == ("ok", "ok")


async def test_history_lists_api_and_client_executions(agent: KallichoreClient) -> None:
    with trio.fail_after(TIMEOUT):
        await agent.execute("python-1", "print('from the api')")
        async with agent.channels("python-1") as channels:
            await channels.execute("print('from positron')")
        kernel_id = (await agent.get_session("python-1"))["kernel_id"]
        url = f"ws://{agent.http.base_url.netloc.decode()}/api/kernels/{kernel_id}/channels"
        async with open_websocket_url(f"{url}?token={TOKEN}&session_id=lab") as lab:
            await lab.send_message(json.dumps(jupyter_execute_request("print('from lab')")))
            while json.loads(await lab.get_message())["msg_type"] != "execute_reply":
                pass
            big = (
                "from IPython.display import Image, display\nprint('y' * 5000)\n"
                f"display(Image(data={PNG!r}))"
            )
            await agent.execute("python-1", big)
            # A Jupyter client sees the agent's execution as it sees any other client's (its
            # own execute_input may still come first: iopub and shell race).
            inputs = []
            while big not in inputs:
                frame = json.loads(await lab.get_message())
                if frame["msg_type"] == "execute_input":
                    inputs.append(frame["content"]["code"])
        history = await agent.history("python-1")
    assert [(e["source"], e["code"]) for e in history[:3]] == [
        ("api", "print('from the api')"),
        ("client", "print('from positron')"),
        ("client", "print('from lab')"),
    ]
    for entry, text in zip(
        history, ["from the api\n", "from positron\n", "from lab\n"], strict=False
    ):
        assert entry["status"] == "ok"
        assert entry["output"] == [{"type": "stream", "stream_name": "stdout", "text": text}]
        assert entry["output_clipped"] is False
        assert datetime.fromisoformat(entry["started"]).tzinfo is not None
        assert entry["duration_ms"] >= 0
    counts = [entry["execution_count"] for entry in history]
    assert counts == list(range(counts[0], counts[0] + 4))
    clipped = history[3]
    assert clipped["output_clipped"] is True
    assert len(clipped["output"][0]["text"]) < 5000
    [shown] = [item for item in clipped["output"] if item["type"] == "display_data"]
    assert shown["data"]["image/png"].startswith("[image/png omitted")
    assert await agent.history("python-1", limit=2) == history[-2:]
    for limit in ("0", "x", "101"):
        bad = await agent.http.get(f"/sessions/python-1/history?limit={limit}")
        assert bad.status_code == 400


def jupyter_execute_request(code: str) -> dict[str, Any]:
    """An execute_request as a Jupyter frontend sends it on the legacy JSON protocol."""
    header = {"msg_id": "lab-1", "msg_type": "execute_request", "session": "lab", "version": "5.3"}
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {}}
    return {
        "header": header,
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": "shell",
    }
