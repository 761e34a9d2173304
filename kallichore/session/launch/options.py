"""Which launcher starts a session's kernel, and with what options: the "launcher block".

One JSON shape everywhere a launcher is chosen: a kernelspec's `metadata.kallichore`, the
`launcher` field of `PUT /sessions` and of the Jupyter API's `POST /api/kernels`. It names the
launcher and carries its options, e.g. ``{"launcher": "slurm", "partition": "debug",
"time": "01:00:00", "extra_args": ["--mem=2G"]}``. Parsed here once, with a message saying
which field is wrong, so that a bad block is a 400 before anything is started.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from kallichore.errors import ErrorCode, KallichoreError

__all__ = [
    "LauncherOptions",
    "LocalLauncher",
    "SlurmLauncher",
    "SshLauncher",
    "launcher_block",
    "parse_launcher",
]

# How long a remote kernel outlives a dropped SSH connection, waiting for us to reconnect.
DEFAULT_RECONNECT_SECONDS = 30.0


@attrs.frozen
class LocalLauncher:
    """A child process of the daemon (the default). `curve`: the kernel supports CurveZMQ
    (ipykernel >= 7), so its sockets are encrypted even on this machine."""

    curve: bool = False


@attrs.frozen
class SshLauncher:
    """A process on another host, started over the system's `ssh` client.

    `host` is what `ssh` takes (``host``, ``user@host`` or a Host of the user's ssh_config);
    authentication is the user's (agent, `identity_file`, ssh_config): never a password.
    """

    host: str
    port: int | None = None
    identity_file: str | None = None
    # More `ssh` arguments, e.g. ["-o", "UserKnownHostsFile=/path"].
    ssh_args: tuple[str, ...] = ()
    # The interpreter that runs our shim there; by default the kernel's own when its argv
    # starts with a Python, else `python3`. It needs pyzmq (every Python kernel has it).
    python: str | None = None
    reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS
    # The address of ours the kernel connects back to; by default the one our routing uses
    # to reach `host`.
    registration_ip: str | None = None


@attrs.frozen
class SlurmLauncher:
    """A job step on a Slurm cluster, started with `srun` (which ends when the job does)."""

    partition: str | None = None
    time: str | None = None
    # More `srun` arguments, e.g. ["--mem=2G", "--gres=gpu:1"].
    extra_args: tuple[str, ...] = ()
    python: str | None = None
    # The address of ours the kernel connects back to; by default our host name's.
    registration_ip: str | None = None


LauncherOptions = LocalLauncher | SshLauncher | SlurmLauncher

_KINDS: dict[str, type[LocalLauncher] | type[SshLauncher] | type[SlurmLauncher]] = {
    "local": LocalLauncher,
    "ssh": SshLauncher,
    "slurm": SlurmLauncher,
}


def _invalid(message: str) -> KallichoreError:
    return KallichoreError(
        ErrorCode.SESSION_CREATE_FAILED,
        f"invalid launcher: {message}",
        'a launcher is an object such as {"launcher": "ssh", "host": "gpu-box"} or '
        '{"launcher": "slurm", "partition": "debug", "time": "01:00:00"}',
    )


def _text(name: str, value: object, *, option_like: bool = False) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise _invalid(f"{name} must be a non-empty string without NUL characters")
    if not option_like and value.startswith("-"):
        # It would be read as an option of ssh or srun.
        raise _invalid(f"{name} must not start with '-'")
    return value


def _texts(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _invalid(f"{name} must be a list of strings")
    return tuple(_text(f"{name}[{i}]", item, option_like=True) for i, item in enumerate(value))


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86400:
        raise _invalid(f"{name} must be a number of seconds from 0 to 86400")
    return float(value)


def _port(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _invalid(f"{name} must be a port number from 1 to 65535")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _invalid(f"{name} must be true or false")
    return value


_FIELDS: dict[str, Any] = {
    "curve": _flag,
    "host": _text,
    "port": _port,
    "identity_file": _text,
    "ssh_args": _texts,
    "python": _text,
    "reconnect_seconds": _number,
    "registration_ip": _text,
    "partition": _text,
    "time": _text,
    "extra_args": _texts,
}


def parse_launcher(block: object) -> LauncherOptions:
    """The launcher a block names, its options checked; `KallichoreError` says what is wrong."""
    if not isinstance(block, Mapping):
        raise _invalid("it must be an object")
    kind = block.get("launcher", "local")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise _invalid(f"unknown launcher {kind!r}; one of {', '.join(_KINDS)}")
    cls = _KINDS[kind]
    known = {field.name for field in attrs.fields(cls)}
    options: dict[str, Any] = {}
    for name, value in block.items():
        if name == "launcher":
            continue
        if name not in known:
            raise _invalid(f"the {kind} launcher has no option {name!r}")
        options[name] = _FIELDS[name](name, value)
    if cls is SshLauncher and "host" not in options:
        raise _invalid("the ssh launcher needs a host")
    return cls(**options)


def launcher_block(options: LauncherOptions) -> dict[str, Any]:
    """The block that `parse_launcher` reads back as `options` (defaults left out)."""
    block: dict[str, Any] = {"launcher": next(k for k, c in _KINDS.items() if c is type(options))}
    for field in attrs.fields(type(options)):
        value = getattr(options, field.name)
        if value != field.default:
            block[field.name] = list(value) if isinstance(value, tuple) else value
    return block
