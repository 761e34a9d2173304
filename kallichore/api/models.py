"""The Kallichore API's JSON bodies as attrs classes, and the one cattrs converter for them.

Field names and enum strings are exactly those of the wire. Request bodies are structured
strictly (a number where a string belongs is an error naming the field, never silently
converted) but leniently about absence: every field Positron may leave out has a default,
so both the older (`run_in_shell`) and newer (`startup_environment`) NewSession shapes work.
Unknown fields are ignored.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar

import attrs
import cattrs

from kallichore.errors import KallichoreError, StartupError
from kallichore.jupyter.connection import ConnectionInfo
from kallichore.jupyter.wire import PROTOCOL_VERSION, JSONObject
from kallichore.session.launch.options import LauncherOptions, LocalLauncher, parse_launcher
from kallichore.session.model import (
    InterruptMode,
    SessionMode,
    SessionSpec,
    StartupEnvironment,
    VarAction,
)
from kallichore.session.resources import MAX_SAMPLE_INTERVAL_MS

T = TypeVar("T")


class BodyError(ValueError):
    """A request body that is not JSON or does not match its model; the message names the field."""


class BadValue(ValueError):
    """A value of the right JSON type that no field accepts; the message says why."""


# Integers in the API's models are 32-bit signed, as in Kallichore: anything larger is refused
# before it can reach a float conversion, a timer or a system call.
INT32 = range(-(2**31), 2**31)
# `idle_shutdown_hours`: negative is never, 0 is 30 seconds, and at most 65535, as in Kallichore.
MAX_IDLE_SHUTDOWN_HOURS = 65535


# -- requests ---------------------------------------------------------------------------------


@attrs.define
class NewSession:
    session_id: str
    argv: list[str] = attrs.Factory(list)
    display_name: str = ""
    language: str = ""
    username: str = ""
    input_prompt: str = ""
    continuation_prompt: str = ""
    session_mode: SessionMode = SessionMode.CONSOLE
    working_directory: str = ""
    notebook_uri: str | None = None
    env: list[VarAction] = attrs.Factory(list)
    connection_timeout: int = 30
    interrupt_mode: InterruptMode = InterruptMode.MESSAGE
    protocol_version: str = PROTOCOL_VERSION
    startup_environment: StartupEnvironment | None = None
    startup_environment_arg: str | None = None
    run_in_shell: bool | None = None
    # Our extension: launch this kernelspec (its argv, env and interrupt mode) instead of `argv`.
    kernel_name: str | None = None
    # Our extension: what starts the kernel and where (a launcher block, see
    # kallichore.session.launch.options); a kernelspec's own block otherwise, else local.
    launcher: dict[str, Any] | None = None

    def to_spec(self) -> SessionSpec:
        if self.connection_timeout <= 0:
            raise BodyError("connection_timeout must be a positive number of seconds")
        check_env(self.env)
        startup = self.startup_environment
        if startup is None:
            startup = StartupEnvironment.SHELL if self.run_in_shell else StartupEnvironment.NONE
        return SessionSpec(
            session_id=self.session_id,
            argv=self.argv,
            display_name=self.display_name,
            language=self.language,
            username=self.username,
            working_directory=self.working_directory,
            env=self.env,
            connection_timeout=float(self.connection_timeout),
            interrupt_mode=self.interrupt_mode,
            protocol_version=self.protocol_version,
            session_mode=self.session_mode,
            input_prompt=self.input_prompt,
            continuation_prompt=self.continuation_prompt,
            notebook_uri=self.notebook_uri,
            startup_environment=startup,
            startup_environment_arg=self.startup_environment_arg,
            launcher=LocalLauncher() if self.launcher is None else launcher_options(self.launcher),
        )


@attrs.define
class RestartSession:
    working_directory: str | None = None
    env: list[VarAction] | None = None


def launcher_options(block: dict[str, Any]) -> LauncherOptions:
    """A request's launcher block, parsed; a bad one is the request's fault (400)."""
    try:
        return parse_launcher(block)
    except KallichoreError as exc:
        raise BodyError(exc.message) from None


def check_env(actions: list[VarAction]) -> None:
    """An environment variable's name cannot be empty or hold `=` (the OS would refuse it)."""
    for action in actions:
        if not action.name or "=" in action.name:
            raise BodyError(f"env: {action.name!r} is not a valid variable name")


@attrs.define
class ExecuteCode:
    """The body of the agent API's `execute`."""

    code: str
    silent: bool = False
    store_history: bool = True
    stop_on_error: bool = True
    timeout_seconds: float | None = None

    def check(self) -> None:
        timeout = self.timeout_seconds
        if timeout is not None and not 0 < timeout < math.inf:
            raise BodyError("timeout_seconds must be a positive number of seconds")


@attrs.define
class ClientHeartbeat:
    process_id: int | None = None

    def check(self) -> None:
        if self.process_id is not None and self.process_id < 0:
            raise BodyError("process_id must not be negative")


@attrs.define
class ServerConfiguration:
    idle_shutdown_hours: int | None = None
    resource_sample_interval_ms: int | None = None
    log_level: str | None = None

    def check(self) -> None:
        """Refuse the whole change if any value is out of range, before any is applied."""
        hours = self.idle_shutdown_hours
        if hours is not None and hours > MAX_IDLE_SHUTDOWN_HOURS:
            raise BodyError(
                f"idle_shutdown_hours is too large (at most {MAX_IDLE_SHUTDOWN_HOURS}; "
                "negative: never)"
            )
        interval = self.resource_sample_interval_ms
        if interval is not None and not 0 <= interval <= MAX_SAMPLE_INTERVAL_MS:
            raise BodyError(
                f"resource_sample_interval_ms must be between 0 (never) and "
                f"{MAX_SAMPLE_INTERVAL_MS}"
            )


# -- responses --------------------------------------------------------------------------------


def optional(default: Any = None) -> Any:
    """A response field left out of the JSON when it is None (Kallichore's "opt" fields)."""
    return attrs.field(default=default, metadata={"omit_if_none": True})


@attrs.define
class ErrorBody:
    code: str
    message: str
    details: str | None = optional()

    @classmethod
    def of(cls, error: KallichoreError) -> ErrorBody:
        return cls(error.code.wire, error.message, error.details)


@attrs.define
class StartupErrorBody:
    error: ErrorBody
    exit_code: int | None = optional()
    output: str | None = optional()

    @classmethod
    def of(cls, error: KallichoreError) -> StartupErrorBody:
        if isinstance(error, StartupError):
            return cls(ErrorBody.of(error), error.exit_code, error.output or None)
        return cls(ErrorBody.of(error))


@attrs.define
class ExecutionQueueBody:
    length: int
    pending: list[JSONObject]
    active: JSONObject | None = optional()


@attrs.define
class ActiveSession:
    session_id: str
    argv: list[str]
    username: str
    display_name: str
    language: str
    interrupt_mode: InterruptMode
    initial_env: dict[str, str]
    connected: bool
    started: str
    session_mode: SessionMode
    working_directory: str
    input_prompt: str
    continuation_prompt: str
    execution_queue: ExecutionQueueBody
    status: str
    kernel_info: JSONObject
    idle_seconds: int
    busy_seconds: int
    process_id: int | None = optional()
    notebook_uri: str | None = optional()
    resource_usage: dict[str, int] | None = optional()
    socket_path: str | None = optional()
    kernel_id: str | None = optional()
    # Our extension: where a remote kernel runs (launcher, host, job_id, pid).
    launcher: dict[str, Any] | None = optional()


# Kallichore serialises ActiveSession in this order; attrs needs defaults last, so the JSON
# order is restored here.
ACTIVE_SESSION_ORDER = (
    "session_id",
    "argv",
    "process_id",
    "username",
    "display_name",
    "language",
    "interrupt_mode",
    "initial_env",
    "connected",
    "started",
    "session_mode",
    "working_directory",
    "notebook_uri",
    "input_prompt",
    "continuation_prompt",
    "execution_queue",
    "status",
    "kernel_info",
    "resource_usage",
    "idle_seconds",
    "busy_seconds",
    "socket_path",
    "kernel_id",
    "launcher",
)


@attrs.define
class SessionList:
    total: int
    sessions: list[ActiveSession]


@attrs.define
class ServerStatus:
    sessions: int
    active: int
    busy: bool
    idle_seconds: int
    busy_seconds: int
    uptime_seconds: int
    version: str
    process_id: int
    started: str
    server_id: str


# The log levels of Kallichore's configuration (`--log-level`, `GET /server_configuration`).
LOG_LEVELS = ("trace", "debug", "info", "warn", "error")


@attrs.define
class ServerConfigurationBody:
    resource_sample_interval_ms: int
    idle_shutdown_hours: int | None = optional()
    log_level: str | None = optional()


@attrs.define
class NewSessionReply:
    session_id: str


def rfc3339(timestamp: float) -> str:
    """Kallichore's timestamp format: RFC 3339 in UTC with a `Z` suffix."""
    return (
        datetime.fromtimestamp(timestamp, UTC)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


# -- the converter ----------------------------------------------------------------------------


def _strict(
    kind: type, name: str, check: Callable[[Any], None] | None = None
) -> Callable[[Any, type], Any]:
    """A hook that accepts only JSON values of `kind` (cattrs would happily call str(5)), and
    of those only what `check` lets through.

    Registered for `str`, it also receives str subclasses such as our StrEnums, which are then
    looked up by value.
    """

    def structure(value: Any, target: type) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {name}, got a boolean")
        if not isinstance(value, kind):
            raise TypeError(f"expected {name}, got {type(value).__name__}")
        if check is not None:
            check(value)
        return value if target is kind else target(value)

    return structure


def _number(value: Any, _: type) -> float:
    """A JSON number (an integer too, never a boolean) as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _int32(value: int) -> None:
    if value not in INT32:
        raise BadValue(f"expected an integer between {INT32.start} and {INT32.stop - 1}")


def _os_safe(text: str) -> None:
    """Strings become argv, environment, paths and file names: none of those can hold a NUL
    or a lone surrogate (which has no UTF-8 form), so neither is accepted anywhere."""
    if "\0" in text:
        raise BadValue("a string must not contain a NUL character")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise BadValue("a string must not contain a lone surrogate") from None


def strict_converter() -> cattrs.Converter:
    """A converter with the rules every API's bodies share: JSON types taken strictly, 32-bit
    integers, OS-safe strings, `omit_if_none` fields left out, enums as their values."""
    converter = cattrs.Converter(forbid_extra_keys=False)
    converter.register_structure_hook(str, _strict(str, "a string", _os_safe))
    converter.register_structure_hook(int, _strict(int, "an integer", _int32))
    converter.register_structure_hook(bool, _strict(bool, "a boolean"))
    converter.register_structure_hook(float, _number)

    def is_list(kind: Any) -> bool:
        return typing.get_origin(kind) is list

    def list_hook(kind: Any) -> Callable[[Any, type], Any]:
        (item,) = typing.get_args(kind)

        def structure(value: Any, _: type) -> list[Any]:
            if not isinstance(value, list):
                raise TypeError(f"expected an array, got {type(value).__name__}")
            return [converter.structure(element, item) for element in value]

        return structure

    converter.register_structure_hook_factory(is_list, list_hook)

    def is_dict(kind: Any) -> bool:
        return typing.get_origin(kind) is dict or kind is dict

    def dict_hook(kind: Any) -> Callable[[Any, type], Any]:
        def structure(value: Any, _: type) -> dict[str, Any]:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {type(value).__name__}")
            return value

        return structure

    converter.register_structure_hook_factory(is_dict, dict_hook)

    def unstructure_attrs(kind: type) -> Callable[[Any], dict[str, Any]]:
        fields = attrs.fields(kind)

        def unstructure(value: Any) -> dict[str, Any]:
            result: dict[str, Any] = {}
            for field in fields:
                item = getattr(value, field.name)
                if item is None and field.metadata.get("omit_if_none"):
                    continue
                result[field.name] = converter.unstructure(item)
            return result

        return unstructure

    converter.register_unstructure_hook_factory(attrs.has, unstructure_attrs)
    converter.register_unstructure_hook(Enum, lambda value: value.value)
    return converter


def _make_converter() -> cattrs.Converter:
    converter = strict_converter()
    unstructure_attrs = converter.get_unstructure_hook(ActiveSession)

    def unstructure_session(value: ActiveSession) -> dict[str, Any]:
        body: dict[str, Any] = unstructure_attrs(value)
        return {key: body[key] for key in ACTIVE_SESSION_ORDER if key in body}

    converter.register_unstructure_hook(ActiveSession, unstructure_session)
    converter.register_unstructure_hook(ConnectionInfo, ConnectionInfo.to_dict)
    return converter


converter = _make_converter()


def _problem(error: BaseException, kind: type | None) -> str:
    """cattrs' words for a failed field, ours where a check of ours refused it."""
    if isinstance(error, BadValue):
        return str(error)
    return cattrs.v.format_exception(error, kind)


def structure_body(data: Any, model: type[T], using: cattrs.Converter = converter) -> T:
    """Structure a parsed JSON body into `model`, or raise `BodyError` naming the bad field."""
    if not isinstance(data, dict):
        raise BodyError(f"the body must be a JSON object ({model.__name__})")
    try:
        return using.structure(data, model)
    except cattrs.BaseValidationError as exc:
        problems = "; ".join(
            cattrs.transform_error(exc, path=model.__name__, format_exception=_problem)
        )
        raise BodyError(problems) from None
    except (TypeError, ValueError) as exc:
        raise BodyError(f"{model.__name__}: {exc}") from None
