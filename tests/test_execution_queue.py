"""The execution queue on its own (Kallichore's execution_queue unit scenarios)."""

from __future__ import annotations

from kallichore.channels.kallichore_framing import queued_message
from kallichore.jupyter.wire import Message
from kallichore.session.execution_queue import ExecutionQueue


def request(code: str) -> Message:
    return Message.build("execute_request", {"code": code}, session="s")


def test_first_request_is_sent_and_later_ones_wait() -> None:
    queue = ExecutionQueue()
    first, second = request("1"), request("2")
    assert queue.submit(first) is True
    assert queue.submit(second) is False
    assert queue.active is first
    assert list(queue.pending) == [second]
    assert len(queue) == 1


def test_advance_and_clear() -> None:
    queue = ExecutionQueue()
    first, second = request("1"), request("2")
    queue.submit(first)
    queue.submit(second)
    assert queue.advance() is second
    assert queue.active is second
    assert len(queue) == 0
    assert queue.advance() is None
    assert queue.active is None
    queue.submit(first)
    queue.submit(second)
    queue.clear()
    assert queue.active is None
    assert len(queue) == 0


def test_queue_entries_as_the_api_shows_them() -> None:
    message = request("print(1)")
    entry = queued_message(message)
    assert entry["header"] == {"msg_id": message.msg_id, "msg_type": "execute_request"}
    assert entry["content"] == {"code": "print(1)"}
    assert entry["parent_header"] is None
    assert entry["channel"] == "shell"
