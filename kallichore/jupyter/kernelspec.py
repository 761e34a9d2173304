"""Kernelspec discovery: which kernels are installed, and how to launch them.

A kernelspec is a directory named after the kernel, holding a ``kernel.json`` that gives the
command line (with ``{connection_file}`` and ``{resource_dir}`` placeholders), environment and
interrupt mode. Directories are searched in Jupyter's standard order, so we find the same
kernels as every other Jupyter tool.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
from jupyter_core.paths import jupyter_path

logger = logging.getLogger(__name__)

PYTHON_KERNEL_NAME = "python3"
INTERRUPT_MODES = ("signal", "message")
# Jupyter refuses other names, so they never reach URLs or the session API.
_VALID_NAME = re.compile(r"^[a-z0-9._-]+$")


def _frozen(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


@attrs.frozen
class KernelSpec:
    """One installed kernel. ``resource_dir`` is None for a spec we made up ourselves."""

    name: str
    argv: tuple[str, ...]
    display_name: str
    language: str
    resource_dir: Path | None
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen)
    interrupt_mode: str = "signal"
    protocol_version: str | None = None
    metadata: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen)


class KernelSpecError(LookupError):
    """No kernelspec by that name, or its kernel.json is not valid."""


def kernelspec_dirs() -> list[Path]:
    """The directories searched for kernelspecs, highest priority first."""
    return [Path(p) for p in jupyter_path("kernels")]


def find_kernelspecs() -> dict[str, KernelSpec]:
    """Every installed kernelspec by name. Invalid ones are logged and skipped, so one broken
    install does not hide the others; a shadowed lower-priority spec then takes its place."""
    specs: dict[str, KernelSpec] = {}
    for name, kernel_json in _candidates():
        if name in specs:
            continue
        try:
            specs[name] = load_kernelspec(name, kernel_json)
        except KernelSpecError as exc:
            logger.warning("skipping kernelspec: %s", exc)
    return specs


def get_kernelspec(name: str) -> KernelSpec:
    """The kernelspec called `name` (case-insensitive). Raises `KernelSpecError`."""
    wanted = name.lower()
    error: KernelSpecError | None = None
    for candidate, kernel_json in _candidates():
        if candidate != wanted:
            continue
        try:
            return load_kernelspec(candidate, kernel_json)
        except KernelSpecError as exc:
            error = error or exc
    if error is not None:
        raise error
    raise KernelSpecError(f"no kernelspec named {name!r}")


def python_kernelspec() -> KernelSpec:
    """The installed python3 kernelspec, or else ipykernel in the interpreter running us.

    The fallback mirrors what Jupyter offers out of the box, so a machine with ipykernel but no
    installed kernelspec can still start a Python kernel.
    """
    try:
        return get_kernelspec(PYTHON_KERNEL_NAME)
    except KernelSpecError as exc:
        logger.debug("using the running interpreter as the python kernel: %s", exc)
    return KernelSpec(
        name=PYTHON_KERNEL_NAME,
        argv=(sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"),
        display_name="Python 3 (ipykernel)",
        language="python",
        resource_dir=None,
    )


def _candidates() -> Iterator[tuple[str, Path]]:
    """(name, kernel.json path) for each kernelspec directory, in priority order."""
    for directory in kernelspec_dirs():
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            kernel_json = entry / "kernel.json"
            if not kernel_json.is_file():
                continue
            name = entry.name.lower()
            if not _VALID_NAME.match(name):
                logger.warning("skipping kernelspec %s: invalid kernel name", entry)
                continue
            yield name, kernel_json


def load_kernelspec(name: str, kernel_json: Path) -> KernelSpec:
    """The kernelspec `name` from its kernel.json; `KernelSpecError` says what is wrong."""
    try:
        data = json.loads(kernel_json.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise KernelSpecError(f"{kernel_json}: cannot read: {exc}") from None

    def problem(message: str) -> KernelSpecError:
        return KernelSpecError(f"{kernel_json}: {message}")

    if not isinstance(data, dict):
        raise problem("not a JSON object")
    argv = data.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise problem("argv must be a non-empty list of strings")
    display_name = data.get("display_name")
    if not isinstance(display_name, str):
        raise problem("display_name must be a string")
    language = data.get("language", "")
    if not isinstance(language, str):
        raise problem("language must be a string")
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise problem("env must be an object of strings")
    interrupt_mode = data.get("interrupt_mode", "signal")
    if interrupt_mode not in INTERRUPT_MODES:
        raise problem(f"interrupt_mode must be one of {INTERRUPT_MODES}, got {interrupt_mode!r}")
    protocol_version = data.get("kernel_protocol_version")
    if protocol_version is not None and not isinstance(protocol_version, str):
        raise problem("kernel_protocol_version must be a string")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise problem("metadata must be an object")
    return KernelSpec(
        name=name,
        argv=tuple(argv),
        display_name=display_name,
        language=language,
        resource_dir=kernel_json.parent,
        env=env,
        interrupt_mode=interrupt_mode,
        protocol_version=protocol_version,
        metadata=metadata,
    )
