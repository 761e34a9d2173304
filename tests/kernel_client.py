"""Test helpers that read a session's event stream the way a client would."""

from __future__ import annotations

from collections.abc import Callable

import trio

from kallichore.jupyter.wire import Message
from kallichore.session.events import Event, JupyterEvent, Subscription

TIMEOUT = 60


async def collect_until(
    subscription: Subscription, done: Callable[[Event], bool], timeout: float = TIMEOUT
) -> list[Event]:
    """Events from `subscription` up to and including the first one for which `done` is true."""
    seen: list[Event] = []
    with trio.fail_after(timeout):
        while True:
            for event in await subscription.receive():
                seen.append(event)
                if done(event):
                    return seen


def is_idle_for(msg_id: str) -> Callable[[Event], bool]:
    """The iopub `idle` that ends the kernel's handling of request `msg_id`."""

    def check(event: Event) -> bool:
        return (
            isinstance(event, JupyterEvent)
            and event.message.msg_type == "status"
            and event.message.parent_msg_id == msg_id
            and event.message.content.get("execution_state") == "idle"
        )

    return check


def replies_to(events: list[Event], msg_id: str) -> list[Message]:
    return [
        e.message
        for e in events
        if isinstance(e, JupyterEvent) and e.message.parent_msg_id == msg_id
    ]


def of_type(messages: list[Message], msg_type: str) -> list[Message]:
    return [m for m in messages if m.msg_type == msg_type]


def stdout_text(messages: list[Message]) -> str:
    return "".join(
        m.content["text"]
        for m in messages
        if m.msg_type == "stream" and m.content.get("name") == "stdout"
    )


def is_done(msg_id: str) -> Callable[[Event], bool]:
    """True once both the execute_reply (shell) and the idle (iopub) for `msg_id` were seen.

    The two come on different sockets, so either may arrive first.
    """
    seen: set[str] = set()
    idle = is_idle_for(msg_id)

    def check(event: Event) -> bool:
        if idle(event):
            seen.add("idle")
        if (
            isinstance(event, JupyterEvent)
            and event.message.msg_type == "execute_reply"
            and event.message.parent_msg_id == msg_id
        ):
            seen.add("reply")
        return len(seen) == 2

    return check
