"""The client's one exception: what the API answered when it said no.

The API's error object (`code`, `message`, `details`) is kept as sent, with the HTTP status, so
that a caller can branch on `code` (`KS-<n>`) and show `message` as the server meant it. A
failed start or restart also carries the kernel's exit code and everything it printed.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import httpx


@attrs.define(auto_exc=True)
class ApiError(Exception):
    """The server refused a request (`status`: its HTTP status; None for a channels refusal).

    `code` is None when the answer had no error object (a 401 or 404 has an empty body, a
    schema error a plain-text one: that text is then the `message`).
    """

    message: str
    code: str | None = None
    details: str | None = None
    status: int | None = None

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}" if self.code else self.message
        if self.details:
            text += f" ({self.details})"
        return f"HTTP {self.status}: {text}" if self.status else text

    @classmethod
    def from_body(cls, status: int | None, body: bytes, reason: str = "") -> ApiError:
        """The error a response body describes, whatever its shape."""
        try:
            data: Any = json.loads(body) if body else None
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            error = data["error"]
            return StartupFailed(
                str(error.get("message", "")),
                code=error.get("code"),
                details=error.get("details"),
                status=status,
                exit_code=data.get("exit_code"),
                output=data.get("output") or "",
            )
        if isinstance(data, dict) and "message" in data:
            return cls(
                str(data["message"]),
                code=data.get("code"),
                details=data.get("details"),
                status=status,
            )
        text = body.decode(errors="replace").strip()
        return cls(text or reason or "request failed", status=status)

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        return cls.from_body(response.status_code, response.content, response.reason_phrase)


@attrs.define(auto_exc=True)
class StartupFailed(ApiError):
    """A start or restart failed: the kernel's exit code (if it ended) and its output."""

    exit_code: int | None = None
    output: str = ""
