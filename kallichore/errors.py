"""Errors of the supervisor, each tagged with Kallichore's stable `KS-<n>` code.

The codes are part of the wire contract (clients show them), so they live here, below every
layer that raises them, rather than in the HTTP layer that serialises them.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(Enum):
    """Kallichore's append-only list of error kinds; the wire code is `KS-<position>`."""

    SESSION_EXISTS = 0
    SESSION_NOT_FOUND = 1
    SESSION_RUNNING = 2
    SESSION_NOT_RUNNING = 3
    PROCESS_NOT_FOUND = 4
    PROCESS_START_FAILED = 5
    SESSION_CONNECTION_FAILED = 6
    SESSION_CONNECTION_TIMEOUT = 7
    PROCESS_ABNORMAL_EXIT = 8
    SESSION_CREATE_FAILED = 9
    SESSION_INTERRUPT_FAILED = 10
    ZMQ_PROXY_ERROR = 11
    NO_PROCESS = 12
    RESTART_FAILED = 13
    EXITED_BEFORE_CONNECTION = 14
    NO_KERNEL_INFO = 15
    START_FAILED = 16
    HANDSHAKE_FAILED = 17
    NO_CONNECTION_INFO = 18
    KERNEL_PATH_NOT_FOUND = 19

    @property
    def wire(self) -> str:
        return f"KS-{self.value}"


class KallichoreError(Exception):
    """An operation on the supervisor or a session failed in a way the caller should be told."""

    def __init__(self, code: ErrorCode, message: str, details: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def __str__(self) -> str:
        text = f"{self.code.wire}: {self.message}"
        return f"{text} ({self.details})" if self.details else text


class StartupError(KallichoreError):
    """A kernel failed to start; carries its exit code (if it ended) and everything it printed."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        details: str | None = None,
        *,
        exit_code: int | None = None,
        output: str = "",
    ) -> None:
        super().__init__(code, message, details)
        self.exit_code = exit_code
        self.output = output

    def __str__(self) -> str:
        text = super().__str__()
        if self.exit_code is not None:
            text += f" [exit code {self.exit_code}]"
        if self.output:
            text += "\n--- kernel output ---\n" + self.output.rstrip("\n")
        return text
