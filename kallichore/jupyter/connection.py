"""Connection files: the ports and key a kernel is told to use, and how we pick them.

A kernel learns where to bind its five sockets, and which key signs its messages, from a JSON
connection file passed on its command line. The file holds a secret, so it is written readable
by its owner only, and atomically, so a kernel that starts quickly never reads half of it.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import zmq
from zmq.utils import z85

from kallichore.jupyter.wire import SIGNATURE_SCHEME, Channel, Signer

TRANSPORTS = ("tcp", "ipc")
_REQUIRED = ("control_port", "shell_port", "stdin_port", "hb_port", "iopub_port", "key")
_OPTIONAL = ("signature_scheme", "transport", "ip", "curve_publickey", "curve_secretkey")
# A CurveZMQ key in Z85: 32 bytes as 40 characters.
_Z85_KEY = re.compile(r"[0-9a-zA-Z.:+=^!/*?&<>()\[\]{}@%$#-]{40}")
# Give up rather than loop forever if the OS keeps handing back ports we have reserved.
_MAX_ATTEMPTS_PER_PORT = 100
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Below this many ports above the ephemeral range, random picks would collide too often.
_MIN_QUIET_PORTS = 1000
# The longest ipc endpoint path we use: a Unix socket's path and its NUL must fit in sun_path
# (108 bytes on Linux, 104 on macOS).
MAX_IPC_PATH_BYTES = 103


def _check_port(_instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    # bool is an int subclass, but `true` in a connection file is a mistake, not port 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be an integer, got {value!r}")
    if not 1 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be between 1 and 65535, got {value}")


def _check_str(_instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{attribute.name} must be a string, got {value!r}")


def _check_scheme(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value != SIGNATURE_SCHEME:
        raise ValueError(f"{attribute.name} must be {SIGNATURE_SCHEME!r}, got {value!r}")


def _check_transport(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in TRANSPORTS:
        raise ValueError(f"{attribute.name} must be one of {TRANSPORTS}, got {value!r}")


def _check_ip(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")


def _check_curve_key(
    _instance: object, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is None:
        return
    if isinstance(value, str) and _Z85_KEY.fullmatch(value):
        try:
            # Some strings of the alphabet encode more than 32 bits a group: not a key.
            z85.decode(value)
        except struct.error:
            pass
        else:
            return
    raise ValueError(f"{attribute.name} must be a CurveZMQ key in Z85 (40 characters)")


def _check_curve_pair(
    instance: ConnectionInfo, _attribute: attrs.Attribute[str | None], _value: str | None
) -> None:
    if (instance.curve_publickey is None) != (instance.curve_secretkey is None):
        raise ValueError("curve_publickey and curve_secretkey go together")


@attrs.frozen
class CurveKeys:
    """A CurveZMQ key pair in Z85, as connection files carry it."""

    public: str
    secret: str = attrs.field(repr=False)

    @classmethod
    def new(cls) -> CurveKeys:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))


@attrs.frozen
class ConnectionInfo:
    """The contents of a connection file. Validated on construction, whatever the source."""

    control_port: int = attrs.field(validator=_check_port)
    shell_port: int = attrs.field(validator=_check_port)
    stdin_port: int = attrs.field(validator=_check_port)
    hb_port: int = attrs.field(validator=_check_port)
    iopub_port: int = attrs.field(validator=_check_port)
    key: str = attrs.field(validator=_check_str)
    signature_scheme: str = attrs.field(
        default=SIGNATURE_SCHEME, validator=[_check_str, _check_scheme]
    )
    transport: str = attrs.field(default="tcp", validator=[_check_str, _check_transport])
    ip: str = attrs.field(default="127.0.0.1", validator=[_check_str, _check_ip])
    # The kernel's CurveZMQ key pair, when its sockets are to be encrypted (ipykernel 7 binds
    # CurveZMQ servers with it; we connect as clients knowing its public key).
    curve_publickey: str | None = attrs.field(
        default=None, validator=[_check_curve_key, _check_curve_pair]
    )
    curve_secretkey: str | None = attrs.field(default=None, validator=_check_curve_key, repr=False)

    @property
    def curve(self) -> CurveKeys | None:
        """The kernel's key pair, or None for a kernel whose traffic is not encrypted."""
        if self.curve_publickey is None or self.curve_secretkey is None:
            return None
        return CurveKeys(self.curve_publickey, self.curve_secretkey)

    def to_dict(self) -> dict[str, Any]:
        """The connection file's JSON object, keys in the order Jupyter tools write them."""
        fields: dict[str, Any] = {
            "control_port": self.control_port,
            "shell_port": self.shell_port,
            "stdin_port": self.stdin_port,
            "hb_port": self.hb_port,
            "iopub_port": self.iopub_port,
            "signature_scheme": self.signature_scheme,
            "key": self.key,
            "transport": self.transport,
            "ip": self.ip,
        }
        if self.curve_publickey is not None:
            fields["curve_publickey"] = self.curve_publickey
            fields["curve_secretkey"] = self.curve_secretkey
        return fields

    @classmethod
    def on_ports(cls, ports: Sequence[int], key: str) -> ConnectionInfo:
        """Loopback TCP on five ports, in the order control, shell, iopub, hb, stdin."""
        control, shell, iopub, hb, stdin = ports
        return cls(
            control_port=control,
            shell_port=shell,
            iopub_port=iopub,
            hb_port=hb,
            stdin_port=stdin,
            key=key,
        )

    @classmethod
    def over_ipc(cls, prefix: str, key: str) -> ConnectionInfo:
        """Unix sockets `<prefix>-1` to `<prefix>-5` (Jupyter's ipc convention, see `address`)."""
        return cls(
            control_port=1,
            shell_port=2,
            iopub_port=3,
            hb_port=4,
            stdin_port=5,
            key=key,
            transport="ipc",
            ip=prefix,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConnectionInfo:
        """Parse a connection file's object; extra keys (kernel_name, ...) are ignored.

        Raises `ValueError` naming the missing or invalid field.
        """
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise ValueError(f"connection info is missing {', '.join(missing)}")
        fields = {name: data[name] for name in (*_REQUIRED, *_OPTIONAL) if name in data}
        return cls(**fields)

    def address(self, channel: Channel) -> str:
        """The ZeroMQ endpoint of `channel`."""
        port = self.port(channel)
        if self.transport == "ipc":
            # Jupyter's convention: the ip field is a path prefix, one socket file per channel.
            return f"ipc://{self.ip}-{port}"
        return f"tcp://{self.ip}:{port}"

    def port(self, channel: Channel) -> int:
        """The port of `channel` (for ipc, the number in its socket file name)."""
        port: int = getattr(self, f"{channel.value}_port")
        return port

    def signer(self) -> Signer:
        return Signer(self.key.encode(), self.signature_scheme)


def ipc_prefix_fits(prefix: str) -> bool:
    """Whether every socket path of `ConnectionInfo.over_ipc(prefix, ...)` is short enough."""
    return len(os.fsencode(f"{prefix}-5")) <= MAX_IPC_PATH_BYTES


def new_key() -> str:
    """A fresh signing key: 128 random bits as lowercase hex."""
    return secrets.token_hex(16)


def write_connection_file(path: os.PathLike[str] | str, info: ConnectionInfo) -> None:
    """Write `info` to `path` atomically, readable by the owner only."""
    write_json_file(path, info.to_dict())


def write_json_file(
    path: os.PathLike[str] | str, contents: Mapping[str, Any], *, fsync: bool = True
) -> None:
    """Write a JSON object holding a secret to `path` atomically, readable by the owner only.

    The data goes to a 0600 temp file in the same directory (so it is never world-readable,
    even for a moment, and the final rename stays on one filesystem), is fsynced, then replaces
    `path`. On any failure the temp file is removed and `path` is left as it was. Without
    `fsync`, a crash of the machine (not of the process) may lose the new contents.
    """
    target = Path(path)
    data = (json.dumps(contents, indent=2) + "\n").encode()
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_connection_file(path: os.PathLike[str] | str) -> ConnectionInfo:
    """Load a connection file. Raises `ValueError` (naming the file) if it is not valid."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return ConnectionInfo.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from None


def quiet_ports(range_file: Path = _EPHEMERAL_RANGE_FILE) -> range | None:
    """The ports above the OS's ephemeral range, or None where there are too few (or no Linux).

    The OS hands out ephemeral ports to every `connect()` and every bind to port 0 on the
    machine, our own ZeroMQ connections included. A kernel port chosen from that range can be
    taken by one of them in the second or so between our choice and the kernel's bind; one
    chosen above it can only be taken by a program that asks for that very port.
    """
    try:
        _low, high = (int(field) for field in range_file.read_text().split())
    except (OSError, ValueError):
        return None
    ports = range(high + 1, 65536)
    return ports if len(ports) >= _MIN_QUIET_PORTS else None


class PortAllocator:
    """Hands out free TCP ports on 127.0.0.1 and remembers which are in use by our own kernels,
    so two sessions starting at once never get the same port.

    A port is free when the OS lets us bind it. Ports are drawn at random from `candidates`
    (by default the quiet ports above the ephemeral range, see `quiet_ports`) or, without
    candidates, from the OS's own choice of a free port. Between our probe and the kernel's
    bind another program could still take a port, which no allocator can prevent.
    """

    def __init__(self, candidates: range | None = None) -> None:
        self._candidates = candidates
        self._random = random.Random()
        self._reserved: set[int] = set()

    @classmethod
    def for_this_machine(cls) -> PortAllocator:
        """An allocator drawing from this machine's quiet ports, if it has enough of them."""
        return cls(quiet_ports())

    @property
    def reserved(self) -> frozenset[int]:
        """The ports handed out and not yet released."""
        return frozenset(self._reserved)

    def allocate(self, count: int = 5) -> list[int]:
        """`count` distinct free ports, reserved until `release`d."""
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        ports: list[int] = []
        probes: list[socket.socket] = []
        try:
            while len(ports) < count:
                if len(probes) == count * _MAX_ATTEMPTS_PER_PORT:
                    raise OSError(f"could not find {count} free ports")
                # Keep every probe bound until the end, so the OS cannot hand out the same
                # port twice within this call.
                port = self._probe(probes)
                if port and port not in self._reserved and port not in ports:
                    ports.append(port)
        finally:
            for probe in probes:
                probe.close()
        self._reserved.update(ports)
        return ports

    def _probe(self, probes: list[socket.socket]) -> int:
        """Bind a probe to a candidate port (or to one the OS picks); 0 if it was taken."""
        wanted = 0 if self._candidates is None else self._random.choice(self._candidates)
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probes.append(probe)
        try:
            probe.bind(("127.0.0.1", wanted))
        except OSError:
            if wanted == 0:
                raise
            return 0
        port: int = probe.getsockname()[1]
        return port

    def release(self, ports: Iterable[int]) -> None:
        """Return ports to the pool once the kernel that used them has exited."""
        self._reserved.difference_update(ports)
