"""Tests for the JEP 66 registration handshake, against a fake kernel and a real ipykernel.

The fake kernel is a blocking REQ socket in a worker thread that signs with jupyter_client's
Session, so both directions are checked against a second implementation of the wire format.
Timeouts only turn a hang into a failure; nothing asserts on speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
import trio
import trio.testing
import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.session import Session

from kallichore.jupyter.connection import ConnectionInfo, new_key
from kallichore.jupyter.wire import DELIMITER, Signer, deserialize
from kallichore.session.handshake import (
    HandshakeError,
    Registration,
    RemoteRegistration,
    wants_handshake,
)
from kallichore.session.launch.remote_shim import request_digest

Context = zmq.Context[zmq.Socket[bytes]]

HANG_GUARD = 60  # seconds
PEER_TIMEOUT_MS = 30_000  # lets the fake kernel fail instead of blocking forever
KEY = "00112233445566778899aabbccddeeff"
PORTS = {"shell_port": 50001, "iopub_port": 50002, "stdin_port": 50003, "control_port": 50004}
VALID_CONTENT = {**PORTS, "hb_port": 50005}
LAUNCHER = Path(__file__).parent / "kernels" / "jep66_launcher.py"


@pytest.fixture
def ctx() -> Iterator[Context]:
    context: Context = zmq.Context()
    yield context
    context.destroy(linger=0)


def request_frames(
    msg_type: str = "handshake_request", content: Any = None, key: str = KEY
) -> tuple[dict[str, Any], list[bytes]]:
    """A message signed by jupyter_client, and its frames."""
    session = Session(key=key.encode())
    msg = session.msg(msg_type, VALID_CONTENT if content is None else content)
    return msg, session.serialize(msg)


def fake_kernel(ctx: Context, port: int, frames: list[bytes]) -> list[bytes]:
    """Send `frames` from a REQ socket, as a kernel would, and return the reply's frames."""
    with ctx.socket(zmq.REQ) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, PEER_TIMEOUT_MS)
        sock.setsockopt(zmq.RCVTIMEO, PEER_TIMEOUT_MS)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send_multipart(frames)
        return sock.recv_multipart()


async def exchange(
    ctx: Context, registration: Registration, frames: list[bytes]
) -> tuple[list[bytes], ConnectionInfo | HandshakeError]:
    """Run `registration.wait()` against a fake kernel sending `frames`.

    Returns the reply the kernel got and what `wait` returned or raised.
    """
    outcome: list[ConnectionInfo | HandshakeError] = []

    async def supervisor_side() -> None:
        try:
            outcome.append(await registration.wait())
        except HandshakeError as exc:
            outcome.append(exc)

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor_side)
            reply = await trio.to_thread.run_sync(fake_kernel, ctx, registration.port, frames)
    return reply, outcome[0]


def error_reason(reply: list[bytes]) -> str:
    """The reason in a plain-JSON error reply (asserting that it is one)."""
    assert len(reply) == 1
    body = json.loads(reply[0])
    assert body.keys() == {"status", "error"}
    assert body["status"] == "error"
    assert isinstance(body["error"], str)
    assert body["error"]
    return body["error"]


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("5.3", False),
        ("5.4", False),
        ("5.5", True),
        ("5.5.0", True),
        ("5.10", True),
        ("6.0", True),
        ("4.9", False),
        ("5", False),
        ("", False),
        ("abc", False),
        ("5.x", False),
        ("5.5.x", False),
        ("-5.5", False),
        (None, False),
    ],
)
def test_wants_handshake(version: str | None, expected: bool) -> None:
    assert wants_handshake(version) is expected


def test_file_contents(ctx: Context) -> None:
    with Registration(ctx, KEY) as registration:
        contents = registration.file_contents()
    assert contents == {
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "ip": "127.0.0.1",
        "key": KEY,
        "registration_port": registration.port,
    }
    assert 1 <= registration.port <= 65535
    # It goes into a JSON file as is.
    assert json.loads(json.dumps(contents)) == contents


async def test_valid_request_returns_the_kernels_ports(ctx: Context) -> None:
    request, frames = request_frames()
    with Registration(ctx, KEY) as registration:
        reply, outcome = await exchange(ctx, registration, frames)

    assert outcome == ConnectionInfo(
        shell_port=50001,
        iopub_port=50002,
        stdin_port=50003,
        control_port=50004,
        hb_port=50005,
        key=KEY,
        transport="tcp",
        ip="127.0.0.1",
    )

    assert reply[0] == DELIMITER
    _, ours = deserialize(reply, Signer(KEY.encode()))
    assert ours.msg_type == "handshake_reply"
    assert ours.msg_id != request["header"]["msg_id"]

    theirs = Session(key=KEY.encode()).deserialize(reply[1:])
    assert theirs["msg_type"] == "handshake_reply"
    assert theirs["content"] == {"status": "ok", "capabilities": {}}
    assert theirs["metadata"] == {}
    # jupyter_client turns dates into datetimes on both sides, so the headers compare equal.
    assert theirs["parent_header"] == request["header"]


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        pytest.param(
            request_frames(key="ffeeddccbbaa99887766554433221100")[1],
            "signature",
            id="bad-signature",
        ),
        pytest.param(request_frames(key="")[1], "not signed", id="unsigned"),
        pytest.param([b"hello"], "delimiter", id="not-a-jupyter-message"),
        pytest.param([DELIMITER, b"sig"], "frames", id="too-few-frames"),
    ],
)
async def test_unreadable_request_gets_an_error_frame(
    ctx: Context, frames: list[bytes], reason: str
) -> None:
    with Registration(ctx, KEY) as registration:
        reply, outcome = await exchange(ctx, registration, frames)
    assert isinstance(outcome, HandshakeError)
    assert reason in str(outcome)
    assert error_reason(reply) == str(outcome)


async def test_content_that_is_not_json_gets_an_error_frame(ctx: Context) -> None:
    _, frames = request_frames()
    frames[-1] = b"{not json"
    frames[1] = Session(key=KEY.encode()).sign(frames[2:])
    with Registration(ctx, KEY) as registration:
        reply, outcome = await exchange(ctx, registration, frames)
    assert isinstance(outcome, HandshakeError)
    assert "content is not valid JSON" in error_reason(reply)


async def test_other_message_type_gets_an_error_frame(ctx: Context) -> None:
    # Kallichore sends no reply here, leaving the kernel waiting; we tell it what went wrong.
    _, frames = request_frames("kernel_info_request", {})
    with Registration(ctx, KEY) as registration:
        reply, outcome = await exchange(ctx, registration, frames)
    assert isinstance(outcome, HandshakeError)
    assert "kernel_info_request" in error_reason(reply)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(PORTS, "missing hb_port", id="missing"),
        pytest.param({}, "missing shell_port, iopub_port, stdin_port", id="empty"),
        pytest.param({**PORTS, "hb_port": "50005"}, "hb_port must be an integer", id="string"),
        pytest.param({**PORTS, "hb_port": 5.5}, "hb_port must be an integer", id="float"),
        pytest.param({**PORTS, "hb_port": True}, "hb_port must be an integer", id="bool"),
        pytest.param({**PORTS, "hb_port": None}, "hb_port must be an integer", id="null"),
        pytest.param({**PORTS, "hb_port": 0}, "hb_port must be between", id="zero"),
        pytest.param({**PORTS, "hb_port": 65536}, "hb_port must be between", id="too-big"),
        pytest.param({**PORTS, "hb_port": -1}, "hb_port must be between", id="negative"),
    ],
)
async def test_invalid_ports_get_an_error_frame(
    ctx: Context, content: dict[str, Any], reason: str
) -> None:
    _, frames = request_frames(content=content)
    with Registration(ctx, KEY) as registration:
        reply, outcome = await exchange(ctx, registration, frames)
    assert isinstance(outcome, HandshakeError)
    assert reason in error_reason(reply)


async def test_only_one_request_is_accepted(ctx: Context) -> None:
    with Registration(ctx, KEY) as registration:
        _, outcome = await exchange(ctx, registration, request_frames()[1])
        assert isinstance(outcome, ConnectionInfo)
        with pytest.raises(trio.ClosedResourceError):
            await registration.wait()


async def test_cancelled_wait_leaves_the_registration_usable(ctx: Context) -> None:
    with Registration(ctx, KEY) as registration:
        with trio.move_on_after(0.05) as scope:
            await registration.wait()
        assert scope.cancelled_caught
        _, outcome = await exchange(ctx, registration, request_frames()[1])
        assert isinstance(outcome, ConnectionInfo)


async def test_close_after_a_cancelled_wait(ctx: Context) -> None:
    registration = Registration(ctx, KEY)
    with trio.fail_after(HANG_GUARD):
        with trio.move_on_after(0.05) as scope:
            await registration.wait()
        assert scope.cancelled_caught
        registration.close()
        registration.close()
        with pytest.raises(trio.ClosedResourceError):
            await registration.wait()


async def test_close_wakes_a_waiting_task(ctx: Context) -> None:
    registration = Registration(ctx, KEY)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await registration.wait()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            registration.close()


# -- the launcher, end to end --------------------------------------------------------------------


def write_registration(path: Path, contents: dict[str, Any]) -> Path:
    path.write_text(json.dumps(contents, indent=2))
    path.chmod(0o600)
    return path


async def start_launcher(registration_file: Path, log: Path) -> trio.Process:
    with log.open("wb") as out:
        return await trio.lowlevel.open_process(
            [sys.executable, str(LAUNCHER), str(registration_file)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


async def stop(process: trio.Process) -> None:
    """Kill the launcher's whole process group and reap it."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with trio.CancelScope(shield=True):
        await process.wait()


async def registered(
    registration: Registration, process: trio.Process, log: Path
) -> ConnectionInfo:
    """`registration.wait()`, failing at once, with the launcher's output, if it exits first."""

    async def fail_on_exit() -> None:
        await process.wait()
        pytest.fail(f"the launcher exited with {process.returncode}:\n{log.read_text()}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail_on_exit)
        info = await registration.wait()
        nursery.cancel_scope.cancel()
    return info


def kernel_info(info: ConnectionInfo) -> dict[str, Any]:
    """A kernel_info_reply from the kernel at `info`, by jupyter_client (signing with its key)."""
    client = BlockingKernelClient()
    client.load_connection_info(cast(KernelConnectionInfo, info.to_dict()))
    client.start_channels()
    try:
        client.wait_for_ready(timeout=HANG_GUARD / 2)
        msg_id = client.kernel_info()
        while True:
            reply: dict[str, Any] = client.get_shell_msg(timeout=HANG_GUARD / 2)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply
    finally:
        client.stop_channels()


async def test_launcher_registers_a_running_ipykernel(ctx: Context, tmp_path: Path) -> None:
    # Beside the session's sshd and Slurm daemons (tests/remote_hosts.py), if they run.
    before = set(psutil.Process().children(recursive=True))
    key = new_key()
    log = tmp_path / "launcher.log"
    with trio.fail_after(HANG_GUARD), Registration(ctx, key) as registration:
        path = write_registration(tmp_path / "registration.json", registration.file_contents())
        process = await start_launcher(path, log)
        try:
            info = await registered(registration, process, log)
            assert info.key == key
            assert info.ip == "127.0.0.1"
            reply = await trio.to_thread.run_sync(kernel_info, info)
            assert reply["msg_type"] == "kernel_info_reply"
            assert reply["content"]["status"] == "ok"
            assert reply["content"]["implementation"] == "ipython"
        finally:
            await stop(process)
    assert set(psutil.Process().children(recursive=True)) <= before


async def test_launcher_exits_when_the_handshake_is_rejected(ctx: Context, tmp_path: Path) -> None:
    before = set(psutil.Process().children(recursive=True))
    log = tmp_path / "launcher.log"
    with trio.fail_after(HANG_GUARD), Registration(ctx, KEY) as registration:
        wrong_key = {**registration.file_contents(), "key": new_key()}
        path = write_registration(tmp_path / "registration.json", wrong_key)
        process = await start_launcher(path, log)
        try:
            with pytest.raises(HandshakeError, match="signature"):
                await registration.wait()
            assert await process.wait() == 1
        finally:
            await stop(process)
    assert "jep66_launcher: the supervisor rejected the handshake" in log.read_text()
    assert set(psutil.Process().children(recursive=True)) <= before


def curve_kernel(
    ctx: Context, registration: RemoteRegistration, frames: list[bytes]
) -> list[bytes]:
    """`fake_kernel` as our remote shim sends: a CurveZMQ client of the registration."""
    with ctx.socket(zmq.REQ) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, PEER_TIMEOUT_MS)
        sock.curve_serverkey = registration.public_key.encode()
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.connect(registration.url)
        sock.send_multipart(frames)
        return sock.recv_multipart()


async def test_a_remote_registration_takes_only_the_request_its_shim_vouched_for(
    ctx: Context,
) -> None:
    """Anybody who can reach the socket (and read the order, which names its public key) can
    send a well-signed request with a key of their own: refused, and the registration goes on
    waiting for the one whose digest the launcher's output vouched for."""
    kernel_secrets = {"key": new_key(), "ip": "127.0.0.1"}
    public, secret = (key.decode() for key in zmq.curve_keypair())
    kernel_secrets |= {"curve_publickey": public, "curve_secretkey": secret}
    _, ours = request_frames(content={**VALID_CONTENT, **kernel_secrets}, key=kernel_secrets["key"])
    stranger_key = new_key()
    _, stranger = request_frames(
        content={**VALID_CONTENT, "key": stranger_key, "ip": "127.0.0.1"}, key=stranger_key
    )
    vouched_for = {request_digest(ours)}

    async def vouched(digest: str) -> bool:
        return digest in vouched_for

    with RemoteRegistration(ctx, "127.0.0.1") as registration:
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                infos: list[ConnectionInfo] = []

                async def daemon_side() -> None:
                    infos.append(await registration.wait_vouched(vouched))

                nursery.start_soon(daemon_side)
                refused = await trio.to_thread.run_sync(curve_kernel, ctx, registration, stranger)
                assert "no launcher of ours vouched" in error_reason(refused)
                reply = await trio.to_thread.run_sync(curve_kernel, ctx, registration, ours)
    _, answer = deserialize(reply, Signer(kernel_secrets["key"].encode()))
    assert answer.msg_type == "handshake_reply"
    [info] = infos
    assert info.key == kernel_secrets["key"]
    assert info.curve_secretkey == secret
    assert info.shell_port == PORTS["shell_port"]
