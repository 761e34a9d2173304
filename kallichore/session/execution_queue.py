"""Kallichore's execution queue: one `execute_request` at the kernel at a time.

Holding the rest in the supervisor (instead of letting them pile up in the kernel's socket)
lets clients see what is pending, and lets an interrupt discard it.
"""

from __future__ import annotations

from collections import deque

import attrs

from kallichore.jupyter.wire import Message


@attrs.frozen
class QueueSnapshot:
    """The queue as it stands: the request at the kernel, and those held back, oldest first."""

    active: Message | None
    pending: tuple[Message, ...]

    def __len__(self) -> int:
        """The number of pending requests, not counting the active one."""
        return len(self.pending)


class ExecutionQueue:
    def __init__(self) -> None:
        self.active: Message | None = None
        self.pending: deque[Message] = deque()

    def submit(self, request: Message) -> bool:
        """Take a new request; True if it should be sent to the kernel now, False if held."""
        if self.active is None:
            self.active = request
            return True
        self.pending.append(request)
        return False

    def advance(self) -> Message | None:
        """The active request is done: the next request to send, if any, becomes active."""
        self.active = self.pending.popleft() if self.pending else None
        return self.active

    def withdraw(self, msg_id: str) -> bool:
        """Take a held request back before it reaches the kernel; False if it is not held."""
        for request in self.pending:
            if request.msg_id == msg_id:
                self.pending.remove(request)
                return True
        return False

    def drop_pending(self) -> list[Message]:
        """Drop the held requests (the active one keeps its place); those dropped, in order."""
        dropped = list(self.pending)
        self.pending.clear()
        return dropped

    def clear(self) -> None:
        self.active = None
        self.pending.clear()

    def snapshot(self) -> QueueSnapshot:
        return QueueSnapshot(self.active, tuple(self.pending))

    def __len__(self) -> int:
        """The number of pending requests, not counting the active one."""
        return len(self.pending)
