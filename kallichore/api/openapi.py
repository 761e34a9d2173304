"""The OpenAPI 3.0 document of our APIs (the Kallichore-compatible one and the Jupyter Server
kernels API), served at `GET /openapi.json`.

Component schemas are generated from the attrs models in `kallichore.api.models` and
`kallichore.api.jupyter_models` (and the enums they use), so a field added to a model shows up
here without an edit. What a Python type cannot say (a description, the enum behind a plain
`str`) is noted per field, and a note naming a field that no longer exists is an error, not
silently dropped. Paths come from the route tables (`kallichore.api.routes`), the same entries
that Quart serves; tests/test_openapi.py checks
them against what the server actually sends.
"""

from __future__ import annotations

import types
import typing
from enum import Enum
from typing import Any

import attrs

from kallichore import __version__
from kallichore.api import jupyter_models, models, single_kernel_models
from kallichore.api.models import ErrorBody
from kallichore.api.routes import (
    CROSS_ORIGIN_REFUSAL,
    Empty,
    Null,
    Reply,
    Route,
    RouteTable,
    bad_body,
)
from kallichore.channels.kallichore_framing import CLIENT_CHANNELS, wire_status
from kallichore.errors import ErrorCode
from kallichore.jupyter.connection import TRANSPORTS, ConnectionInfo
from kallichore.jupyter.wire import SIGNATURE_SCHEME, Channel
from kallichore.session.model import (
    SESSION_ID_PATTERN,
    InterruptMode,
    SessionMode,
    StartupEnvironment,
    Status,
    VarAction,
    VarActionType,
)
from kallichore.session.resources import ResourceUsage

Schema = dict[str, Any]
# A field note: a description, or the whole schema when the Python type says too little.
Note = str | Schema


# Every attrs class on the wire, with its schema name and what it is.
WIRE_MODELS: dict[type, tuple[str, str]] = {
    models.NewSession: (
        "NewSession",
        "A session to create. Only `session_id` is required. `startup_environment`, when "
        "given, wins over the older `run_in_shell`.",
    ),
    models.NewSessionReply: ("NewSessionReply", "The id of the session just created."),
    VarAction: (
        "VarAction",
        "One step of building a kernel's environment, applied in order to the server's own "
        "environment at each start. `append` and `prepend` insert no separator.",
    ),
    models.RestartSession: (
        "RestartSession",
        "Changes for the restarted kernel. An empty string or array is the same as leaving "
        "the field out.",
    ),
    models.ClientHeartbeat: ("ClientHeartbeat", "A client's sign of life."),
    models.ExecuteCode: (
        "ExecuteCode",
        "Code to run, with the `execute_request` options an agent may set; without "
        "`timeout_seconds` the call waits as long as the code runs.",
    ),
    models.ServerConfiguration: (
        "ServerConfiguration",
        "Changes to the server's configuration; a field left out is left as it is.",
    ),
    models.ServerConfigurationBody: ("ServerConfigurationBody", "The server's configuration."),
    ConnectionInfo: (
        "ConnectionInfo",
        "A kernel's connection file: the ports of its five sockets and the key that signs its "
        "messages. Fields with a default may be left out of a request; responses always carry "
        "all nine.",
    ),
    models.ErrorBody: ("Error", "What went wrong."),
    models.StartupErrorBody: ("StartupError", "Why a kernel failed to start."),
    models.ExecutionQueueBody: (
        "ExecutionQueueBody",
        "The `execute_request`s held back until the kernel has finished the one before.",
    ),
    models.ActiveSession: ("ActiveSession", "A session as the server reports it."),
    models.SessionList: ("SessionList", "Every session the server has, exited ones included."),
    models.ServerStatus: ("ServerStatus", "The server and its sessions at a glance."),
    ResourceUsage: (
        "ResourceUsage",
        "One sample of the CPU, memory and threads of a kernel's process tree (the kernel and "
        "the descendants still in its process group).",
    ),
    # The Jupyter Server kernels API's.
    jupyter_models.NewKernel: ("NewKernel", "A kernel to start; an empty body is the default one."),
    jupyter_models.KernelRef: (
        "KernelRef",
        "A session's kernel: the running kernel `id`, else a new one of kernelspec `name`.",
    ),
    jupyter_models.NewSession: ("JupyterNewSession", "A Jupyter session to create."),
    jupyter_models.SessionChanges: (
        "JupyterSessionChanges",
        "Changes to a Jupyter session; a field left out is left as it is.",
    ),
    jupyter_models.ApiVersion: ("ApiVersion", "The server's version."),
    jupyter_models.KernelSpecModel: ("KernelSpecModel", "An installed kernelspec."),
    jupyter_models.KernelSpecs: ("KernelSpecs", "Every kernelspec, and the default one."),
    jupyter_models.KernelModel: (
        "KernelModel",
        "A kernel as the Jupyter Server API describes it (any session of the server).",
    ),
    jupyter_models.NotebookRef: ("NotebookRef", "The session's path and name again (old clients)."),
    jupyter_models.SessionModel: ("SessionModel", "A Jupyter session: a path bound to a kernel."),
    jupyter_models.JupyterError: ("JupyterError", "What went wrong, as Jupyter servers say it."),
    # The single-kernel routes'.
    single_kernel_models.Health: ("Health", "Whether the default kernel is alive."),
    single_kernel_models.KernelAction: ("KernelAction", "What was done to the default kernel."),
    single_kernel_models.KernelReset: ("KernelReset", "The default kernel, restarted."),
    single_kernel_models.KernelConnection: (
        "KernelConnection",
        "A connection file of the default kernel, for a Jupyter client beside the daemon.",
    ),
    single_kernel_models.KernelStatus: ("KernelStatus", "The default kernel at a glance."),
}

ENUM_NOTES: dict[type[Enum], str] = {
    InterruptMode: (
        "How the kernel is interrupted: `signal` sends SIGINT to its process group, `message` "
        "sends an `interrupt_request` on the control channel."
    ),
    SessionMode: "What the session is for; stored and reported, never acted on.",
    StartupEnvironment: (
        "How the kernel is launched: directly (`none`), through the user's login shell "
        "(`shell`), or through it after running a command (`command`) or sourcing a script "
        "(`script`). Ignored on Windows."
    ),
    VarActionType: "What a VarAction does with the variable's current value.",
}

_PORT: Schema = {"type": "integer", "minimum": 1, "maximum": 65535}
_KERNEL_INFO = "The content of the kernel's `kernel_info_reply`."
_LAUNCHER = (
    "Our extension: what starts the kernel, and where: a launcher block such as "
    '`{"launcher": "ssh", "host": "gpu-box"}` or `{"launcher": "slurm", "partition": "gpu", '
    '"time": "01:00:00", "extra_args": ["--gres=gpu:1"]}` (README, "Kernels on other '
    "machines\"). Absent: the kernelspec's `metadata.kallichore` block, else a local child "
    "process."
)


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_codes() -> str:
    return ", ".join(f"`{code.wire}` {code.name.lower()}" for code in ErrorCode)


FIELD_NOTES: dict[type, dict[str, Note]] = {
    models.NewSession: {
        "session_id": {
            "type": "string",
            "pattern": f"^{SESSION_ID_PATTERN.pattern}$",
            "description": "Chosen by the client; ends up in file names, hence the alphabet.",
        },
        "argv": (
            "The kernel's command line. `{connection_file}` in any element is replaced by the "
            "path of the connection file written at each start. `argv[0]` must be an existing "
            "file or be found on the server's PATH. Empty for a kernel that will be adopted."
        ),
        "username": "Sent as `username` in the header of every message to the kernel.",
        "input_prompt": "Replaced by the kernel's own if its kernel_info_reply has one.",
        "continuation_prompt": "Replaced by the kernel's own if its kernel_info_reply has one.",
        "working_directory": "Where the kernel starts; empty for the server's own directory.",
        "notebook_uri": "Stored and reported only.",
        "env": "Environment actions, applied in order at every start.",
        "connection_timeout": {
            "type": "integer",
            "minimum": 1,
            "description": (
                "Seconds to wait for the kernel to connect (and, for protocol 5.5 or later, to "
                "register through the JEP 66 handshake)."
            ),
        },
        "protocol_version": (
            "The Jupyter protocol version the kernel speaks. From 5.5 on, the kernel is "
            "expected to register its ports through the JEP 66 handshake."
        ),
        "startup_environment": "When absent, `run_in_shell` chooses `shell` or `none`.",
        "startup_environment_arg": "The command (`command`) or script path (`script`).",
        "run_in_shell": "The older form of `startup_environment: shell`.",
        "kernel_name": (
            "Our extension: the name of a kernelspec (as `GET /api/kernelspecs` lists them) "
            "whose argv, environment and interrupt mode the session launches; `argv` must then "
            "be empty. `display_name` and `language` default to the kernelspec's."
        ),
        "launcher": _LAUNCHER,
    },
    models.RestartSession: {
        "working_directory": (
            "An existing directory to start the new kernel in; by default the old kernel's "
            "current directory."
        ),
        "env": "Replaces the session's environment actions, for this start and later ones.",
    },
    models.ClientHeartbeat: {
        "process_id": (
            "The client's process: while it is alive, idle shutdown does not stop the server."
        ),
    },
    models.ServerConfiguration: {
        "idle_shutdown_hours": (
            "Hours of inactivity after which the server shuts down: negative disables idle "
            "shutdown, 0 means 30 seconds, at most 65535."
        ),
        "resource_sample_interval_ms": (
            "Milliseconds between resource usage samples: 0 disables sampling, values below "
            "100 are raised to 100, negative is an error."
        ),
        "log_level": "Accepted and ignored: the log level is chosen when the server starts.",
    },
    models.ServerConfigurationBody: {
        "idle_shutdown_hours": "Absent while idle shutdown is disabled.",
        "resource_sample_interval_ms": "0 while resource sampling is disabled.",
        "log_level": {
            "type": "string",
            "enum": list(models.LOG_LEVELS),
            "description": "The server's log level; absent if it is not one of these names.",
        },
    },
    ConnectionInfo: {
        "control_port": _PORT,
        "shell_port": _PORT,
        "stdin_port": _PORT,
        "hb_port": _PORT,
        "iopub_port": _PORT,
        "key": "The HMAC key that signs messages; empty for unsigned messages.",
        "signature_scheme": {"type": "string", "enum": [SIGNATURE_SCHEME]},
        "transport": {"type": "string", "enum": list(TRANSPORTS)},
        "curve_publickey": (
            "The kernel's CurveZMQ public key (Z85, 40 characters), when its sockets are "
            "encrypted; its secret key comes with it (jupyter_client >= 8.10 reads both)."
        ),
        "curve_secretkey": "The kernel's CurveZMQ secret key (Z85), with `curve_publickey`.",
    },
    jupyter_models.NewKernel: {
        "name": "A kernelspec name; the default kernelspec if absent.",
        "path": "The directory to run in, relative to the server's root directory.",
        "env": (
            "`KERNEL_*` variables reach the kernel, and those the server allows "
            "(`--jupyter-env-allow`); the others are dropped. `KERNEL_WORKING_DIR` is where "
            "the kernel runs (an absolute path, or one relative to the root directory)."
        ),
        "launcher": _LAUNCHER,
    },
    jupyter_models.NewSession: {
        "path": "The notebook's path; the kernel runs in its directory (under the root).",
        "kernel": {"allOf": [_ref("KernelRef")], "description": "The default kernel if absent."},
    },
    jupyter_models.SessionChanges: {
        "kernel": {
            "allOf": [_ref("KernelRef")],
            "description": "Another kernel: the one it leaves is shut down.",
        },
    },
    jupyter_models.KernelModel: {
        "id": {"type": "string", "format": "uuid"},
        "name": "The kernelspec's name (the language for a session made without one).",
        "last_activity": {
            "type": "string",
            "format": "date-time",
            "description": "When a message last went to or came from the kernel (UTC, `Z`).",
        },
        "execution_state": {"type": "string", "enum": list(jupyter_models.EXECUTION_STATES)},
        "connections": "The kernel's live Jupyter channels connections.",
    },
    jupyter_models.KernelSpecModel: {
        "spec": "kernel.json: `argv`, `env`, `display_name`, `language`, `interrupt_mode`, "
        "`metadata`.",
        "resources": "URLs of its files (`/kernelspecs/<name>/<file>`): logos by name without "
        "the extension, `kernel.js`, `kernel.css`.",
    },
    models.ErrorBody: {
        "code": (
            f"`KS-<n>` for an error of the supervisor ({_error_codes()}); for a request the "
            "API refused before reaching the supervisor, the HTTP status as a string (`400`, "
            "`413`); `socket_path_too_long` or `domain_socket_error` when a channel socket "
            "cannot be made."
        ),
        "message": "For people: clients show it and should not parse it.",
    },
    models.StartupErrorBody: {
        "exit_code": "The kernel's exit code, if it exited.",
        "output": "Everything the kernel wrote to its stdout and stderr before it failed.",
    },
    models.ExecutionQueueBody: {
        "length": "How many requests are pending, not counting the active one.",
        "pending": {"type": "array", "items": _ref("QueuedMessage")},
        "active": {
            "allOf": [_ref("QueuedMessage")],
            "description": "The request sent to the kernel and not yet finished, if any.",
        },
    },
    models.ActiveSession: {
        "launcher": (
            "Our extension, for a kernel on another machine: where it runs (`launcher`, and "
            "`host`, `job_id`, `pid` as known)."
        ),
        "kernel_id": (
            "Our extension: the session's id in the Jupyter Server kernels API (a UUID; the "
            "session id itself for a kernel started through that API)."
        ),
        "argv": "As given at creation: `{connection_file}` is not substituted.",
        "process_id": "The kernel's process while it runs; never set for an adopted kernel.",
        "initial_env": (
            "The whole environment of the kernel's last launch (the server's environment "
            "after the actions); `{}` before the first start."
        ),
        "connected": "Whether a client is attached to the session's channels.",
        "started": {
            "type": "string",
            "format": "date-time",
            "description": "When the session was created (not when its kernel started).",
        },
        "working_directory": "The kernel's current directory, tracked after each execution.",
        "input_prompt": "The kernel's own prompt, once its kernel_info_reply has given one.",
        "status": _ref("Status"),
        "kernel_info": f"{_KERNEL_INFO} `{{}}` until the kernel has answered.",
        "resource_usage": {
            "allOf": [_ref("ResourceUsage")],
            "description": "The last sample taken, if any.",
        },
        "idle_seconds": "Whole seconds since the session became idle; 0 while it is not.",
        "busy_seconds": "Whole seconds since the session became busy; 0 while it is not.",
        "socket_path": (
            "The session's channel socket while a client is attached to it (socket transport)."
        ),
    },
    models.SessionList: {"total": "How many sessions there are."},
    models.ServerStatus: {
        "sessions": "How many sessions there are.",
        "active": "How many sessions have not exited (never-started ones included).",
        "busy": "Whether any session is busy.",
        "idle_seconds": (
            "Seconds since the last session became idle (since the server started, when there "
            "are no sessions)."
        ),
        "busy_seconds": "Seconds since the longest-busy session became busy; 0 if none is.",
        "version": "This server's version.",
        "process_id": "The server's process id.",
        "started": {"type": "string", "format": "date-time"},
        "server_id": "Random, new for every server process.",
    },
    ResourceUsage: {
        "cpu_percent": "CPU use over the sampling period; 100 is one whole core.",
        "memory_bytes": "Resident memory, summed over the tree.",
        "sampling_period_ms": "The sampling interval in force.",
        "timestamp": "When the sample was taken, in milliseconds since the Unix epoch.",
    },
    single_kernel_models.Health: {
        "status": {"type": "string", "enum": ["healthy", "unhealthy"]},
        "kernel_pid": "The kernel's process id while it runs.",
    },
    single_kernel_models.KernelAction: {"status": {"type": "string", "enum": ["success"]}},
    single_kernel_models.KernelReset: {
        "status": {"type": "string", "enum": ["success"]},
        "old_pid": "The process id of the kernel that was stopped (null if none ran).",
        "new_pid": "The process id of the new kernel.",
        "connection_file": "The new kernel's connection file (see `GET /kernel/connection`).",
    },
    single_kernel_models.KernelConnection: {
        "connection_file": "The file's path (mode 0600).",
        "config": {
            "allOf": [_ref("ConnectionInfo")],
            "description": "What the file holds: the connection info, and `kernel_name`.",
        },
    },
    single_kernel_models.KernelStatus: {
        "alive": "The kernel answers (`idle` or `busy`), as `/health` says.",
        "pid": "The kernel's process id while it runs.",
        "status": _ref("Status"),
    },
}

_PRIMITIVES: dict[Any, Schema] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    bool: {"type": "boolean"},
    float: {"type": "number"},
}


def _with(schema: Schema, **keys: Any) -> Schema:
    """`schema` plus `keys`; a `$ref` takes no siblings in OpenAPI 3.0, so it is wrapped."""
    if not keys:
        return schema
    if "$ref" in schema:
        return {"allOf": [schema], **keys}
    return {**schema, **keys}


class _SchemaBuilder:
    """Component schemas for attrs classes and the enums they use, by walking their fields."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {
            "Status": {
                "type": "string",
                "enum": [status.value for status in Status if wire_status(status) == status],
                "description": (
                    "A session's status. `idle` is also reported for a session whose kernel "
                    "has never been started."
                ),
            }
        }

    def add_model(self, cls: type) -> None:
        name, description = WIRE_MODELS[cls]
        fields = attrs.fields(cls)
        notes = FIELD_NOTES.get(cls, {})
        if stale := set(notes) - {field.name for field in fields}:
            raise ValueError(f"notes for fields {cls.__name__} does not have: {sorted(stale)}")
        hints = typing.get_type_hints(cls)
        schema: Schema = {
            "type": "object",
            "description": description,
            "properties": {
                field.name: self._property(field, hints[field.name], notes.get(field.name))
                for field in fields
            },
        }
        if required := [field.name for field in fields if field.default is attrs.NOTHING]:
            schema["required"] = required
        self.schemas[name] = schema

    def _property(self, field: attrs.Attribute[Any], kind: Any, note: Note | None) -> Schema:
        """Fields omitted when None are optional, never null; other `X | None` are nullable."""
        kind, nullable = _split_optional(kind)
        schema = dict(note) if isinstance(note, dict) else self.type_schema(kind)
        if nullable and not field.metadata.get("omit_if_none"):
            schema = self._nullable(schema)
        extra: dict[str, Any] = {}
        if isinstance(note, str):
            extra["description"] = note
        default: Any = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]  # typed as a function
            default = default.factory()
        if default is not attrs.NOTHING and default is not None:
            extra["default"] = models.converter.unstructure(default)
        return _with(schema, **extra)

    def type_schema(self, kind: Any) -> Schema:
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin is list:
            return {"type": "array", "items": self.type_schema(args[0])}
        if origin is dict or kind is dict:
            if not args or args[1] is Any:
                return {"type": "object"}
            return {"type": "object", "additionalProperties": self.type_schema(args[1])}
        if isinstance(kind, type) and issubclass(kind, Enum):
            schema = {"type": "string", "enum": [member.value for member in kind]}
            if note := ENUM_NOTES.get(kind):
                schema["description"] = note
            self.schemas.setdefault(kind.__name__, schema)
            return _ref(kind.__name__)
        if attrs.has(kind):
            return _ref(WIRE_MODELS[kind][0])
        if kind in _PRIMITIVES:
            return dict(_PRIMITIVES[kind])
        raise TypeError(f"no JSON schema for {kind!r}")

    def _nullable(self, schema: Schema) -> Schema:
        """OpenAPI 3.0 cannot make a `$ref` nullable, so a nullable enum is written out."""
        if "$ref" not in schema:
            return {**schema, "nullable": True}
        target = self.schemas.get(schema["$ref"].rpartition("/")[2], {})
        if "enum" not in target:
            raise TypeError(f"cannot make {schema['$ref']} nullable")
        return {"type": "string", "enum": [*target["enum"], None], "nullable": True}


def _split_optional(kind: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (kind, False)."""
    if typing.get_origin(kind) not in (types.UnionType, typing.Union):
        return kind, False
    rest = [arg for arg in typing.get_args(kind) if arg is not types.NoneType]
    if len(rest) != 1:
        raise TypeError(f"no JSON schema for {kind!r}")
    return rest[0], True


# -- channel frames ----------------------------------------------------------------------------


def _header(description: str, *, nullable: bool = False, required: bool = True) -> Schema:
    schema: Schema = {
        "type": "object",
        "description": description,
        "properties": {"msg_id": {"type": "string"}, "msg_type": {"type": "string"}},
    }
    if required:
        schema["required"] = ["msg_id", "msg_type"]
    if nullable:
        schema["nullable"] = True
    return schema


_BUFFERS: Schema = {
    "type": "array",
    "items": {"type": "string", "format": "byte"},
    "description": "Binary buffers, base64-encoded.",
}
_SERVER_CHANNELS = [channel.value for channel in Channel if channel is not Channel.HEARTBEAT]


def _server_message(description: str, channels: list[str], *, kind: str | None) -> Schema:
    """A kernel message as the server sends it: only `msg_id`/`msg_type` kept in headers."""
    properties: Schema = {} if kind is None else {"kind": {"type": "string", "enum": [kind]}}
    properties |= {
        "header": _header("Trimmed to `msg_id` and `msg_type`."),
        "parent_header": _header(
            "The parent header, trimmed the same way; null when the message has none.",
            nullable=True,
        ),
        "channel": {"type": "string", "enum": channels},
        "content": {"type": "object"},
        "metadata": {"type": "object"},
        "buffers": _BUFFERS,
    }
    return {
        "type": "object",
        "description": description,
        "properties": properties,
        "required": list(properties),
    }


def _frame_schemas() -> dict[str, Schema]:
    kernel_events: Schema = {
        "status": {
            "type": "object",
            "description": (
                "The session's status changed. `reason` says why: `start API called`, the "
                "`msg_type` of the request the kernel went busy or idle for, `lost heartbeat`..."
            ),
            "properties": {
                "status": _ref("Status"),
                "reason": {"type": "string", "nullable": True},
            },
            "required": ["status", "reason"],
        },
        "output": {
            "type": "array",
            "description": (
                "A line the kernel process wrote to its own stdout or stderr (not iopub): "
                '`["stdout" | "stderr", line]`.'
            ),
            "items": {"type": "string"},
            "minItems": 2,
            "maxItems": 2,
        },
        "executionQueued": {
            "type": "string",
            "description": "The `msg_id` of an `execute_request` held in the execution queue.",
        },
        "executionRequested": {
            "type": "object",
            "description": (
                "Code is about to run on behalf of `source` (`api`: `POST .../execute`), not "
                "of the attached client; its messages follow as any execution's."
            ),
            "required": ["msg_id", "code", "source"],
            "properties": {
                "msg_id": {"type": "string"},
                "code": {"type": "string"},
                "source": {"type": "string"},
            },
        },
        "exited": {
            "type": "integer",
            "description": (
                "The kernel ended: its exit code, or minus the number of the signal that killed it."
            ),
        },
        "workingDirChanged": {
            "type": "string",
            "description": "The kernel's new current directory, noticed after an execution.",
        },
        "resourceUsage": _with(_ref("ResourceUsage"), description="A new sample."),
        "handshakeCompleted": {
            "type": "array",
            "description": (
                "The kernel registered through the JEP 66 handshake: `[session_id, "
                "ConnectionInfo]`."
            ),
            "items": {"oneOf": [{"type": "string"}, _ref("ConnectionInfo")]},
            "minItems": 2,
            "maxItems": 2,
        },
        "clientDisconnected": {
            "type": "string",
            "description": (
                "Another client connected to this session: this one is closed next (1008)."
            ),
        },
        "error": {
            "type": "object",
            "description": (
                "Our extension, sent only to the client concerned: a frame it sent was "
                "refused (not a channel message, or no kernel is running). `msg_id` names the "
                "message when it could be read."
            ),
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "msg_id": {"type": "string"},
            },
            "required": ["code", "message"],
        },
        "eventsDropped": {
            "type": "integer",
            "description": (
                "Our extension: this many events were dropped unseen because the session's "
                "event buffer overflowed while nobody read it."
            ),
        },
    }
    return {
        "JupyterChannelMessage": {
            "type": "object",
            "description": (
                "A message from a client for the kernel (a text frame). Of the headers only "
                "`msg_id` and `msg_type` are used: the server writes the rest. `kind`, if "
                "present, is ignored."
            ),
            "properties": {
                "header": _header("Extra keys are ignored."),
                "parent_header": _header(
                    "Used only if it has a `msg_id`; extra keys are ignored.",
                    nullable=True,
                    required=False,
                ),
                "channel": {"type": "string", "enum": list(CLIENT_CHANNELS)},
                "content": {"type": "object", "default": {}},
                "metadata": {"type": "object", "default": {}},
                "buffers": {**_BUFFERS, "default": []},
            },
            "required": ["header", "channel"],
        },
        "QueuedMessage": _server_message(
            "An `execute_request` in the execution queue.", [Channel.SHELL.value], kind=None
        ),
        "JupyterFrame": _server_message(
            "A message from the kernel (a text frame).", _SERVER_CHANNELS, kind="jupyter"
        ),
        "KernelEventFrame": {
            "type": "object",
            "description": (
                "An event of the supervisor (a text frame): `kind` and exactly one key naming "
                "the event."
            ),
            "properties": {"kind": {"type": "string", "enum": ["kernel"]}} | kernel_events,
            "required": ["kind"],
            "additionalProperties": False,
            "minProperties": 2,
            "maxProperties": 2,
        },
        "ServerFrame": {
            "description": "A text frame from the server on the channels WebSocket.",
            "oneOf": [_ref("JupyterFrame"), _ref("KernelEventFrame")],
            "discriminator": {
                "propertyName": "kind",
                "mapping": {
                    "jupyter": "#/components/schemas/JupyterFrame",
                    "kernel": "#/components/schemas/KernelEventFrame",
                },
            },
        },
    }


# -- paths -------------------------------------------------------------------------------------

_NULL: Schema = {"type": "object", "nullable": True, "enum": [None], "description": "`null`."}
_TOO_LARGE = Reply(ErrorBody, "The body is larger than the server accepts (code `413`).")


@attrs.frozen
class _Dialect:
    """How one API documents its refusals and auth."""

    error: type
    unauthorized: Reply
    security: list[dict[str, list[str]]]


_KALLICHORE_DIALECT = _Dialect(
    ErrorBody,
    Reply(Empty, "The bearer token is missing or wrong (empty body)."),
    [{"bearerAuth": []}],
)
_DIALECTS = {
    "kallichore": _KALLICHORE_DIALECT,
    # The agent and single-kernel routes answer as the Kallichore API does.
    "agent": _KALLICHORE_DIALECT,
    "single": _KALLICHORE_DIALECT,
    "jupyter": _Dialect(
        jupyter_models.JupyterError,
        Reply(jupyter_models.JupyterError, "The token is missing or wrong."),
        [{"bearerAuth": []}, {"jupyterToken": []}, {"jupyterQueryToken": []}],
    ),
}


def _reply(reply: Reply) -> Schema:
    if reply.model is Empty:
        return {"description": reply.description}
    if reply.model is Null:
        schema = _NULL
    elif isinstance(reply.model, dict):
        schema = reply.model
    else:
        schema = _ref(WIRE_MODELS[reply.model][0])
    return {"description": reply.description, "content": {"application/json": {"schema": schema}}}


def _operation(table: RouteTable, route: Route) -> Schema:
    """One operation: the route's own answers, then those its parameters, body and auth add."""
    operation: Schema = {
        "operationId": route.operation_id,
        "tags": [route.tag],
        "summary": route.summary,
    }
    if route.description:
        operation["description"] = route.description
    dialect = _DIALECTS[table.name]
    replies: dict[int, Reply] = {route.status: route.ok}
    if route.failure is not None:
        replies[route.failure.status] = Reply(route.failure.body, route.failure.description)
    for name in route.parameters:
        replies[404] = table.parameters[name].missing
    if route.body is not None:
        operation["requestBody"] = {
            "required": route.body_required,
            "content": {"application/json": {"schema": _ref(WIRE_MODELS[route.body][0])}},
        }
        if not route.ignore_bad_body:
            replies.setdefault(400, Reply(dialect.error, bad_body(route.body) + "."))
        replies[413] = _TOO_LARGE
    replies |= route.replies
    replies[403] = Reply(
        dialect.error, f"From a web page of another origin: {CROSS_ORIGIN_REFUSAL}."
    )
    if route.protected:
        operation["security"] = dialect.security
        replies[401] = dialect.unauthorized
    operation["responses"] = {
        str(status): _reply(reply) for status, reply in sorted(replies.items())
    }
    return operation | dict(route.extensions)


def _paths(table: RouteTable) -> dict[str, Schema]:
    paths: dict[str, Schema] = {}
    for route in table.routes:
        item = paths.setdefault(route.path, {})
        if route.parameters and "parameters" not in item:
            item["parameters"] = [
                {"$ref": f"#/components/parameters/{_parameter_name(name)}"}
                for name in route.parameters
            ]
        item[route.method.lower()] = _operation(table, route)
    return paths


def _parameter_name(name: str) -> str:
    """`session_id` -> `SessionId`, the parameter's name among the components."""
    return "".join(part.capitalize() for part in name.split("_"))


def _parameters(table: RouteTable) -> dict[str, Schema]:
    return {
        _parameter_name(name): {
            "name": name,
            "in": "path",
            "required": True,
            "description": parameter.description,
            "schema": {"type": "string"},
        }
        for name, parameter in table.parameters.items()
    }


def openapi_document(*tables: RouteTable) -> dict[str, Any]:
    """The document of the APIs of `tables`, built afresh so that callers may change their
    copy."""
    builder = _SchemaBuilder()
    for cls in WIRE_MODELS:
        builder.add_model(cls)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Kallichore API",
            "version": __version__,
            "description": (
                "A Jupyter kernel supervisor's HTTP and WebSocket API, wire-compatible with "
                "Posit's Kallichore (`kcserver`), and beside it the Jupyter Server kernels "
                "API (tag `jupyter`) on the same sessions. In the Kallichore API, action "
                "endpoints answer `null` and 401 and 404 answers have empty bodies; the "
                'Jupyter API answers errors with `{"message", "reason"}`. An unknown path '
                "is 404 and a wrong method 405, both empty. Auth applies only when the server "
                "was started with a token."
            ),
        },
        "tags": [
            {"name": "sessions", "description": "Sessions and their kernels."},
            {"name": "channels", "description": "The stream of a session's messages."},
            {"name": "server", "description": "The server itself."},
            {
                "name": "agent",
                "description": "Run code and get its outcome in one call (for agents, scripts).",
            },
            {
                "name": "jupyter",
                "description": (
                    "The Jupyter Server kernels API: every session is a kernel, by its UUID."
                ),
            },
            {
                "name": "single-kernel",
                "description": (
                    "The agent-sandbox routes, on the session `default` (`--default-kernel`)."
                ),
            },
        ],
        "paths": {path: item for table in tables for path, item in _paths(table).items()},
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The token the server was started with.",
                },
                "jupyterToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`token <the token>`, as Jupyter clients send it.",
                },
                "jupyterQueryToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "The token as a query parameter (tried first).",
                },
            },
            "parameters": {
                name: schema for table in tables for name, schema in _parameters(table).items()
            },
            "schemas": builder.schemas | _frame_schemas(),
        },
    }
