"""The agent API's sans-io parts on their own: the output collector, and the execution history
as `SessionState` keeps it (no kernel, no trio, a hand-turned clock)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kallichore.jupyter.wire import Channel, Message
from kallichore.session.history import MAX_REQUEST_BYTES, MAX_TEXT, ExecutionHistory
from kallichore.session.outputs import OutputCollector
from kallichore.session.state import Outbox, SessionState
from tests.test_state import Clock, busy, client, idle, kernel, ready_state


def stream(name: str, text: str) -> tuple[str, dict[str, Any]]:
    return "stream", {"name": name, "text": text}


def test_streams_merge_only_when_consecutive_and_of_one_name() -> None:
    collector = OutputCollector()
    fed = [
        collector.feed(*stream("stdout", "a")),
        collector.feed(*stream("stdout", "b")),
        collector.feed(*stream("stderr", "c")),
        collector.feed(*stream("stdout", "d")),
    ]
    # Fed items come as they came, for streaming; the outcome's are merged.
    assert [item["text"] for item in fed if item] == ["a", "b", "c", "d"]
    assert [(i["stream_name"], i["text"]) for i in collector.output] == [
        ("stdout", "ab"),
        ("stderr", "c"),
        ("stdout", "d"),
    ]


def test_clear_output_now_and_when_the_next_output_comes() -> None:
    collector = OutputCollector()
    collector.feed(*stream("stdout", "gone"))
    assert collector.feed("clear_output", {"wait": False}) == {
        "type": "clear_output",
        "wait": False,
    }
    assert collector.output == []
    collector.feed(*stream("stdout", "shown until replaced"))
    collector.feed("clear_output", {"wait": True})
    assert len(collector.output) == 1
    collector.feed("display_data", {"data": {"text/plain": "new"}, "metadata": {}})
    assert collector.output == [
        {"type": "display_data", "data": {"text/plain": "new"}, "metadata": {}}
    ]


def test_the_outcome_takes_the_reply_and_the_result() -> None:
    collector = OutputCollector()
    assert collector.feed("execute_input", {"code": "x"}) is None
    collector.feed("execute_result", {"data": {"text/plain": "42"}, "metadata": {}})
    collector.feed("execute_reply", {"status": "ok", "execution_count": 3})
    assert collector.outcome().to_json() == {
        "status": "ok",
        "execution_count": 3,
        "output": [{"type": "execute_result", "data": {"text/plain": "42"}, "metadata": {}}],
        "data": {"text/plain": "42"},
    }
    failed = OutputCollector()
    failed.feed("error", {"ename": "E", "evalue": "v", "traceback": ["t"]})
    failed.feed(
        "execute_reply", {"status": "error", "ename": "E", "evalue": "v", "traceback": ["t"]}
    )
    body = failed.outcome().to_json()
    assert (body["status"], body["error_name"], body["error_message"]) == ("error", "E", "v")
    assert body["error_traceback"] == ["t"]
    # A timeout says so whatever the kernel answered; no reply at all and no status: aborted.
    assert failed.outcome("timeout").status == "timeout"
    assert OutputCollector().outcome("aborted").to_json(with_output=False) == {
        "status": "aborted",
        "execution_count": None,
    }


def execute(code: str) -> Message:
    return client("execute_request", code=code, silent=False)


def run(state: SessionState, request: Message, *outputs: Message, source: str = "client") -> None:
    """The request sent, the kernel's answer, its reply before its idle."""
    state.from_client(Channel.SHELL, request, Outbox(), source=source)
    state.from_kernel(Channel.IOPUB, busy(request), Outbox())
    for output in outputs:
        state.from_kernel(Channel.IOPUB, output, Outbox())
    answer = kernel("execute_reply", request, status="ok", execution_count=1)
    state.from_kernel(Channel.SHELL, answer, Outbox())
    state.from_kernel(Channel.IOPUB, idle(request), Outbox())


def test_the_state_records_each_execution_with_its_source() -> None:
    clock = Clock()
    state = ready_state(clock=clock)
    first = execute("print(1)")
    printed = kernel("stream", first, name="stdout", text="1\n")
    run(state, first, printed, source="api")
    second = execute("1 / 0")
    state.from_client(Channel.SHELL, second, Outbox())
    queued = execute("never runs")
    state.from_client(Channel.SHELL, queued, Outbox())
    # An interrupt drops what is queued; what runs ends as the kernel says.
    state.from_client(Channel.CONTROL, client("interrupt_request"), Outbox())
    clock.now += 0.25
    # The idle may come before the reply (shell and iopub race): the reply still counts.
    state.from_kernel(Channel.IOPUB, idle(second), Outbox())
    failed = kernel("execute_reply", second, status="error", ename="ZeroDivisionError")
    state.from_kernel(Channel.SHELL, failed, Outbox())
    entries = state.history.entries()
    assert [(e["code"], e["source"], e["status"]) for e in entries] == [
        ("print(1)", "api", "ok"),
        ("1 / 0", "client", "error"),
        ("never runs", "client", "aborted"),
    ]
    assert entries[0]["output"] == [{"type": "stream", "stream_name": "stdout", "text": "1\n"}]
    assert entries[1]["duration_ms"] == 250
    assert entries[2]["duration_ms"] is None
    assert datetime.fromisoformat(entries[0]["started"]).tzinfo is not None
    assert state.history.entries(limit=1) == entries[-1:]
    assert not state.history.open


def test_an_exit_ends_what_was_running_and_the_history_is_bounded() -> None:
    state = ready_state()
    running = execute("while True: pass")
    state.from_client(Channel.SHELL, running, Outbox())
    assert state.history.entries()[0]["status"] == "running"
    state.exited(-9, "killed", Outbox())
    assert state.history.entries()[0]["status"] == "aborted"
    history = ExecutionHistory(max_executions=2)
    for n in range(3):
        history.requested(execute(str(n)), "client")
    assert [e["code"] for e in history.entries()] == ["1", "2"]
    assert len(history.open) == 2
    # A huge cell is not kept whole, nor referenced: its code is, clipped.
    huge = execute("x" * (MAX_REQUEST_BYTES + 1))
    history.requested(huge, "api")
    [entry] = history.entries(limit=1)
    assert entry["code"] == "x" * MAX_REQUEST_BYTES
    assert entry["msg_id"] == huge.msg_id


def test_output_is_clipped_and_images_are_placeholders() -> None:
    history = ExecutionHistory()
    request = execute("big")
    history.requested(request, "api")
    image = {"image/png": "iVBORw0KGgo=", "text/plain": "<Image>"}
    for message in (
        kernel("display_data", request, data=image, metadata={}),
        kernel("stream", request, name="stdout", text="y" * (MAX_TEXT + 10)),
        kernel("error", request, ename="E", evalue="v", traceback=["after the budget"]),
    ):
        history.note(message)
    [entry] = history.entries()
    shown, printed, error = entry["output"]
    assert shown["data"] == {
        "image/png": "[image/png omitted, 12 characters]",
        "text/plain": "<Image>",
    }
    assert len(printed["text"]) == MAX_TEXT - len("<Image>")
    assert error["error_name"] == "E"
    assert error["error_traceback"] == []
    assert entry["output_clipped"] is True
    # What comes past the kept bytes is not kept at all, and says so.
    flood = ExecutionHistory()
    flood.requested(request, "api")
    flood.note(kernel("stream", request, name="stdout", text="z" * 40_000))
    assert flood.entries()[0]["output"] == []
    assert flood.entries()[0]["output_clipped"] is True
