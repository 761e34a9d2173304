"""What a session is asked to run, and the states it reports."""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, Literal

import attrs

from kallichore.errors import ErrorCode, KallichoreError
from kallichore.jupyter.kernelspec import KernelSpec
from kallichore.jupyter.wire import PROTOCOL_VERSION
from kallichore.session.launch.options import LauncherOptions, LocalLauncher, parse_launcher

KernelTransport = Literal["ipc", "tcp"]


@attrs.frozen
class SessionConfig:
    """Tunables shared by every session of a supervisor."""

    # What a session's event log may hold, in bytes: the backlog of a client that does not
    # read, and the replay window of what was sent but not yet acknowledged.
    event_buffer_bytes: int = 64 * 2**20
    heartbeat_interval: float = 2.0
    # While no client watches the session, `offline` can wait: beat less often, so that many
    # idle sessions cost next to nothing.
    unattended_heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 5.0
    shutdown_grace: float = 10.0
    # How long an execution that timed out (`KernelSession.run_code`) may take to end once
    # interrupted before its kernel is restarted: a kernel stuck in C code ignores SIGINT.
    interrupt_grace: float = 5.0
    # Kernels end with the daemon that started them (the default), or, when the daemon keeps a
    # state directory, outlive it so that the next daemon can re-adopt them. The one switch
    # for everything that ties a kernel to its daemon (`process.watch_parent`; the footprint
    # marks the others detached, never to be swept).
    tied_to_daemon: bool = True
    # How kernels we launch are reached: "ipc" (Unix sockets in a private directory of the
    # run: no port to race for, out of other users' reach) or "tcp" (loopback ports). Adopted
    # kernels, and kernels that pick their own ports (JEP 66), are reached as they say.
    kernel_transport: KernelTransport = "ipc"


class Status(StrEnum):
    """A session's status, with Kallichore's names."""

    UNINITIALIZED = "uninitialized"
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    OFFLINE = "offline"
    EXITED = "exited"


class RestartOrigin(StrEnum):
    """Who restarted a kernel, which tells the Jupyter channels what their clients are told:
    jupyter_server announces `restarting` for a restart its clients did not ask for, and nothing
    for one they asked for through its REST API (they reconnect by themselves)."""

    JUPYTER = "jupyter"
    KALLICHORE = "kallichore"


class InterruptMode(StrEnum):
    """How to interrupt the kernel: SIGINT to its process group, or `interrupt_request`."""

    SIGNAL = "signal"
    MESSAGE = "message"


class SessionMode(StrEnum):
    CONSOLE = "console"
    NOTEBOOK = "notebook"
    BACKGROUND = "background"


class StartupEnvironment(StrEnum):
    """How the kernel is launched: directly, or through the user's shell (Unix only)."""

    NONE = "none"
    SHELL = "shell"
    COMMAND = "command"
    SCRIPT = "script"


class VarActionType(StrEnum):
    REPLACE = "replace"
    APPEND = "append"
    PREPEND = "prepend"


@attrs.frozen
class VarAction:
    """One step of building a kernel's environment; no separator is inserted by append/prepend."""

    action: VarActionType
    name: str
    value: str


def resolve_environment(base: Mapping[str, str], actions: Iterable[VarAction]) -> dict[str, str]:
    """Apply `actions` in order to a copy of `base`."""
    env = dict(base)
    for step in actions:
        current = env.get(step.name, "")
        if step.action is VarActionType.REPLACE:
            env[step.name] = step.value
        elif step.action is VarActionType.APPEND:
            env[step.name] = current + step.value
        else:
            env[step.name] = step.value + current
    return env


# Session ids end up in file names (connection files, sockets), so they are restricted to a
# portable file-name alphabet that still admits every id Positron generates.
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}")


def validate_session_id(session_id: str) -> str:
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise KallichoreError(
            ErrorCode.SESSION_CREATE_FAILED,
            f"invalid session id {session_id!r}",
            "a session id is 1 to 128 characters from A-Z a-z 0-9 . _ @ + = - "
            "and starts with a letter or digit",
        )
    return session_id


def validate_kernel_id(kernel_id: str) -> str:
    """A UUID in its canonical lowercase form (jupyter_server's routes match no other)."""
    try:
        canonical: str | None = str(uuid.UUID(kernel_id))
    except (ValueError, TypeError):
        canonical = None
    if canonical != kernel_id:
        raise KallichoreError(
            ErrorCode.SESSION_CREATE_FAILED,
            f"invalid kernel id {kernel_id!r}",
            "a kernel id is a UUID in its canonical form (8-4-4-4-12 lowercase hex digits)",
        )
    return kernel_id


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _var_actions(values: Iterable[VarAction]) -> tuple[VarAction, ...]:
    return tuple(values)


@attrs.frozen
class SessionSpec:
    """Everything needed to launch one kernel (Kallichore's NewSession, minus display-only fields).

    `argv` may contain `{connection_file}`, replaced at every start by the path of the
    connection file written for that start.
    """

    session_id: str = attrs.field(converter=validate_session_id)
    argv: tuple[str, ...] = attrs.field(converter=_strings)
    display_name: str = ""
    language: str = ""
    username: str = ""
    working_directory: str = ""
    env: tuple[VarAction, ...] = attrs.field(default=(), converter=_var_actions)
    connection_timeout: float = 30.0
    interrupt_mode: InterruptMode = InterruptMode.MESSAGE
    protocol_version: str = PROTOCOL_VERSION
    session_mode: SessionMode = SessionMode.CONSOLE
    input_prompt: str = ""
    continuation_prompt: str = ""
    notebook_uri: str | None = None
    startup_environment: StartupEnvironment = StartupEnvironment.NONE
    startup_environment_arg: str | None = None
    # The session's id in the Jupyter Server kernels API: a UUID, as its clients require,
    # chosen once and kept in the session's record so it survives a restart of the daemon.
    kernel_id: str = attrs.field(factory=lambda: str(uuid.uuid4()), converter=validate_kernel_id)
    # The kernelspec it was started from, by name, when it was (the Jupyter API's `name`).
    kernel_name: str = ""
    # What starts the kernel, and where: a local child process unless the request or the
    # kernelspec's `metadata.kallichore` block names another launcher.
    launcher: LauncherOptions = attrs.field(factory=LocalLauncher)

    @classmethod
    def from_kernelspec(cls, session_id: str, kernelspec: KernelSpec, **fields: Any) -> SessionSpec:
        """A spec that launches `kernelspec`; `fields` set or override the other attributes.

        As jupyter_client does, a kernelspec that runs plain `python` is run with this
        interpreter, so a supervisor started from a virtualenv gets that virtualenv's kernel.
        The kernelspec's `kernel_protocol_version` is not copied: ipykernel 7 declares 5.5 but
        does not perform the JEP 66 handshake that 5.5 asks for, so kernels get a classic
        connection file unless `protocol_version` is given. A kernel launched on another
        machine keeps its argv's `python`: our interpreter's path means nothing there.
        """
        argv = list(kernelspec.argv)
        block = kernelspec.metadata.get("kallichore")
        launcher = fields.get("launcher") or (
            LocalLauncher() if block is None else parse_launcher(block)
        )
        if argv[0] in _PYTHON_NAMES and isinstance(launcher, LocalLauncher):
            argv[0] = sys.executable
        resource_dir = str(kernelspec.resource_dir or "")
        argv = [arg.replace("{resource_dir}", resource_dir) for arg in argv]
        env = tuple(
            VarAction(VarActionType.REPLACE, name, value.replace("{resource_dir}", resource_dir))
            for name, value in kernelspec.env.items()
        )
        defaults: dict[str, Any] = {
            "kernel_name": kernelspec.name,
            "display_name": kernelspec.display_name,
            "language": kernelspec.language,
            "env": env,
            "interrupt_mode": InterruptMode(kernelspec.interrupt_mode),
            "launcher": launcher,
        }
        return cls(session_id=session_id, argv=argv, **(defaults | fields))


_PYTHON_NAMES = {"python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
