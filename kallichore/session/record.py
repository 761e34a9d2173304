"""A session's record in a state directory, as bytes and back: what a restarted daemon needs.

A record holds what survives the daemon: the spec the session was created with, its signing key
and the kernel's connection info (so a new daemon can talk to the kernel), the kernel's pid and
process start time (so a recycled pid is never mistaken for our kernel), and the status the
session had. What the kernel said is not kept: writing the event log to disk would put a file
write on the hot path, and what the kernel publishes while no daemon listens is lost anyway
(iopub drops what nobody subscribed to). Pure functions, no I/O: the state directory
(`kallichore.state_dir`) reads and writes the files.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import cattrs

from kallichore.errors import KallichoreError
from kallichore.jupyter.connection import ConnectionInfo
from kallichore.session.launch.options import (
    LauncherOptions,
    LocalLauncher,
    SlurmLauncher,
    SshLauncher,
    launcher_block,
    parse_launcher,
)
from kallichore.session.model import SessionSpec, Status

# Bumped when a field changes meaning; a record of another format is skipped, not guessed at.
FORMAT = 1


class RecordError(ValueError):
    """The bytes are not a session record this version can read."""


@attrs.frozen
class ProcessIdentity:
    """A process as it cannot be confused with another: its pid and when it started.

    `started` is the start time the kernel had when we launched it (psutil's create_time); a
    process with the same pid and another start time is somebody else's.
    """

    pid: int
    started: float


@attrs.frozen
class SessionRecord:
    spec: SessionSpec
    key: str
    # Seconds since the epoch.
    created: float
    status: Status
    working_directory: str
    # Where the latest kernel listens; None before its first start.
    connection: ConnectionInfo | None = None
    # The latest kernel's process while it runs; None when it is not running.
    process: ProcessIdentity | None = None


def _converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_unstructure_hook(ConnectionInfo, ConnectionInfo.to_dict)
    converter.register_structure_hook(ConnectionInfo, lambda data, _: _connection(data))
    for kind in (LocalLauncher, SshLauncher, SlurmLauncher):
        converter.register_unstructure_hook(kind, launcher_block)
    converter.register_structure_hook_func(
        lambda cls: cls == LauncherOptions, lambda data, _: parse_launcher(data)
    )
    return converter


def _connection(data: Any) -> ConnectionInfo:
    if not isinstance(data, dict):
        raise TypeError("connection info must be an object")
    return ConnectionInfo.from_dict(data)


_CONVERTER = _converter()


def _describe(exc: BaseException, _type: object) -> str:
    """What is wrong with one field: the validator's own message rather than cattrs's."""
    if isinstance(exc, KeyError):
        return "required field missing"
    return str(exc) or type(exc).__name__


def encode(record: SessionRecord) -> dict[str, Any]:
    """The record as a JSON object (written with the format number)."""
    document: dict[str, Any] = {"format": FORMAT}
    document.update(_CONVERTER.unstructure(record))
    return document


def decode(data: bytes) -> SessionRecord:
    """Read a record; `RecordError` says what is wrong with a corrupt or partial one."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise RecordError("not a JSON object")
    found = document.pop("format", None)
    if found != FORMAT:
        raise RecordError(f"record format {found!r}; this version reads format {FORMAT}")
    try:
        return _CONVERTER.structure(document, SessionRecord)
    except cattrs.BaseValidationError as exc:
        problems = "; ".join(cattrs.transform_error(exc, path="record", format_exception=_describe))
        raise RecordError(problems) from None
    except (KallichoreError, ValueError, TypeError) as exc:
        raise RecordError(str(exc)) from None
