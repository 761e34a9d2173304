"""The Jupyter Server kernels API's JSON bodies as attrs classes, and their cattrs converter.

Field names are those jupyter_server and Kernel Gateway put on the wire, and which their clients
(the gateway client of jupyter_server, @jupyterlab/services) check. Request bodies are taken as
strictly as the Kallichore API's (the same shared rules: JSON types, 32-bit integers, no NUL in
a string); fields a client may leave out have defaults and unknown fields are ignored.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs

from kallichore.api.models import optional, strict_converter
from kallichore.errors import KallichoreError

# jupyter_server's gateway client parses `last_activity` with exactly this format.
LAST_ACTIVITY_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
EXECUTION_STATES = ("starting", "idle", "busy", "restarting", "dead")


def iso_time(seconds: float) -> str:
    """Seconds since the epoch as the API writes times: UTC, microseconds, and `Z`."""
    return datetime.fromtimestamp(seconds, UTC).strftime(LAST_ACTIVITY_FORMAT)


# -- requests ---------------------------------------------------------------------------------


@attrs.define
class NewKernel:
    name: str | None = None
    path: str | None = None
    env: dict[str, str] = attrs.Factory(dict)
    # Our extension: where to launch it (a launcher block), instead of the kernelspec's own.
    launcher: dict[str, Any] | None = None


@attrs.define
class KernelRef:
    """A session's kernel: a new one of kernelspec `name`, or the running kernel `id`."""

    name: str | None = None
    id: str | None = None


@attrs.define
class NewSession:
    path: str = ""
    name: str = ""
    type: str = "notebook"
    kernel: KernelRef | None = None


@attrs.define
class SessionChanges:
    path: str | None = None
    name: str | None = None
    type: str | None = None
    kernel: KernelRef | None = None


# -- responses --------------------------------------------------------------------------------


@attrs.define
class ApiVersion:
    version: str


@attrs.define
class KernelSpecModel:
    name: str
    spec: dict[str, Any]
    resources: dict[str, str]


@attrs.define
class KernelSpecs:
    default: str
    kernelspecs: dict[str, KernelSpecModel]


@attrs.define
class KernelModel:
    id: str
    name: str
    last_activity: str
    execution_state: str
    connections: int


@attrs.define
class NotebookRef:
    path: str
    name: str


@attrs.define
class SessionModel:
    id: str
    path: str
    name: str
    type: str
    kernel: KernelModel
    notebook: NotebookRef


@attrs.define
class JupyterError:
    """An error as Kernel Gateway and jupyter_server write it."""

    message: str
    reason: str | None = None
    traceback: str | None = optional()

    @classmethod
    def of(cls, error: KallichoreError) -> JupyterError:
        return cls(error.message, error.details)


converter = strict_converter()


def _strings(value: Any, _: type) -> dict[str, str]:
    """An object of strings (an environment): names and values OS-safe strings."""
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return {
        converter.structure(name, str): converter.structure(item, str)
        for name, item in value.items()
    }


converter.register_structure_hook_func(lambda kind: kind == dict[str, str], _strings)
