"""kallichore.client against the daemon (a subprocess) on TCP and on its Unix socket, with real
ipykernel; and its frame decoding and execution tracking without a server."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import trio_websocket

from kallichore.client import (
    ApiError,
    ChannelEvent,
    ClientDisconnected,
    ExecutionTracker,
    HandshakeCompleted,
    KallichoreClient,
    KernelExited,
    KernelMessage,
    MessageRefused,
    ResourceUsage,
    StartupFailed,
    StatusChanged,
    UnknownEvent,
    decode_frame,
    execute_request,
    open_channels,
)
from tests.conftest import IPYKERNEL_ARGV, daemon, started_session

TIMEOUT = 60


@pytest.fixture(params=["tcp", "socket"])
async def kallichore(
    request: pytest.FixtureRequest, tmp_path: Path, short_dir: Path
) -> AsyncIterator[KallichoreClient]:
    """A client made from the connection file (and its generated token) of a daemon on each
    transport."""
    connection_file = tmp_path / "kallichore.json"
    # The grace a kernel gets to shut down is a hang guard here: on a loaded machine ipykernel
    # took more than the default 10 s, and the restart test then saw it killed (-9).
    args = ["--transport", request.param, "--socket-dir", str(short_dir)]
    args += ["--shutdown-grace", str(TIMEOUT)]
    async with (
        daemon(tmp_path, *args, connection_file=connection_file),
        KallichoreClient.from_connection_file(connection_file, timeout=TIMEOUT) as client,
    ):
        yield client


def is_status(status: str) -> Callable[[ChannelEvent], bool]:
    return lambda e: isinstance(e, StatusChanged) and e.status == status


async def test_a_session_from_creation_to_deletion(kallichore: KallichoreClient) -> None:
    created = await kallichore.create_session("python-1", IPYKERNEL_ARGV, display_name="Py")
    assert created == "python-1"
    [listed] = await kallichore.list_sessions()
    assert listed["display_name"] == "Py"
    info = await kallichore.start("python-1")
    assert info["status"] == "ok"
    assert info["language_info"]["name"] == "python"
    async with kallichore.channels("python-1") as channels:
        startup = await channels.receive_until(is_status("idle"))
        assert startup[0] == StatusChanged("starting", "start API called")
        result = await channels.execute("print('hello'); 6 * 7")
        assert result.status == "ok"
        assert result.idle
        assert result.stdout == "hello\n"
        assert result.outputs == [{"text/plain": "42"}]
        assert result.execution_count == 1
        assert result.error is None
        assert result.reply.msg_type == "execute_reply"
        assert result.seconds > 0
        session = await kallichore.get_session("python-1")
        assert session["connected"] is True
        assert session["status"] == "idle"
        await kallichore.kill("python-1")
        ended = await channels.receive_until(lambda e: isinstance(e, KernelExited))
        assert StatusChanged("exited", "child process exited") in ended
    with trio.fail_after(TIMEOUT):
        while (await kallichore.get_session("python-1"))["status"] != "exited":
            await trio.sleep(0.05)
    await kallichore.delete_session("python-1")
    assert await kallichore.list_sessions() == []


async def test_outputs_errors_and_requests(kallichore: KallichoreClient) -> None:
    await started_session(kallichore)
    async with kallichore.channels("python-1") as channels:
        failed = await channels.execute("import sys; print('to stderr', file=sys.stderr); 1 / 0")
        assert failed.status == "error"
        assert failed.stderr == "to stderr\n"
        assert failed.error is not None
        assert failed.error.name == "ZeroDivisionError"
        assert failed.error.value == "division by zero"
        assert "ZeroDivisionError" in "".join(failed.error.traceback)
        shown = await channels.execute(
            "from IPython.display import HTML, display\ndisplay(HTML('<b>x</b>'))"
        )
        [bundle] = shown.outputs
        assert bundle["text/html"] == "<b>x</b>"
        reply = await channels.request("kernel_info_request", {})
        assert reply.msg_type == "kernel_info_reply"
        assert reply.content["status"] == "ok"
        binary = await channels.execute(
            "from ipykernel.comm import Comm\nComm(target_name='t', buffers=[b'\\x00\\xff'])"
        )
        [opened] = [m for m in binary.messages if m.msg_type == "comm_open"]
        assert opened.buffers == (b"\x00\xff",)


async def test_a_session_from_a_kernelspec(kallichore: KallichoreClient) -> None:
    specs = await kallichore.kernelspecs()
    assert specs["default"] == "python3"
    assert specs["kernelspecs"]["python3"]["spec"]["language"] == "python"
    session_id = await kallichore.start_kernelspec("python3")
    assert session_id.startswith("python3-")
    session = await kallichore.get_session(session_id)
    assert (session["status"], session["language"]) == ("idle", "python")
    # `python` in the kernelspec is the daemon's own interpreter.
    assert session["argv"][0] == sys.executable
    with pytest.raises(ApiError) as unknown:
        await kallichore.start_kernelspec("cobol")
    assert unknown.value.status == 400
    assert "no kernelspec is named 'cobol'" in unknown.value.message
    with pytest.raises(ApiError) as both:
        await kallichore.create_session("both", IPYKERNEL_ARGV, kernel_name="python3")
    assert both.value.status == 400
    assert "either argv or kernel_name" in both.value.message


async def test_restart_with_a_working_directory_and_env(
    kallichore: KallichoreClient, tmp_path: Path
) -> None:
    await started_session(kallichore)
    async with kallichore.channels("python-1") as channels:
        await channels.receive_until(is_status("idle"))  # the start's
        await kallichore.restart(
            "python-1",
            working_directory=str(tmp_path),
            env=[{"action": "replace", "name": "RESTARTED", "value": "yes"}],
        )
        events = await channels.receive_until(lambda e: isinstance(e, KernelExited))
        assert events[-1] == KernelExited(0)
        events = await channels.receive_until(is_status("idle"))
        assert events[0] == StatusChanged("starting", "start API called")
        result = await channels.execute("import os; print(os.getcwd(), os.environ['RESTARTED'])")
    assert result.stdout == f"{tmp_path} yes\n"


async def test_interrupt(kallichore: KallichoreClient) -> None:
    await started_session(kallichore, interrupt_mode="signal")
    async with kallichore.channels("python-1") as channels:
        code = "import time\nprint('looping', flush=True)\nwhile True: time.sleep(0.05)"
        msg_id = await channels.send(execute_request(code))

        def is_looping(event: ChannelEvent) -> bool:
            return isinstance(event, KernelMessage) and event.content.get("text") == "looping\n"

        await channels.receive_until(is_looping)
        await kallichore.interrupt("python-1")
        [*_, reply] = await channels.receive_until(
            lambda e: isinstance(e, KernelMessage) and e.msg_type == "execute_reply"
        )
    assert isinstance(reply, KernelMessage)
    assert reply.parent_msg_id == msg_id
    assert reply.content["ename"] == "KeyboardInterrupt"


async def test_refusals_are_api_errors(kallichore: KallichoreClient, tmp_path: Path) -> None:
    await kallichore.create_session("python-1", IPYKERNEL_ARGV)
    with pytest.raises(ApiError) as duplicate:
        await kallichore.create_session("python-1", IPYKERNEL_ARGV)
    assert (duplicate.value.status, duplicate.value.code) == (400, "KS-0")
    assert "python-1" in duplicate.value.message
    with pytest.raises(ApiError) as unknown:
        await kallichore.get_session("nope")
    assert (unknown.value.status, unknown.value.code) == (404, None)
    with pytest.raises(ApiError) as no_channels:
        async with kallichore.channels("nope"):
            pass
    # TCP: the upgrade is refused with KS-1; the Unix socket: the request for the path is a 404.
    assert (no_channels.value.status, no_channels.value.code) in ((400, "KS-1"), (404, None))
    # A message for a session without a kernel is refused on the channels.
    async with kallichore.channels("python-1") as channels:
        with pytest.raises(ApiError) as refused:
            await channels.execute("1")
    assert (refused.value.status, refused.value.code) == (None, "KS-3")
    code = "import sys; print('no kernel today', flush=True); sys.exit(5)"
    await kallichore.create_session("python-2", [sys.executable, "-c", code])
    with pytest.raises(StartupFailed) as failed:
        await kallichore.start("python-2")
    assert (failed.value.status, failed.value.code) == (500, "KS-8")
    assert failed.value.exit_code == 5
    assert "no kernel today\n" in failed.value.output


async def test_the_token_is_sent(tmp_path: Path) -> None:
    async with daemon(tmp_path, "--transport", "tcp") as d, d.client(token=None) as anonymous:
        with pytest.raises(ApiError) as refused:
            await anonymous.create_session("python-1", IPYKERNEL_ARGV)
        assert (refused.value.status, refused.value.code) == (401, None)
        assert (await anonymous.status())["sessions"] == 0
        async with d.client() as client:
            await client.create_session("python-1", IPYKERNEL_ARGV)
            with pytest.raises(ApiError) as upgrade:
                async with anonymous.channels("python-1"):
                    pass
            assert upgrade.value.status == 401
            async with client.channels("python-1"):
                pass


async def test_server_endpoints_and_shutdown(tmp_path: Path, short_dir: Path) -> None:
    args = ["--transport", "socket", "--socket-dir", str(short_dir)]
    async with daemon(tmp_path, *args) as d, d.client() as client:
        status = await client.status()
        assert status["process_id"] == d.process.pid
        await client.set_server_configuration(resource_sample_interval_ms=200)
        assert (await client.server_configuration())["resource_sample_interval_ms"] == 200
        await client.client_heartbeat(os.getpid())
        await client.client_heartbeat()
        await client.create_session("python-1", [], connection_timeout=5)
        info = await client.connection_info("python-1")
        assert info.shell_port > 0
        assert info == await client.connection_info("python-1")
        await started_session(client, "python-2")
        async with client.channels("python-2") as channels:
            await channels.receive_until(lambda e: isinstance(e, ResourceUsage))
        await client.shutdown()
        assert await d.wait() == 0


async def test_a_second_client_displaces_the_first(kallichore: KallichoreClient) -> None:
    await started_session(kallichore)
    async with kallichore.channels("python-1") as first:
        await first.receive_until(is_status("idle"))
        async with kallichore.channels("python-1") as second:
            [*_, disconnected] = await first.receive_until(
                lambda e: isinstance(e, ClientDisconnected)
            )
            assert isinstance(disconnected, ClientDisconnected)
            assert disconnected.reason
            assert (await second.execute("print(1)")).stdout == "1\n"


# -- without a server --------------------------------------------------------------------------


def reply_frame(
    msg_id: str, channel: str, msg_type: str, content: dict[str, object]
) -> dict[str, object]:
    return {
        "kind": "jupyter",
        "header": {"msg_id": f"{msg_type}-1", "msg_type": msg_type},
        "parent_header": {"msg_id": msg_id, "msg_type": "execute_request"},
        "channel": channel,
        "content": content,
        "metadata": {},
        "buffers": [],
    }


REPLY = reply_frame("run", "shell", "execute_reply", {"status": "ok", "execution_count": 3})
IDLE = reply_frame("run", "iopub", "status", {"execution_state": "idle"})
OUTPUT = reply_frame("run", "iopub", "stream", {"name": "stdout", "text": "hi\n"})
OTHERS = reply_frame("other", "iopub", "stream", {"name": "stdout", "text": "not mine\n"})


@pytest.mark.parametrize("order", [[OUTPUT, OTHERS, REPLY, IDLE], [OUTPUT, IDLE, OTHERS, REPLY]])
def test_an_execution_ends_with_its_reply_and_its_idle_in_either_order(
    order: list[dict[str, object]],
) -> None:
    execution = ExecutionTracker("run", 0.0)
    for now, frame in enumerate(order, start=1):
        assert not execution.done
        execution.add(frame, float(now))
    assert execution.done
    result = execution.result()
    assert result.stdout == "hi\n"
    assert result.execution_count == 3
    assert len(result.events) == 4
    assert len(result.messages) == 3
    # (Timed to its own last message.)
    assert result.seconds == 4.0


def test_an_execution_refused_by_the_server_raises() -> None:
    execution = ExecutionTracker("run", 0.0)
    refusal = {"kind": "kernel", "error": {"code": "KS-3", "message": "no kernel", "msg_id": "x"}}
    execution.add(refusal, 1.0)  # somebody else's
    refusal["error"]["msg_id"] = "run"  # type: ignore[index]
    with pytest.raises(ApiError, match="no kernel"):
        execution.add(refusal, 2.0)


def test_supervisor_events_decode_to_their_classes() -> None:
    connection = {
        "control_port": 1,
        "shell_port": 2,
        "stdin_port": 3,
        "hb_port": 4,
        "iopub_port": 5,
        "signature_scheme": "hmac-sha256",
        "key": "k",
        "transport": "tcp",
        "ip": "127.0.0.1",
    }
    handshake = decode_frame({"kind": "kernel", "handshakeCompleted": ["py", connection]})
    assert isinstance(handshake, HandshakeCompleted)
    assert handshake.connection_info.to_dict() == connection
    assert decode_frame({"kind": "kernel", "exited": -1}) == KernelExited(-1)
    assert decode_frame({"kind": "kernel", "error": {"code": "KS-3", "message": "m"}}) == (
        MessageRefused("KS-3", "m", None)
    )
    assert decode_frame({"kind": "kernel", "newThing": [1]}) == UnknownEvent("newThing", [1])
    # Jupyter Server's frames carry no `kind`; an empty parent header is no parent.
    untagged = decode_frame({**OUTPUT, "kind": None, "parent_header": {}})
    assert isinstance(untagged, KernelMessage)
    assert untagged.parent_msg_id is None


async def test_execute_gives_up_on_a_lost_idle_after_a_quiet_spell(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer that answers an execute_request with its reply and never the idle."""
    client_end, server_end = trio.testing.memory_stream_pair()

    async def peer() -> None:
        request = await trio_websocket.wrap_server_stream(nursery, server_end)
        websocket = await request.accept()
        msg_id = json.loads(await websocket.get_message())["header"]["msg_id"]
        output = reply_frame(msg_id, "iopub", "stream", {"name": "stdout", "text": "hi\n"})
        reply = reply_frame(
            msg_id, "shell", "execute_reply", {"status": "ok", "execution_count": 3}
        )
        for frame in (output, reply):
            await websocket.send_message(json.dumps(frame))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        async with open_channels(client_end, "localhost", "/") as channels:
            started = trio.current_time()
            result = await channels.execute("print('hi')", idle_timeout=5)
            assert trio.current_time() - started == pytest.approx(5, abs=0.1)
        nursery.cancel_scope.cancel()
    assert not result.idle
    assert result.stdout == "hi\n"
    assert result.execution_count == 3
