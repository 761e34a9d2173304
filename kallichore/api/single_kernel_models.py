"""The bodies of the single-kernel routes (`/health`, `/kernel/*`), as attrs classes.

Their field names are those of the agent-sandbox kernel servers these routes stand in for
(`kernel_alive`, `old_pid`, `connection_file`, ...), so an agent written against one of them
works unchanged. They go through the Kallichore API's converter.
"""

from __future__ import annotations

from typing import Any

import attrs

from kallichore.api.models import optional


@attrs.define
class Health:
    status: str
    kernel_alive: bool
    kernel_pid: int | None


@attrs.define
class KernelAction:
    status: str
    message: str


@attrs.define
class KernelReset:
    status: str
    message: str
    old_pid: int | None
    new_pid: int | None
    connection_file: str


@attrs.define
class KernelConnection:
    connection_file: str
    config: dict[str, Any]


@attrs.define
class KernelStatus:
    alive: bool
    pid: int | None
    status: str
    client_connected: bool
    connection_file: str | None = optional()
