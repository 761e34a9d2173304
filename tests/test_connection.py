"""Connection files and port allocation."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.connect import write_connection_file as jupyter_client_write
from jupyter_client.manager import KernelManager
from jupyter_client.session import Session

from kallichore.jupyter.connection import (
    ConnectionInfo,
    CurveKeys,
    PortAllocator,
    new_key,
    quiet_ports,
    read_connection_file,
    write_connection_file,
)
from kallichore.jupyter.wire import Channel, Message, Signer, deserialize, serialize

KEY_ORDER = [
    "control_port",
    "shell_port",
    "stdin_port",
    "hb_port",
    "iopub_port",
    "signature_scheme",
    "key",
    "transport",
    "ip",
]


@pytest.fixture
def info() -> ConnectionInfo:
    return ConnectionInfo(
        control_port=50001,
        shell_port=50002,
        stdin_port=50003,
        hb_port=50004,
        iopub_port=50005,
        key=new_key(),
    )


def valid_dict() -> dict[str, Any]:
    return {
        "shell_port": 1,
        "iopub_port": 2,
        "stdin_port": 3,
        "control_port": 4,
        "hb_port": 65535,
        "key": "secret",
        "signature_scheme": "hmac-sha256",
        "transport": "tcp",
        "ip": "127.0.0.1",
    }


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- writing and reading ---------------------------------------------------------------------


def test_written_file_is_private_and_round_trips(tmp_path: Path, info: ConnectionInfo) -> None:
    path = tmp_path / "kernel-1.json"
    write_connection_file(path, info)
    assert mode(path) == 0o600
    assert read_connection_file(path) == info
    assert os.listdir(tmp_path) == ["kernel-1.json"]


def test_file_is_private_whatever_the_umask(tmp_path: Path, info: ConnectionInfo) -> None:
    old = os.umask(0)
    try:
        write_connection_file(tmp_path / "k.json", info)
    finally:
        os.umask(old)
    assert mode(tmp_path / "k.json") == 0o600


def test_keys_are_in_jupyter_order_and_pretty_printed(tmp_path: Path, info: ConnectionInfo) -> None:
    path = tmp_path / "k.json"
    write_connection_file(path, info)
    text = path.read_text()
    assert list(json.loads(text)) == KEY_ORDER
    assert list(info.to_dict()) == KEY_ORDER
    assert text.startswith('{\n  "control_port": 50001,\n')


def test_accepts_str_path(tmp_path: Path, info: ConnectionInfo) -> None:
    write_connection_file(str(tmp_path / "k.json"), info)
    assert read_connection_file(str(tmp_path / "k.json")) == info


def test_jupyter_client_loads_our_file(tmp_path: Path, info: ConnectionInfo) -> None:
    path = tmp_path / "k.json"
    write_connection_file(path, info)
    manager = KernelManager(connection_file=str(path))
    manager.load_connection_file()

    assert manager.shell_port == info.shell_port
    assert manager.iopub_port == info.iopub_port
    assert manager.stdin_port == info.stdin_port
    assert manager.control_port == info.control_port
    assert manager.hb_port == info.hb_port
    assert manager.ip == info.ip
    assert manager.transport == info.transport
    assert manager.session.key == info.key.encode()

    # A message jupyter_client signs with the file's key verifies with our signer, and back.
    session: Session = manager.session
    _, ours = deserialize(session.serialize(session.msg("kernel_info_request")), info.signer())
    assert ours.msg_type == "kernel_info_request"
    frames = serialize(
        Message.build("status", {"execution_state": "idle"}, session="s"), info.signer()
    )
    _, msg_list = session.feed_identities(frames)
    assert session.deserialize(msg_list)["content"] == {"execution_state": "idle"}


def test_we_read_a_jupyter_client_file(tmp_path: Path) -> None:
    path = tmp_path / "theirs.json"
    jupyter_client_write(str(path), key=b"their-key", kernel_name="python3")
    info = read_connection_file(path)
    assert info.key == "their-key"
    assert info.transport == "tcp"
    assert len({info.port(channel) for channel in Channel}) == 5


def test_overwrite_replaces_the_file_atomically(tmp_path: Path, info: ConnectionInfo) -> None:
    path = tmp_path / "k.json"
    path.write_text("old content that a reader has open")
    path.chmod(0o644)
    with path.open() as reader:
        write_connection_file(path, info)
        # The old file was replaced, not truncated and rewritten: an open reader still sees all of
        # it, and a new reader sees only the complete new file.
        assert reader.read() == "old content that a reader has open"
    assert read_connection_file(path) == info
    assert mode(path) == 0o600
    assert os.listdir(tmp_path) == ["k.json"]


def test_failed_replace_leaves_no_temp_file(tmp_path: Path, info: ConnectionInfo) -> None:
    target = tmp_path / "is-a-directory"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        write_connection_file(target, info)
    assert os.listdir(tmp_path) == ["is-a-directory"]
    assert target.is_dir()


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_old_file_and_no_temp_file(
    tmp_path: Path, info: ConnectionInfo, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    path = tmp_path / "k.json"
    path.write_text("previous")

    def fail(fd: int) -> None:
        raise error

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(type(error)):
        write_connection_file(path, info)
    assert os.listdir(tmp_path) == ["k.json"]
    assert path.read_text() == "previous"


def test_missing_directory_fails_cleanly(tmp_path: Path, info: ConnectionInfo) -> None:
    with pytest.raises(FileNotFoundError):
        write_connection_file(tmp_path / "nope" / "k.json", info)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_unwritable_directory_fails_cleanly(tmp_path: Path, info: ConnectionInfo) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            write_connection_file(locked / "k.json", info)
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"{", "k.json"), (b"[1]", "not a JSON object"), (b'{"key": "x"}', "control_port")],
)
def test_read_invalid_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "k.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(problem)) as caught:
        read_connection_file(path)
    assert str(path) in str(caught.value)


# --- from_dict validation --------------------------------------------------------------------


def test_from_dict_ignores_extra_keys_and_defaults_optional_ones() -> None:
    data = valid_dict()
    data["kernel_name"] = "python3"
    assert ConnectionInfo.from_dict(data).hb_port == 65535
    for optional in ("signature_scheme", "transport", "ip"):
        del data[optional]
    info = ConnectionInfo.from_dict(data)
    assert (info.signature_scheme, info.transport, info.ip) == ("hmac-sha256", "tcp", "127.0.0.1")


@pytest.mark.parametrize(
    "field", ["control_port", "shell_port", "stdin_port", "hb_port", "iopub_port", "key"]
)
def test_from_dict_names_missing_field(field: str) -> None:
    data = valid_dict()
    del data[field]
    with pytest.raises(ValueError, match=f"missing {field}"):
        ConnectionInfo.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("shell_port", "5000"),
        ("shell_port", True),
        ("iopub_port", 0),
        ("stdin_port", -1),
        ("control_port", 65536),
        ("hb_port", 5000.0),
        ("hb_port", None),
        ("key", b"bytes"),
        ("key", None),
        ("signature_scheme", "hmac-md5"),
        ("signature_scheme", 1),
        ("transport", "udp"),
        ("ip", ""),
        ("ip", ["127.0.0.1"]),
    ],
)
def test_from_dict_names_bad_field(field: str, value: object) -> None:
    data = valid_dict()
    data[field] = value
    with pytest.raises(ValueError, match=field):
        ConnectionInfo.from_dict(data)


def test_to_dict_from_dict_round_trip(info: ConnectionInfo) -> None:
    assert ConnectionInfo.from_dict(info.to_dict()) == info


# --- addresses, keys and signing -------------------------------------------------------------


def test_tcp_addresses(info: ConnectionInfo) -> None:
    assert info.address(Channel.SHELL) == "tcp://127.0.0.1:50002"
    assert info.address(Channel.CONTROL) == "tcp://127.0.0.1:50001"
    assert info.address(Channel.STDIN) == "tcp://127.0.0.1:50003"
    assert info.address(Channel.HEARTBEAT) == "tcp://127.0.0.1:50004"
    assert info.address(Channel.IOPUB) == "tcp://127.0.0.1:50005"


def test_ipc_addresses() -> None:
    data = valid_dict() | {"transport": "ipc", "ip": "/tmp/kernel-abc"}
    info = ConnectionInfo.from_dict(data)
    assert info.address(Channel.IOPUB) == "ipc:///tmp/kernel-abc-2"
    assert info.address(Channel.HEARTBEAT) == "ipc:///tmp/kernel-abc-65535"


def test_new_key_is_128_bits_of_lowercase_hex() -> None:
    keys = {new_key() for _ in range(20)}
    assert len(keys) == 20
    assert all(re.fullmatch("[0-9a-f]{32}", key) for key in keys)


def test_signer_uses_the_key(info: ConnectionInfo) -> None:
    assert info.signer() == Signer(info.key.encode(), "hmac-sha256")
    unsigned = ConnectionInfo.from_dict(valid_dict() | {"key": ""})
    assert unsigned.signer().sign([b"{}"]) == b""


# --- ports -----------------------------------------------------------------------------------


def test_allocated_ports_are_distinct_and_bindable() -> None:
    allocator = PortAllocator()
    ports = allocator.allocate(5)
    assert len(set(ports)) == 5
    sockets = []
    try:
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", port))
    finally:
        for sock in sockets:
            sock.close()
    assert allocator.reserved == frozenset(ports)


def allocated_for_8_kernels(allocator: PortAllocator) -> list[int]:
    """Ports for 8 kernels starting together: each allocation made while the others hold theirs
    (allocations are synchronous, so in trio they never interleave further than this)."""
    return [port for _ in range(8) for port in allocator.allocate(5)]


def test_concurrent_allocations_never_overlap() -> None:
    everything = allocated_for_8_kernels(PortAllocator())
    assert len(everything) == len(set(everything)) == 40


class ScriptedSocket:
    """Stands in for a probe socket; the OS "chooses" ports from a script."""

    script: Iterator[int]
    open_count = 0

    def __init__(self, family: int, kind: int) -> None:
        self.port = 0
        ScriptedSocket.open_count += 1

    def bind(self, address: tuple[str, int]) -> None:
        assert address == ("127.0.0.1", 0)
        self.port = next(self.script)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        ScriptedSocket.open_count -= 1


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> type[ScriptedSocket]:
    ScriptedSocket.open_count = 0
    monkeypatch.setattr(socket, "socket", ScriptedSocket)
    return ScriptedSocket


def test_reserved_ports_are_skipped_until_released(scripted: type[ScriptedSocket]) -> None:
    allocator = PortAllocator()
    scripted.script = iter([1000, 1001, 1000, 1002])
    assert allocator.allocate(2) == [1000, 1001]

    scripted.script = iter([1001, 1000, 1003, 1002, 1004])
    assert allocator.allocate(2) == [1003, 1002]
    assert allocator.reserved == {1000, 1001, 1002, 1003}

    allocator.release([1000, 1003])
    scripted.script = iter([1001, 1003, 1000])
    assert allocator.allocate(2) == [1003, 1000]
    assert scripted.open_count == 0


def test_duplicate_ports_within_one_call_are_skipped(scripted: type[ScriptedSocket]) -> None:
    scripted.script = iter([2000, 2000, 2001])
    assert PortAllocator().allocate(2) == [2000, 2001]


def test_gives_up_when_no_port_is_free(scripted: type[ScriptedSocket]) -> None:
    allocator = PortAllocator()
    scripted.script = iter([3000])
    allocator.allocate(1)
    scripted.script = iter([3000] * 10_000)
    with pytest.raises(OSError, match="free ports"):
        allocator.allocate(3)
    assert allocator.reserved == {3000}
    assert scripted.open_count == 0


def test_release_of_unknown_ports_is_harmless() -> None:
    allocator = PortAllocator()
    allocator.release([1, 2, 3])
    assert allocator.allocate(0) == []
    assert allocator.reserved == frozenset()


def test_quiet_ports_lie_above_the_ephemeral_range(tmp_path: Path) -> None:
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("32768\t60999\n")
    assert quiet_ports(range_file) == range(61000, 65536)
    range_file.write_text("1024 65000\n")
    assert quiet_ports(range_file) is None, "536 ports are too few to draw from"
    range_file.write_text("garbage\n")
    assert quiet_ports(range_file) is None
    assert quiet_ports(tmp_path / "missing") is None


def two_free_neighbours() -> int:
    """A port p such that p and p + 1 are both free right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port < 65535:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as neighbour:
                try:
                    neighbour.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise AssertionError("no two free neighbouring ports")


def test_candidate_ports_taken_by_another_program_are_skipped() -> None:
    port = two_free_neighbours()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        allocator = PortAllocator(range(port, port + 2))
        assert allocator.allocate(1) == [port + 1]
        with pytest.raises(OSError, match="free ports"):
            allocator.allocate(1)
    assert allocator.reserved == {port + 1}


def test_this_machines_allocator_hands_out_bindable_ports_from_its_quiet_range() -> None:
    quiet = quiet_ports()
    everything = allocated_for_8_kernels(PortAllocator.for_this_machine())
    assert len(everything) == len(set(everything)) == 40
    if quiet is not None:
        assert all(port in quiet for port in everything)
    for port in everything:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    "keys",
    [
        {"curve_publickey": "#" * 40, "curve_secretkey": "0" * 40},  # in the alphabet, not Z85
        {"curve_publickey": "0" * 39, "curve_secretkey": "0" * 40},
        {"curve_publickey": "0" * 40},  # a pair goes together
        {"curve_secretkey": "0" * 40},
    ],
)
def test_curve_keys_are_checked(keys: dict[str, str]) -> None:
    """A key ZeroMQ would refuse (EINVAL when the socket is made) is refused when read."""
    with pytest.raises(ValueError, match="curve_"):
        ConnectionInfo.from_dict(valid_dict() | keys)


def test_curve_keys_round_trip() -> None:
    keys = CurveKeys.new()
    data = valid_dict() | {"curve_publickey": keys.public, "curve_secretkey": keys.secret}
    info = ConnectionInfo.from_dict(data)
    assert info.curve == keys
    assert ConnectionInfo.from_dict(info.to_dict()) == info
    assert keys.secret not in repr(info)
