"""The Jupyter Server API's sessions: a notebook's (or console's) binding to a kernel.

jupyter_server keeps them in an in-memory SQLite table; here they are a dict, kept only while the
daemon runs (a notebook client recreates its session when it does not find it). A session holds
its kernel's id, not the kernel: a session whose kernel is gone is dropped the next time the
store is read, so a session dies with its kernel whichever API ended it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import attrs


@attrs.define
class JupyterSession:
    id: str
    path: str
    name: str
    type: str
    kernel_id: str


class JupyterSessions:
    """The sessions by id; `alive(kernel_id)` tells whether a kernel still exists."""

    def __init__(self, alive: Callable[[str], bool]) -> None:
        self._alive = alive
        self._sessions: dict[str, JupyterSession] = {}

    def add(self, path: str, name: str, type: str, kernel_id: str) -> JupyterSession:
        session = JupyterSession(str(uuid.uuid4()), path, name, type, kernel_id)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> JupyterSession | None:
        session = self._sessions.get(session_id)
        if session is not None and not self._alive(session.kernel_id):
            del self._sessions[session_id]
            return None
        return session

    def all(self) -> list[JupyterSession]:
        for session in list(self._sessions.values()):
            self.get(session.id)
        return list(self._sessions.values())

    def remove(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
