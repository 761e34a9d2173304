"""Per-session channel sockets: naming, permissions, lifecycle, WebSocket serving, liveness."""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
import wsproto
import wsproto.events

from kallichore.channels import websocket
from kallichore.channels.broker import ChannelBroker
from kallichore.channels.websocket import MAX_UNANSWERED_PINGS
from kallichore.client import Channels, execute_request, open_channels
from kallichore.server import session_sockets
from kallichore.server.private_dir import private_socket_dir, socket_base
from kallichore.server.session_sockets import (
    MAX_SOCKET_PATH_BYTES,
    SessionSockets,
    SocketPathTooLong,
    session_socket_path,
)
from kallichore.session.kernel_session import KernelSession
from kallichore.supervisor import Supervisor
from tests.conftest import ipykernel_spec, kernel_events, stream_text, until

TIMEOUT = 30


async def start_sockets(
    nursery: trio.Nursery, socket_dir: Path, ping_interval: float = 10.0
) -> SessionSockets:
    sockets = SessionSockets(ChannelBroker(), socket_dir, os.getpid(), ping_interval=ping_interval)
    await nursery.start(sockets.run)
    return sockets


@pytest.fixture
async def sockets(nursery: trio.Nursery, short_dir: Path) -> SessionSockets:
    return await start_sockets(nursery, short_dir)


@asynccontextmanager
async def connect(path: Path, session_id: str) -> AsyncIterator[Channels]:
    """A channels connection on a session socket, asking for the path Positron asks for."""
    stream = await trio.open_unix_socket(str(path))
    async with open_channels(stream, "localhost", f"/api/channels/{session_id}") as channels:
        yield channels


async def attached(session: KernelSession) -> None:
    with trio.fail_after(TIMEOUT):
        while not session.connected:
            await trio.sleep(0.01)


async def refused_frame(channels: Channels) -> None:
    """Send an execute_request to a session without kernel: its refusal proves the link works."""
    msg_id = await channels.send(execute_request("1"))
    [error] = kernel_events(await until(channels, lambda f: "error" in f, TIMEOUT), "error")
    assert error["msg_id"] == msg_id
    assert error["code"] == "KS-3"


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    with trio.fail_after(TIMEOUT):
        while chunk := await stream.receive_some():
            received += chunk
    return received


async def until_closed(
    channels: Channels,
) -> tuple[list[dict[str, Any]], trio_websocket.CloseReason | None]:
    """The frames received until the server closed the WebSocket, and its close reason."""
    received = []
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                received.append(await channels.receive_frame())
            except trio_websocket.ConnectionClosed as closed:
                return received, closed.reason


def test_socket_path_holds_the_whole_session_id() -> None:
    path = session_socket_path(Path("/tmp/kc"), "python-3a9f2c1e", 4321)
    assert path == Path("/tmp/kc/kc-4321-python-3a9f2c1e.sock")


def test_a_path_too_long_for_the_full_id_uses_a_hash() -> None:
    socket_dir = Path("/tmp") / ("d" * 60)
    session_id = "python-" + "3a" * 40
    path = session_socket_path(socket_dir, session_id, 4321)
    assert path.parent == socket_dir
    assert re.fullmatch(r"kc-[0-9a-f]{16}\.sock", path.name)
    assert len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES
    assert session_socket_path(socket_dir, session_id, 4321) == path
    assert session_socket_path(socket_dir, session_id, 4322) != path


def test_a_socket_dir_too_long_for_any_name_is_refused() -> None:
    socket_dir = Path("/tmp") / ("d" * 90)
    with pytest.raises(
        SocketPathTooLong, match=r"is 120 bytes long; the limit is 104 bytes"
    ) as raised:
        session_socket_path(socket_dir, "python-1", 4321)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("socket_dir", [Path("/tmp/kc"), Path("/tmp") / ("d" * 60)])
def test_session_ids_with_a_common_prefix_get_distinct_paths(socket_dir: Path) -> None:
    # Kallichore kept only the first 8 characters: these all shared one path.
    session_ids = [f"python-3{c}{n:04x}" + "0" * 20 for c in "0123456789abcdef" for n in range(64)]
    paths = {session_socket_path(socket_dir, session_id, 4321) for session_id in session_ids}
    assert len(paths) == len(session_ids)


async def test_execute_over_a_session_socket(
    supervisor: Supervisor, sockets: SessionSockets
) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    path = await sockets.open(session)
    assert sockets.path(session.session_id) == path
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    async with connect(path, session.session_id) as channels:
        frames = (await channels.execute("print('over the socket')")).frames
        assert session.connected
    # The events of the start, buffered before anyone connected, come first.
    assert frames[0] == {
        "kind": "kernel",
        "status": {"status": "starting", "reason": "start API called"},
    }
    assert stream_text(frames) == "over the socket\n"
    [reply] = [
        f for f in frames if f["kind"] == "jupyter" and f["header"]["msg_type"] == "execute_reply"
    ]
    assert reply["content"]["status"] == "ok"
    with trio.fail_after(TIMEOUT):
        while session.connected:
            await trio.sleep(0.01)


async def test_reopen_and_close(
    supervisor: Supervisor, sockets: SessionSockets, short_dir: Path
) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    first_path = await sockets.open(session)
    async with connect(first_path, session.session_id) as first:
        await attached(session)
        path = await sockets.open(session)
        # The name depends only on the session and the server: the old socket is replaced.
        assert path == first_path
        assert list(short_dir.iterdir()) == [path]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # The attached client is not disturbed until someone uses the new socket.
        await refused_frame(first)
        async with connect(path, session.session_id) as second:
            await refused_frame(second)
            sockets.close(session.session_id)
            assert not path.exists()
            assert sockets.path(session.session_id) is None
            with pytest.raises(FileNotFoundError):
                await trio.open_unix_socket(str(path))
            # close() leaves an attached client alone.
            await refused_frame(second)
    sockets.close(session.session_id)  # closing twice is harmless


async def test_concurrent_opens_leave_one_working_socket(
    supervisor: Supervisor, sockets: SessionSockets, short_dir: Path
) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(sockets.open, session)
    path = sockets.path(session.session_id)
    assert path is not None
    assert list(short_dir.iterdir()) == [path]
    async with connect(path, session.session_id) as channels:
        await refused_frame(channels)


async def test_cancelling_run_removes_every_socket_file(
    supervisor: Supervisor, short_dir: Path
) -> None:
    sessions = [
        await supervisor.create_session(ipykernel_spec(session_id))
        for session_id in ("python-3a000001", "python-3f000001")
    ]
    async with trio.open_nursery() as nursery:
        sockets = await start_sockets(nursery, short_dir)
        paths = [await sockets.open(session) for session in sessions]
        assert len(set(paths)) == 2
        assert all(path.exists() for path in paths)
        async with connect(paths[0], sessions[0].session_id):
            await attached(sessions[0])
            nursery.cancel_scope.cancel()
    assert not list(short_dir.iterdir())
    assert sockets.path(sessions[0].session_id) is None
    with pytest.raises(RuntimeError):
        await sockets.open(sessions[0])


async def test_a_stale_socket_file_is_replaced(
    supervisor: Supervisor, sockets: SessionSockets, short_dir: Path
) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    path = session_socket_path(short_dir, session.session_id, os.getpid())
    stale = trio.socket.socket(trio.socket.AF_UNIX)
    await stale.bind(str(path))
    stale.close()
    assert path.exists()
    assert await sockets.open(session) == path
    async with connect(path, session.session_id) as channels:
        await refused_frame(channels)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x00\x01 binary, or raw WebSocket frames",
        b"POST /api/channels/x HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /api/channels/x HTTP/1.1\r\nHost: localhost\r\n\r\n",  # not an upgrade
    ],
)
async def test_a_client_without_a_websocket_handshake_is_closed(
    supervisor: Supervisor,
    sockets: SessionSockets,
    request_bytes: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "kallichore.server.session_sockets")
    session = await supervisor.create_session(ipykernel_spec())
    path = await sockets.open(session)
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(request_bytes)
        answer = await read_until_closed(stream)
    if request_bytes.startswith(b"GET "):
        assert answer.startswith(b"HTTP/1.1 400 ")
    else:
        assert answer == b""
        assert "raw WebSocket frames are not supported" in caplog.text
    assert not session.connected
    # The listener is still there for the next client.
    async with connect(path, session.session_id) as channels:
        await refused_frame(channels)


async def test_a_connection_that_fails_ends_alone(
    supervisor: Supervisor,
    sockets: SessionSockets,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug met while serving one client is logged; the listener serves the next one."""
    session = await supervisor.create_session(ipykernel_spec())
    path = await sockets.open(session)

    async def failing(*args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(session_sockets, "serve_channels", websocket.serve_channels)
        raise RuntimeError("a bug")

    monkeypatch.setattr(session_sockets, "serve_channels", failing)
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(
            b"GET /api/channels/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 101 ")
    assert "a channels connection failed" in caplog.text
    async with connect(path, session.session_id) as channels:
        await refused_frame(channels)


async def test_binary_frames_are_ignored_and_an_empty_text_frame_is_refused(
    supervisor: Supervisor, sockets: SessionSockets
) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    path = await sockets.open(session)
    async with connect(path, session.session_id) as channels:
        await channels.websocket.send_message(b"\x00binary")
        await refused_frame(channels)
        # An empty text frame is a bad frame, not a goodbye: refused, and the link lives.
        await channels.websocket.send_message("")
        [error] = kernel_events(await until(channels, lambda f: "error" in f, TIMEOUT), "error")
        assert "not valid JSON" in error["message"]
        assert "msg_id" not in error
        await refused_frame(channels)
        assert session.connected


async def test_a_client_that_vanishes_mid_output_is_detached(
    supervisor: Supervisor, sockets: SessionSockets, caplog: pytest.LogCaptureFixture
) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    path = await sockets.open(session)
    code = "import time\nfor i in range(2000):\n    print(i, flush=True)\n    time.sleep(0.001)"
    async with trio.open_nursery() as nursery, await trio.open_unix_socket(str(path)) as stream:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/")
        vanishing = Channels(ws)
        await vanishing.send(execute_request(code))
        await until(vanishing, lambda f: "10" in stream_text([f]))
        nursery.cancel_scope.cancel()  # gone without a Close frame
    with trio.fail_after(TIMEOUT):
        while session.connected:
            await trio.sleep(0.01)
    async with connect(path, session.session_id) as channels:
        frames = (await channels.execute("print('next')")).frames
    assert stream_text(frames).endswith("next\n")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_client_that_answers_pings_stays(
    supervisor: Supervisor, nursery: trio.Nursery, short_dir: Path
) -> None:
    sockets = await start_sockets(nursery, short_dir, ping_interval=0.05)
    session = await supervisor.create_session(ipykernel_spec())
    path = await sockets.open(session)
    async with connect(path, session.session_id) as channels:
        await attached(session)
        await trio.sleep(0.05 * (MAX_UNANSWERED_PINGS + 2) * 4)
        assert session.connected
        await refused_frame(channels)


async def test_a_client_that_never_answers_pings_is_dropped(
    supervisor: Supervisor, nursery: trio.Nursery, short_dir: Path
) -> None:
    """A raw client completes the handshake and reads everything, but never sends a pong."""
    sockets = await start_sockets(nursery, short_dir, ping_interval=0.02)
    session = await supervisor.create_session(ipykernel_spec())
    path = await sockets.open(session)
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    request = wsproto.events.Request(host="localhost", target=f"/api/channels/{session.session_id}")
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(client.send(request))
        client.receive_data(await read_until_closed(stream))
    events = list(client.events())
    assert isinstance(events[0], wsproto.events.AcceptConnection)
    pings = [e.payload for e in events if isinstance(e, wsproto.events.Ping)]
    # One ping per interval, numbered from 1, until more than 3 are unanswered.
    assert pings == [n.to_bytes(8, "big") for n in range(1, MAX_UNANSWERED_PINGS + 2)]
    assert isinstance(events[-1], wsproto.events.CloseConnection)
    assert not session.connected
    async with connect(path, session.session_id) as channels:
        await refused_frame(channels)


async def test_a_second_client_displaces_the_first(
    supervisor: Supervisor, sockets: SessionSockets
) -> None:
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    path = await sockets.open(session)
    async with connect(path, session.session_id) as first:
        await first.execute("x = 1")
        async with connect(path, session.session_id) as second:
            received, closed = await until_closed(first)
            assert closed is not None
            assert closed.code == 1008
            [reason] = kernel_events(received, "clientDisconnected")
            assert "another client" in reason
            assert received[-1] == {"kind": "kernel", "clientDisconnected": reason}
            frames = (await second.execute("print(x + 1)")).frames
    assert stream_text(frames) == "2\n"


async def test_pings_during_batched_output_never_corrupt_frames(
    supervisor: Supervisor,
    nursery: trio.Nursery,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batches are written in one go; pings written meanwhile must not land inside them."""
    # A client that parses more slowly than the kernel prints answers pings late (they wait
    # behind the output); on a loaded machine that would get it dropped, which is not what
    # this is about.
    monkeypatch.setattr(websocket, "MAX_UNANSWERED_PINGS", 1_000_000)
    sockets = await start_sockets(nursery, short_dir, ping_interval=0.05)
    session = await supervisor.create_session(ipykernel_spec())
    await session.start()
    path = await sockets.open(session)
    code = "for i in range(3000):\n    print(i, flush=True)"
    async with connect(path, session.session_id) as channels:
        frames = (await channels.execute(code)).frames
        # The server closes: trio-websocket's client fails on a ping after its own Close.
        await session.shutdown()
        await supervisor.delete(session.session_id)
        _, closed = await until_closed(channels)
        assert closed is not None
        assert closed.code == 1001
    assert stream_text(frames) == "".join(f"{i}\n" for i in range(3000))


def test_the_private_socket_dir_is_fresh_ours_alone_and_removed(short_dir: Path) -> None:
    with private_socket_dir(short_dir) as first, private_socket_dir(short_dir) as second:
        assert first != second
        for path in (first, second):
            assert path.parent == short_dir
            assert stat.S_IMODE(path.stat().st_mode) == 0o700
        (first / "kc-1-python.sock").touch()
    assert not first.exists()
    assert not second.exists()


def test_the_socket_base_is_the_runtime_dir_when_our_paths_fit_there(
    monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    assert socket_base(short_dir, MAX_SOCKET_PATH_BYTES) == short_dir
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert socket_base(None, MAX_SOCKET_PATH_BYTES) == Path("/run/user/1000")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/" + "x" * 60)
    assert socket_base(None, MAX_SOCKET_PATH_BYTES) == Path(tempfile.gettempdir())
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert socket_base(None, MAX_SOCKET_PATH_BYTES) == Path(tempfile.gettempdir())
