"""A small client of our Kallichore API for tests: httpx for HTTP, trio-websocket for channels."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
import trio_websocket

TIMEOUT = 60
IPYKERNEL_ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def new_session_body(session_id: str, **fields: Any) -> dict[str, Any]:
    """A NewSession as Positron sends it (the newer shape)."""
    body: dict[str, Any] = {
        "session_id": session_id,
        "display_name": "Python (test)",
        "language": "python",
        "username": "tester",
        "input_prompt": "",
        "continuation_prompt": "",
        "argv": IPYKERNEL_ARGV,
        "session_mode": "console",
        "working_directory": "",
        "env": [{"action": "replace", "name": "TEST_VAR", "value": "test_value"}],
        "connection_timeout": 60,
        "interrupt_mode": "message",
        "protocol_version": "5.3",
        "startup_environment": "none",
    }
    body.update(fields)
    return body


def jupyter_message(
    msg_type: str,
    content: dict[str, Any],
    channel: str = "shell",
    parent: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A client frame as Positron sends it (no `kind`)."""
    return {
        "header": {
            "msg_id": uuid.uuid4().hex[:10],
            "msg_type": msg_type,
            "session": "client-session",
            "username": "tester",
            "date": "2026-01-01T00:00:00.000Z",
            "version": "5.3",
        },
        "parent_header": parent,
        "channel": channel,
        "content": content,
        "metadata": {},
        "buffers": [],
        **extra,
    }


def execute_request(code: str) -> dict[str, Any]:
    return jupyter_message(
        "execute_request",
        {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": True,
            "stop_on_error": True,
        },
    )


class Channels:
    """A channels WebSocket that decodes frames and keeps everything it received."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any]) -> str:
        await self.ws.send_message(json.dumps(frame))
        return str(frame["header"]["msg_id"])

    async def receive(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await self.ws.get_message())
        self.received.append(frame)
        return frame

    async def until(
        self, done: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
    ) -> list[dict[str, Any]]:
        """Frames up to and including the first one for which `done` is true."""
        seen = []
        with trio.fail_after(timeout):
            while True:
                frame = await self.receive()
                seen.append(frame)
                if done(frame):
                    return seen

    async def run(self, code: str) -> list[dict[str, Any]]:
        """Execute `code`; frames until its execute_reply and iopub idle have both arrived."""
        msg_id = await self.send(execute_request(code))
        state = {"reply": False, "idle": False}

        def done(frame: dict[str, Any]) -> bool:
            if is_reply(frame, msg_id, "execute_reply"):
                state["reply"] = True
            if is_idle(frame, msg_id):
                state["idle"] = True
            return state["reply"] and state["idle"]

        return await self.until(done)


def is_reply(frame: dict[str, Any], msg_id: str, msg_type: str) -> bool:
    return (
        frame.get("kind") == "jupyter"
        and frame["header"]["msg_type"] == msg_type
        and (frame["parent_header"] or {}).get("msg_id") == msg_id
    )


def is_idle(frame: dict[str, Any], msg_id: str) -> bool:
    return is_reply(frame, msg_id, "status") and frame["content"]["execution_state"] == "idle"


def kernel_events(frames: list[dict[str, Any]], key: str) -> list[Any]:
    return [f[key] for f in frames if f.get("kind") == "kernel" and key in f]


def stream_text(frames: list[dict[str, Any]], name: str = "stdout") -> str:
    return "".join(
        f["content"]["text"]
        for f in frames
        if f.get("kind") == "jupyter"
        and f["header"]["msg_type"] == "stream"
        and f["content"]["name"] == name
    )


class Api:
    """The HTTP side, with the bearer token set."""

    def __init__(self, base_url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url
        self.token = token
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=TIMEOUT)
        self.anonymous = httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT)

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.anonymous.aclose()

    async def create(self, session_id: str, **fields: Any) -> httpx.Response:
        response = await self.http.put("/sessions", json=new_session_body(session_id, **fields))
        assert response.status_code == 200, response.text
        return response

    async def start(self, session_id: str) -> dict[str, Any]:
        response = await self.http.post(f"/sessions/{session_id}/start")
        assert response.status_code == 200, response.text
        info: dict[str, Any] = response.json()
        return info

    async def session(self, session_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/sessions/{session_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    @asynccontextmanager
    async def channels(
        self, session_id: str, *, token: str | None = "default"
    ) -> AsyncIterator[Channels]:
        token = self.token if token == "default" else token
        headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
        url = self.base_url.replace("http://", "ws://") + f"/sessions/{session_id}/channels"
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            yield Channels(ws)
