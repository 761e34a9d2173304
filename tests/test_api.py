"""The Kallichore API over HTTP and WebSocket: real server on loopback, real ipykernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
import httpx
import psutil
import pytest
import trio
import trio_websocket
import wsproto
import wsproto.events

from kallichore.client import (
    ApiError,
    KallichoreClient,
    StartupFailed,
    execute_request,
    message,
    open_channels,
)
from kallichore.server.http import RunningServer
from kallichore.supervisor import Supervisor
from tests.conftest import (
    IPYKERNEL_ARGV,
    TIMEOUT,
    TOKEN,
    is_idle,
    is_reply,
    kernel_events,
    new_session_body,
    started_session,
    stream_text,
    until,
)


async def test_create_start_connect_and_execute(client: KallichoreClient) -> None:
    await client.create_session(**new_session_body("python-1"))
    info = await client.start("python-1")
    assert info["status"] == "ok"
    async with client.channels("python-1") as channels:
        startup = await until(
            channels,
            lambda f: f.get("kind") == "kernel" and f.get("status", {}).get("status") == "idle",
        )
        statuses = kernel_events(startup, "status")
        assert statuses[0] == {"status": "starting", "reason": "start API called"}
        assert statuses[-1] == {"status": "idle", "reason": "kernel_info_request"}
        frames = (await channels.execute("print('hello'); print('world')")).frames
        assert stream_text(frames) == "hello\nworld\n"
        [reply] = [f for f in frames if f.get("kind") == "jupyter" and f["channel"] == "shell"]
        assert reply["header"]["msg_type"] == "execute_reply"
        assert set(reply["header"]) == {"msg_id", "msg_type"}
        assert set(reply["parent_header"]) == {"msg_id", "msg_type"}
        assert list(reply) == [
            "kind",
            "header",
            "parent_header",
            "channel",
            "content",
            "metadata",
            "buffers",
        ]


def status_is(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("kind") == "kernel" and f.get("status", {}).get("status") == status


async def test_output_of_every_frame_size_and_non_ascii_text_arrives_intact(
    client: KallichoreClient,
) -> None:
    # Frames under 126 bytes, up to 64 KiB and beyond have three different length encodings.
    sizes = [1, 60, 200, 65_000, 70_000, 300_000]
    await started_session(client)
    async with client.channels("python-1") as channels:
        frames = (
            await channels.execute(
                "import sys\n"
                f"for n in {sizes}:\n"
                "    sys.stdout.write('x' * (n - 1) + '\\n'); sys.stdout.flush()\n"
                "print('é€😀' * 1000)\n"
            )
        ).frames
    expected = "".join("x" * (n - 1) + "\n" for n in sizes) + "é€😀" * 1000 + "\n"
    assert stream_text(frames) == expected


async def test_stdin_round_trip(client: KallichoreClient) -> None:
    await started_session(client)
    async with client.channels("python-1") as channels:
        msg_id = await channels.send(
            execute_request("name = input('who? ')\nprint('hi', name)", allow_stdin=True)
        )
        [request] = [
            f
            for f in await until(channels, lambda f: f.get("channel") == "stdin")
            if f.get("channel") == "stdin"
        ]
        assert request["header"]["msg_type"] == "input_request"
        assert request["content"]["prompt"] == "who? "
        # Positron answers with a trimmed parent header; the server rebuilds it.
        await channels.send(
            message("input_reply", {"value": "there"}, "stdin", parent_header=request["header"])
        )
        frames = await until(channels, lambda f: is_idle(f, msg_id))
    assert "hi there\n" in stream_text(frames)


@pytest.mark.parametrize("mode", ["message", "signal"])
async def test_interrupt_endpoint(client: KallichoreClient, mode: str) -> None:
    await started_session(client, interrupt_mode=mode)
    async with client.channels("python-1") as channels:
        msg_id = await channels.send(
            execute_request(
                "import time\nfor i in range(100):\n    print(i, flush=True)\n    time.sleep(0.1)\n"
                "print('all iterations completed')"
            )
        )
        received = await until(channels, lambda f: stream_text([f]).startswith("3"))
        response = await client.http.post("/sessions/python-1/interrupt")
        assert response.status_code == 200
        assert response.json() is None
        frames = await until(channels, lambda f: is_reply(f, msg_id, "execute_reply"), timeout=30)
    [reply] = [f for f in frames if is_reply(f, msg_id, "execute_reply")]
    assert reply["content"]["status"] == "error"
    assert "all iterations completed" not in stream_text(received + frames)


async def test_restart_keeps_the_socket_and_clears_state(client: KallichoreClient) -> None:
    await started_session(client)
    async with client.channels("python-1") as channels:
        await channels.execute("x = 1")
        response = await client.http.post(
            "/sessions/python-1/restart",
            json={"env": [{"action": "replace", "name": "RESTART_TEST_VAR", "value": "restarted"}]},
        )
        assert response.status_code == 200, response.text
        assert response.json() is None
        frames = await until(
            channels,
            lambda f: f.get("status") == {"status": "idle", "reason": "kernel_info_request"},
        )
        statuses = [s["status"] for s in kernel_events(frames, "status")]
        assert statuses.index("exited") < statuses.index("starting")
        assert kernel_events(frames, "exited") == [0]
        result = await channels.execute("import os; print(os.environ['RESTART_TEST_VAR']); x")
    assert stream_text(result.frames) == "restarted\n"
    assert any(f.get("header", {}).get("msg_type") == "error" for f in result.frames)


async def test_shutdown_request_over_the_socket_then_delete(client: KallichoreClient) -> None:
    await started_session(client)
    async with client.channels("python-1") as channels:
        msg_id = await channels.send(message("shutdown_request", {"restart": False}, "control"))
        frames = await until(channels, lambda f: f.get("kind") == "kernel" and "exited" in f)
    [reply] = [
        f for f in frames if is_reply(f, msg_id, "shutdown_reply") and f["channel"] == "control"
    ]
    assert frames.index(reply) < len(frames) - 1
    assert kernel_events(frames, "exited") == [0]
    response = await client.http.delete("/sessions/python-1")
    assert response.status_code == 200
    assert (await client.http.get("/sessions")).json() == {"total": 0, "sessions": []}


async def test_shutdown_request_on_shell_also_works(client: KallichoreClient) -> None:
    await started_session(client)
    async with client.channels("python-1") as channels:
        msg_id = await channels.send(message("shutdown_request", {"restart": False}))
        await until(channels, lambda f: is_reply(f, msg_id, "shutdown_reply"))


async def test_reconnect_after_reload_gets_what_was_missed(client: KallichoreClient) -> None:
    await started_session(client)
    async with client.channels("python-1") as channels:
        await until(channels, status_is("idle"))
        msg_id = await channels.send(
            execute_request("import time; time.sleep(0.5); print('while you were away')")
        )
    # The client is gone; the output happens with nobody attached.
    session = await client.get_session("python-1")
    assert session["connected"] is False or session["status"] in ("busy", "idle")
    assert session["kernel_info"]["status"] == "ok"
    with trio.fail_after(30):
        while (await client.get_session("python-1"))["status"] != "idle":
            await trio.sleep(0.1)
    async with client.channels("python-1") as channels:
        frames = await until(channels, lambda f: is_idle(f, msg_id))
        assert (await client.get_session("python-1"))["connected"] is True
    assert stream_text(frames) == "while you were away\n"


async def test_a_second_client_displaces_the_first_without_loss(client: KallichoreClient) -> None:
    await started_session(client)
    code = "import time\nfor i in range(300):\n    print(i, flush=True)\n    time.sleep(0.002)"
    async with client.channels("python-1") as first:
        received = await until(first, status_is("idle"))
        msg_id = await first.send(execute_request(code))
        received += await until(first, lambda f: "1" in stream_text([f]))
        async with client.channels("python-1") as second:
            with trio.fail_after(30):
                while True:
                    try:
                        received.append(await first.receive_frame())
                    except trio_websocket.ConnectionClosed:
                        break
            frames = await until(second, lambda f: is_idle(f, msg_id))
    assert kernel_events(received, "clientDisconnected")
    assert kernel_events(received, "clientDisconnected")[0]
    before = [f for f in received if "clientDisconnected" not in f]
    text = stream_text(before) + stream_text(frames)
    assert text == "".join(f"{i}\n" for i in range(300))


async def test_message_for_a_session_without_kernel_is_refused(client: KallichoreClient) -> None:
    await client.create_session(**new_session_body("python-1"))
    async with client.channels("python-1") as channels:
        msg_id = await channels.send(execute_request("1"))
        [error] = kernel_events(
            await until(channels, lambda f: f.get("kind") == "kernel" and "error" in f), "error"
        )
    assert error["msg_id"] == msg_id
    assert error["code"] == "KS-3"
    # Nothing was kept for the next kernel.
    await client.start("python-1")
    assert (await client.get_session("python-1"))["execution_queue"] == {"length": 0, "pending": []}


async def test_malformed_client_frames_get_an_error_and_the_socket_lives(
    client: KallichoreClient,
) -> None:
    await started_session(client)
    async with client.channels("python-1") as channels:
        for frame in [
            "not json",
            "[1]",
            '{"header": {}}',
            '{"header": {"msg_id": "a", "msg_type": "x"}, "channel": "iopub", "content": {}}',
            # An empty frame is a bad frame, not a goodbye.
            "",
            # Past Python's limit on the digits of an integer it parses.
            '{"header": {"msg_id": "a", "msg_type": "x"}, "channel": "shell", "content": {"n": '
            + "9" * 5000
            + "}}",
        ]:
            await channels.websocket.send_message(frame)
            await until(channels, lambda f: f.get("kind") == "kernel" and "error" in f)
        frames = (await channels.execute("print('still here')")).frames
    assert stream_text(frames) == "still here\n"


async def test_execution_queue(client: KallichoreClient, tmp_path: Path) -> None:
    await started_session(client)
    go_on = tmp_path / "go-on"
    async with client.channels("python-1") as channels:
        # The first task runs until we have seen the queue behind it.
        first = await channels.send(
            execute_request(
                "import os, time; print('Long task start')\n"
                f"while not os.path.exists({str(go_on)!r}): time.sleep(0.05)\n"
                "print('Long task end'); a = 1"
            )
        )
        second = await channels.send(execute_request("b = 2; print('Queued Second')"))
        third = await channels.send(execute_request("c = 3; print('Queued Third')"))
        fourth = await channels.send(execute_request("print('Queued Fourth:', a + b + c)"))
        with trio.fail_after(TIMEOUT):
            while (await client.get_session("python-1"))["execution_queue"]["length"] < 3:
                await trio.sleep(0.05)
        queue = (await client.get_session("python-1"))["execution_queue"]
        assert queue["active"]["header"]["msg_id"] == first
        assert [m["header"]["msg_id"] for m in queue["pending"]] == [second, third, fourth]
        go_on.touch()
        frames = await until(channels, lambda f: is_idle(f, fourth))
    assert kernel_events(frames, "executionQueued") == [second, third, fourth]
    text = stream_text(frames)
    assert text.index("Long task end") < text.index("Queued Second")
    assert "Queued Fourth: 6\n" in text
    assert (await client.get_session("python-1"))["execution_queue"] == {"length": 0, "pending": []}


async def test_adopt_a_kernel_started_from_connection_info(
    client: KallichoreClient, tmp_path: Path, nursery: trio.Nursery
) -> None:
    await client.create_session(**new_session_body("python-adopted", argv=[]))
    response = await client.http.get("/sessions/python-adopted/connection_info")
    assert response.status_code == 200
    info = response.json()
    assert list(info) == [
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
    connection_file = tmp_path / "adopted.json"
    connection_file.write_text(json.dumps(info))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "ipykernel_launcher", "-f", str(connection_file)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        response = await client.http.put("/sessions/python-adopted/adopt", json=info)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "ok"
        session = await client.get_session("python-adopted")
        assert "process_id" not in session
        async with client.channels("python-adopted") as channels:
            result = await channels.execute("print(1 + 1)")
            assert stream_text(result.frames) == "2\n"
            kill = await client.http.post("/sessions/python-adopted/kill")
            assert kill.status_code == 400
            assert kill.json()["code"] == "KS-12"
            await channels.send(message("shutdown_request", {"restart": False}, "control"))
            frames = await until(channels, lambda f: f.get("kind") == "kernel" and "exited" in f)
        assert kernel_events(frames, "exited") == [0]
        assert {
            "status": "exited",
            "reason": "all sockets disconnected from an adopted kernel",
        } in (kernel_events(frames, "status"))
    finally:
        with trio.fail_after(30):
            await process.wait()


async def test_adopt_with_an_unreachable_kernel_fails(client: KallichoreClient) -> None:
    await client.create_session(**new_session_body("python-adopted", argv=[], connection_timeout=1))
    info = await client.connection_info("python-adopted")
    with pytest.raises(ApiError) as failed:
        await client.adopt("python-adopted", info)
    assert (failed.value.status, failed.value.code) == (500, "KS-7")


async def test_working_directory_changes_are_reported(
    client: KallichoreClient, tmp_path: Path
) -> None:
    await started_session(client)
    async with client.channels("python-1") as channels:
        frames = (await channels.execute(f"import os; os.chdir({str(tmp_path)!r})")).frames
    assert kernel_events(frames, "workingDirChanged") == [str(tmp_path)]
    assert (await client.get_session("python-1"))["working_directory"] == str(tmp_path)


async def test_resource_usage_is_sampled_while_connected(
    client: KallichoreClient, supervisor: Supervisor
) -> None:
    supervisor.resource_sample_interval_ms = 200
    await started_session(client)
    async with client.channels("python-1") as channels:
        [usage] = kernel_events(
            await until(channels, lambda f: "resourceUsage" in f), "resourceUsage"
        )
    assert usage["memory_bytes"] > 0
    assert usage["thread_count"] >= 1
    assert usage["sampling_period_ms"] == 200
    assert usage["timestamp"] > 0
    assert list(usage) == [
        "cpu_percent",
        "memory_bytes",
        "thread_count",
        "sampling_period_ms",
        "timestamp",
    ]
    assert (await client.get_session("python-1"))["resource_usage"]["memory_bytes"] > 0


SHELL_PROBE = "import os; print('PID', os.getpid()); print('VAR', os.environ.get('TEST_KALLI_VAR'))"


@pytest.mark.parametrize("mode", ["shell", "command", "script"])
async def test_startup_environments(client: KallichoreClient, mode: str, tmp_path: Path) -> None:
    arg = None
    if mode == "command":
        arg = "export TEST_KALLI_VAR=from_command"
    elif mode == "script":
        script = tmp_path / "startup.sh"
        script.write_text("export TEST_KALLI_VAR=from_script\n")
        arg = str(script)
    await started_session(
        client,
        startup_environment=mode,
        startup_environment_arg=arg,
        working_directory=str(tmp_path),
    )
    session = await client.get_session("python-1")
    async with client.channels("python-1") as channels:
        frames = (await channels.execute(SHELL_PROBE)).frames
    text = stream_text(frames)
    # The shell wrapper ends in `exec`: the pid we report is the kernel itself.
    assert f"PID {session['process_id']}\n" in text
    expected = {"shell": "None", "command": "from_command", "script": "from_script"}[mode]
    assert f"VAR {expected}\n" in text
    outputs = "".join(line for _, line in kernel_events(frames, "output"))
    assert "KALLICHORE_STARTUP" not in outputs


async def test_a_failing_startup_command_fails_the_start_with_details(
    client: KallichoreClient,
) -> None:
    await client.create_session(
        **new_session_body(
            "python-1", startup_environment="command", startup_environment_arg="echo oops; exit 3"
        )
    )
    response = await client.http.post("/sessions/python-1/start")
    assert response.status_code == 500
    body = response.json()
    assert body["error"]["code"] == "KS-8"
    assert body["exit_code"] == 3
    assert "oops" in body["output"]
    assert "KALLICHORE_STARTUP" not in body["output"]
    assert "Startup command: echo oops; exit 3" in body["error"]["details"]
    assert (await client.get_session("python-1"))["status"] == "exited"


async def test_startup_with_a_bad_shell_env_var_still_starts(client: KallichoreClient) -> None:
    await client.create_session(
        **new_session_body(
            "python-1",
            startup_environment="shell",
            env=[{"action": "replace", "name": "SHELL", "value": "/non/existent/shell"}],
        )
    )
    assert (await client.start("python-1"))["status"] == "ok"


async def test_jep66_handshake(client: KallichoreClient) -> None:
    launcher = str(Path(__file__).parent / "kernels" / "jep66_launcher.py")
    await client.create_session(
        **new_session_body(
            "python-jep66",
            argv=[sys.executable, launcher, "{connection_file}"],
            protocol_version="5.5",
        )
    )
    info = await client.start("python-jep66")
    assert info["status"] == "ok"
    async with client.channels("python-jep66") as channels:
        frames = (await channels.execute("print('registered')")).frames
        [handshake] = kernel_events(frames, "handshakeCompleted")
    assert stream_text(frames) == "registered\n"
    session_id, connection = handshake
    assert session_id == "python-jep66"
    assert (
        connection["key"]
        == (await client.http.get("/sessions/python-jep66/connection_info")).json()["key"]
    )
    assert connection["shell_port"] > 0


async def test_start_failure_reports_exit_code_and_output(client: KallichoreClient) -> None:
    code = "import sys; print('no kernel today', flush=True); sys.exit(5)"
    await client.create_session(**new_session_body("python-1", argv=[sys.executable, "-c", code]))
    with pytest.raises(StartupFailed) as failed:
        await client.start("python-1")
    assert failed.value.status == 500
    assert failed.value.exit_code == 5
    assert "no kernel today\n" in failed.value.output
    assert failed.value.code == "KS-8"
    assert failed.value.message
    assert (await client.get_session("python-1"))["status"] == "exited"


async def test_session_errors(client: KallichoreClient) -> None:
    await client.create_session(**new_session_body("python-1"))
    with pytest.raises(ApiError) as duplicate:
        await client.create_session(**new_session_body("python-1"))
    assert (duplicate.value.status, duplicate.value.code) == (400, "KS-0")
    with pytest.raises(ApiError) as missing_program:
        await client.create_session(**new_session_body("python-2", argv=["/no/such/kernel"]))
    assert (missing_program.value.status, missing_program.value.code) == (400, "KS-19")
    with pytest.raises(ApiError) as not_on_path:
        await client.create_session(**new_session_body("python-2", argv=["no-such-kernel-program"]))
    assert not_on_path.value.code == "KS-19"
    with pytest.raises(ApiError) as bad_id:
        await client.create_session(**new_session_body("../../etc"))
    assert bad_id.value.status == 400
    # Never started: deletable? Only exited sessions can be deleted, as in Kallichore.
    await client.start("python-1")
    with pytest.raises(ApiError) as running:
        await client.delete_session("python-1")
    assert (running.value.status, running.value.code) == (400, "KS-2")
    await client.kill("python-1")
    with trio.fail_after(30):
        while (await client.get_session("python-1"))["status"] != "exited":
            await trio.sleep(0.05)
    with pytest.raises(ApiError) as exited:
        await client.kill("python-1")
    assert (exited.value.status, exited.value.code) == (400, "KS-3")
    with pytest.raises(ApiError) as interrupt:
        await client.interrupt("python-1")
    assert (interrupt.value.status, interrupt.value.code) == (400, "KS-10")
    await client.delete_session("python-1")


async def test_unknown_sessions_are_404_with_empty_bodies(client: KallichoreClient) -> None:
    for method, path in [
        ("GET", "/sessions/nope"),
        ("DELETE", "/sessions/nope"),
        ("POST", "/sessions/nope/start"),
        ("POST", "/sessions/nope/restart"),
        ("POST", "/sessions/nope/interrupt"),
        ("POST", "/sessions/nope/kill"),
        ("GET", "/sessions/nope/connection_info"),
    ]:
        response = await client.http.request(method, path)
        assert response.status_code == 404, (method, path)
        assert response.content == b""
    response = await client.http.put("/sessions/nope/adopt", json={})
    assert response.status_code == 404
    assert (await client.http.get("/no/such/path")).status_code == 404
    assert (await client.http.patch("/sessions")).status_code == 405


async def test_unknown_session_on_the_websocket(client: KallichoreClient) -> None:
    with pytest.raises(ApiError) as raised:
        async with client.channels("nope"):
            pass
    assert raised.value.status == 400
    assert raised.value.code == "KS-1"


async def test_requests_from_web_pages_of_another_origin_are_refused(
    client: KallichoreClient, server: RunningServer
) -> None:
    """What a page on another site would send to a daemon on loopback (with the token off it
    would run code) is refused, on every API and on the channels; no `Origin` (agents,
    Positron, jupyter_server) or the daemon's own origin is served as always."""
    await client.create_session(**new_session_body("python-1"))
    host = server.url.removeprefix("http://").rstrip("/")
    address, port = host.rsplit(":", 1)
    evil = {"Origin": "https://evil.example"}
    # A "simple" cross-site POST: no preflight, the body as text/plain.
    execute = await client.http.post(
        "/sessions/python-1/execute",
        content=b'{"code": "1"}',
        headers={**evil, "Content-Type": "text/plain"},
    )
    assert execute.status_code == 403
    assert execute.json()["code"] == "403"
    jupyter = await client.http.get("/api/kernels", headers=evil)
    assert (jupyter.status_code, "another origin" in jupyter.json()["message"]) == (403, True)
    assert (await client.http.get("/sessions", headers={"Origin": "null"})).status_code == 403
    for resource in (
        "/sessions/python-1/channels",
        f"/api/kernels/{'0' * 8}-0000-4000-8000-{'0' * 12}/channels",
    ):
        stream = await trio.open_tcp_stream(address, int(port))
        with pytest.raises(ApiError) as refused:
            async with open_channels(stream, host, resource, [*evil.items()]):
                pass
        assert refused.value.status == 403, resource
    own = {"Origin": f"http://{host}"}
    assert (await client.http.get("/sessions", headers=own)).status_code == 200
    stream = await trio.open_tcp_stream(address, int(port))
    headers = [("Authorization", f"Bearer {TOKEN}"), *own.items()]
    async with open_channels(stream, host, "/sessions/python-1/channels", headers):
        pass


PROTECTED = [
    ("PUT", "/sessions"),
    ("DELETE", "/sessions/python-1"),
    ("POST", "/sessions/python-1/start"),
    ("POST", "/sessions/python-1/restart"),
    ("POST", "/sessions/python-1/interrupt"),
    ("POST", "/sessions/python-1/kill"),
    ("PUT", "/sessions/python-1/adopt"),
    ("GET", "/sessions/python-1/connection_info"),
    ("POST", "/server_configuration"),
    ("POST", "/shutdown"),
]


async def test_token_is_required_where_kallichore_requires_it(
    client: KallichoreClient, anonymous: KallichoreClient, server: RunningServer
) -> None:
    await client.create_session(**new_session_body("python-1"))
    wrong = {"Authorization": "Bearer not-the-token"}
    basic = {"Authorization": f"Basic {TOKEN}"}
    for method, path in PROTECTED:
        for headers in ({}, wrong, basic):
            response = await anonymous.http.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
            assert response.content == b""
    # The scheme is case-insensitive.
    lower = await anonymous.http.get(
        "/sessions/python-1/connection_info", headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert lower.status_code == 200
    for path in ("/status", "/sessions", "/sessions/python-1", "/server_configuration"):
        assert (await anonymous.http.get(path)).status_code == 200, path
    assert (await anonymous.http.post("/client_heartbeat", json={})).status_code == 200
    assert not server.shutdown_requested.is_set()
    # Checked on the WebSocket upgrade too (Kallichore forgets this on TCP).
    for token in (None, "not-the-token"):
        async with KallichoreClient(server.url, token=token) as other:
            with pytest.raises(ApiError) as raised:
                async with other.channels("python-1"):
                    pass
        assert raised.value.status == 401


def session_json(session_id: str, **fields: Any) -> bytes:
    """A NewSession body as JSON text (escaped: NULs and lone surrogates survive)."""
    return json.dumps({"session_id": session_id, **fields}).encode()


def replace(name: str, value: str) -> dict[str, str]:
    return {"action": "replace", "name": name, "value": value}


BAD_BODIES: list[tuple[str, str, bytes]] = [
    ("PUT", "/sessions", b""),
    ("PUT", "/sessions", b"{not json"),
    ("PUT", "/sessions", b"[]"),
    ("PUT", "/sessions", b'{"display_name": "no id"}'),
    ("PUT", "/sessions", b'{"session_id": 5}'),
    ("PUT", "/sessions", b'{"session_id": "x", "argv": "python"}'),
    (
        "PUT",
        "/sessions",
        b'{"session_id": "x", "env": [{"action": "remove", "name": "A", "value": ""}]}',
    ),
    ("PUT", "/sessions", b'{"session_id": "x", "connection_timeout": "soon"}'),
    ("PUT", "/sessions", b'{"session_id": "x", "connection_timeout": -1}'),
    ("PUT", "/sessions", b'{"session_id": "x", "interrupt_mode": "politely"}'),
    ("PUT", "/sessions", b'{"session_id": "x", "startup_environment": "fish"}'),
    ("PUT", "/sessions", b"\xff\xfe"),
    ("PUT", "/sessions", b"[" * 100_000),
    ("PUT", "/sessions/python-1/adopt", b'{"shell_port": "x"}'),
    (
        "PUT",
        "/sessions/python-1/adopt",
        b'{"control_port": 1, "shell_port": 2, "stdin_port": 3, "hb_port": 4, '
        b'"iopub_port": 70000, "key": "k"}',
    ),
    ("POST", "/client_heartbeat", b""),
    ("POST", "/client_heartbeat", b'{"process_id": "me"}'),
    ("POST", "/server_configuration", b"nope"),
    ("POST", "/server_configuration", b'{"idle_shutdown_hours": 70000}'),
    ("POST", "/server_configuration", b'{"resource_sample_interval_ms": -5}'),
    ("POST", "/server_configuration", b'{"resource_sample_interval_ms": "fast"}'),
    # Numbers too large for their field, for a timer, or for Python's JSON parser.
    ("POST", "/server_configuration", b'{"resource_sample_interval_ms": 1' + b"0" * 312 + b"}"),
    ("POST", "/server_configuration", b'{"resource_sample_interval_ms": 86400001}'),
    ("POST", "/server_configuration", b'{"idle_shutdown_hours": -1' + b"0" * 400 + b"}"),
    ("POST", "/client_heartbeat", b'{"process_id": 2147483648}'),
    ("POST", "/client_heartbeat", b'{"process_id": -1}'),
    ("POST", "/client_heartbeat", b'{"process_id": 1' + b"0" * 400 + b"}"),
    ("POST", "/client_heartbeat", b'{"process_id": ' + b"9" * 5000 + b"}"),
    ("PUT", "/sessions", b'{"session_id": "x", "connection_timeout": 1' + b"0" * 400 + b"}"),
    ("PUT", "/sessions", b'{"session_id": "x", "connection_timeout": ' + b"9" * 4301 + b"}"),
    ("PUT", "/sessions/python-1/adopt", b'{"shell_port": ' + b"9" * 5000 + b"}"),
    # Strings that cannot reach the OS: a NUL, or a lone surrogate (no UTF-8 form).
    ("PUT", "/sessions", session_json("nul-argv", argv=[sys.executable, "-c", "1\0"])),
    ("PUT", "/sessions", session_json("surrogate-argv", argv=[sys.executable, "\udc80"])),
    ("PUT", "/sessions", session_json("x\ud800")),
    ("PUT", "/sessions", session_json("nul-cwd", working_directory="/tmp\0")),
    ("PUT", "/sessions", session_json("nul-name", env=[replace("A\0", "")])),
    ("PUT", "/sessions", session_json("surrogate-value", env=[replace("A", "\udfff")])),
    ("PUT", "/sessions", session_json("equals-name", env=[replace("A=B", "")])),
    ("PUT", "/sessions", session_json("nul-arg", startup_environment_arg="/x\0")),
    (
        "POST",
        "/sessions/python-1/restart",
        b'{"env": [{"action": "replace", "name": "", "value": "x"}]}',
    ),
]


async def test_bad_bodies_get_clear_400s_and_disturb_nobody(client: KallichoreClient) -> None:
    await started_session(client)
    async with client.channels("python-1") as channels:
        for method, path, body in BAD_BODIES:
            response = await client.http.request(
                method, path, content=body, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 400, (path, body[:80], response.text)
            error = response.json()
            assert error["message"], (path, body[:80])
        oversized = await client.http.put(
            "/sessions", content=b'{"session_id": "' + b"x" * (17 * 1024 * 1024) + b'"}'
        )
        assert oversized.status_code == 413
        frames = (await channels.execute("print('unaffected')")).frames
    assert stream_text(frames) == "unaffected\n"
    assert [s["session_id"] for s in (await client.http.get("/sessions")).json()["sessions"]] == [
        "python-1"
    ]


async def test_bad_body_messages_name_the_field(client: KallichoreClient) -> None:
    response = await client.http.put(
        "/sessions", json={"session_id": "x", "connection_timeout": "soon"}
    )
    assert "connection_timeout" in response.json()["message"]


async def test_older_positron_new_session_shape(client: KallichoreClient) -> None:
    body = new_session_body("python-old", run_in_shell=True)
    for key in ("session_mode", "startup_environment", "interrupt_mode"):
        del body[key]
    response = await client.http.put("/sessions", json={**body, "some_future_field": 1})
    assert response.status_code == 200
    assert response.json() == {"session_id": "python-old"}
    session = await client.get_session("python-old")
    assert session["session_mode"] == "console"
    assert session["interrupt_mode"] == "message"
    assert (await client.start("python-old"))["status"] == "ok"


async def test_session_listing_and_details(client: KallichoreClient) -> None:
    for i in range(3):
        await client.create_session(**new_session_body(f"python-{i}"))
    listing = (await client.http.get("/sessions")).json()
    assert listing["total"] == 3
    assert {s["session_id"] for s in listing["sessions"]} == {"python-0", "python-1", "python-2"}
    session = listing["sessions"][0]
    assert session["status"] == "idle"  # never started reads `idle`, as in Kallichore
    assert session["kernel_info"] == {}
    assert session["initial_env"] == {}
    assert session["connected"] is False
    assert session["started"].endswith("Z")
    assert "process_id" not in session
    await client.start("python-0")
    started = await client.get_session("python-0")
    assert started["process_id"] > 0
    assert started["initial_env"]["TEST_VAR"] == "test_value"
    assert started["argv"][-1] == "{connection_file}"
    assert started["kernel_info"]["status"] == "ok"
    assert started["idle_seconds"] >= 0
    assert started["busy_seconds"] == 0


async def test_status_configuration_and_heartbeat(
    client: KallichoreClient, anonymous: KallichoreClient, server: RunningServer
) -> None:
    status = (await anonymous.http.get("/status")).json()
    assert list(status) == [
        "sessions",
        "active",
        "busy",
        "idle_seconds",
        "busy_seconds",
        "uptime_seconds",
        "version",
        "process_id",
        "started",
        "server_id",
    ]
    assert status["sessions"] == 0
    assert status["busy"] is False
    assert status["process_id"] == os.getpid()
    assert status["server_id"] == server.state.server_id
    await client.create_session(**new_session_body("python-1"))
    assert (await anonymous.http.get("/status")).json()["active"] == 1

    config = (await anonymous.http.get("/server_configuration")).json()
    assert config == {"resource_sample_interval_ms": 1000, "log_level": "info"}
    response = await client.http.post(
        "/server_configuration", json={"idle_shutdown_hours": 2, "resource_sample_interval_ms": 50}
    )
    assert response.status_code == 200
    assert response.json() is None
    config = (await anonymous.http.get("/server_configuration")).json()
    assert config["idle_shutdown_hours"] == 2
    assert config["resource_sample_interval_ms"] == 100  # clamped
    await client.http.post("/server_configuration", json={"idle_shutdown_hours": -1})
    assert "idle_shutdown_hours" not in (await anonymous.http.get("/server_configuration")).json()

    response = await anonymous.http.post("/client_heartbeat", json={"process_id": os.getpid()})
    assert response.status_code == 200
    assert response.json() is None
    assert server.lifetime.idle.client_pid == os.getpid()


async def test_the_configuration_changes_only_with_the_token_and_only_in_range(
    client: KallichoreClient, anonymous: KallichoreClient, server: RunningServer
) -> None:
    # Without the token, idle_shutdown_hours 0 used to shut the server down 30 s later.
    refused = await anonymous.http.post("/server_configuration", json={"idle_shutdown_hours": 0})
    assert refused.status_code == 401
    assert server.lifetime.idle.period is None
    before = (await anonymous.http.get("/server_configuration")).json()
    for body in (
        {"idle_shutdown_hours": 2, "resource_sample_interval_ms": -5},
        {"idle_shutdown_hours": 2, "resource_sample_interval_ms": 10**312},
        {"resource_sample_interval_ms": 2, "idle_shutdown_hours": 65536},
    ):
        response = await client.http.post("/server_configuration", json=body)
        assert response.status_code == 400, body
        assert response.json()["code"] == "400"
        # Nothing of a refused change is applied.
        assert (await anonymous.http.get("/server_configuration")).json() == before
    ok = await client.http.post(
        "/server_configuration",
        json={"idle_shutdown_hours": 65535, "resource_sample_interval_ms": 86_400_000},
    )
    assert ok.status_code == 200
    assert (await anonymous.http.get("/server_configuration")).json() == {
        "idle_shutdown_hours": 65535,
        "resource_sample_interval_ms": 86_400_000,
        "log_level": "info",
    }


async def test_a_heartbeat_with_an_impossible_pid_is_refused(
    anonymous: KallichoreClient, server: RunningServer
) -> None:
    assert (
        await anonymous.http.post("/client_heartbeat", json={"process_id": 2**31 - 1})
    ).is_success
    for pid in (2**31, -1, 10**400):
        response = await anonymous.http.post("/client_heartbeat", json={"process_id": pid})
        assert response.status_code == 400, pid
        assert "process_id" in response.json()["message"]
    assert server.lifetime.idle.client_pid == 2**31 - 1


async def test_without_the_token_sessions_show_no_environment_argv_or_paths(
    client: KallichoreClient, anonymous: KallichoreClient, tmp_path: Path
) -> None:
    secret = "sk-do-not-show-0123456789"
    await started_session(
        client,
        env=[{"action": "replace", "name": "API_KEY", "value": secret}],
        working_directory=str(tmp_path),
        notebook_uri=f"file://{tmp_path}/secret.ipynb",
    )
    full = await client.get_session("python-1")
    assert full["initial_env"]["API_KEY"] == secret
    assert full["argv"] == list(IPYKERNEL_ARGV)
    assert full["working_directory"] == str(tmp_path)
    for response in (
        await anonymous.http.get("/sessions"),
        await anonymous.http.get("/sessions/python-1"),
    ):
        assert response.status_code == 200
        assert secret not in response.text
        assert str(tmp_path) not in response.text
    listed = (await anonymous.http.get("/sessions")).json()["sessions"]
    for public in (await anonymous.get_session("python-1"), *listed):
        assert public["argv"] == []
        assert public["initial_env"] == {}
        assert public["working_directory"] == ""
        assert "notebook_uri" not in public
        # What Positron reads to find and reconnect to a session is all there.
        for key in ("session_id", "display_name", "language", "status", "kernel_info", "started"):
            assert public[key] == full[key], key
    assert (await client.http.get("/sessions")).json()["sessions"][0]["initial_env"] == full[
        "initial_env"
    ]


async def test_shutdown_stops_every_kernel(client: KallichoreClient, server: RunningServer) -> None:
    await started_session(client, "python-1")
    await started_session(client, "python-2")
    await client.create_session(**new_session_body("python-never-started"))
    pids = [(await client.get_session(f"python-{i}"))["process_id"] for i in (1, 2)]
    response = await client.http.post("/shutdown")
    assert response.status_code == 200
    assert response.json() is None
    assert server.shutdown_requested.is_set()
    with trio.fail_after(30):
        while any(psutil.pid_exists(pid) for pid in pids):
            await trio.sleep(0.05)


async def test_multiple_session_shutdown_restart_cycle(client: KallichoreClient) -> None:
    await started_session(client, "python-1")
    await started_session(client, "python-2")
    async with client.channels("python-1") as channels:
        msg_id = await channels.send(message("shutdown_request", {"restart": False}, "control"))
        await until(channels, lambda f: is_reply(f, msg_id, "shutdown_reply"))
    with trio.fail_after(30):
        while (await client.get_session("python-1"))["status"] != "exited":
            await trio.sleep(0.05)
    assert (await client.http.delete("/sessions/python-1")).status_code == 200
    assert (await client.http.post("/sessions/python-2/restart", json={})).status_code == 200
    ids = [s["session_id"] for s in (await client.http.get("/sessions")).json()["sessions"]]
    assert ids == ["python-2"]


async def test_restart_with_an_unparseable_body_is_a_plain_restart(
    client: KallichoreClient,
) -> None:
    await started_session(client)
    response = await client.http.post("/sessions/python-1/restart", content=b"{garbage")
    assert response.status_code == 200
    assert (await client.get_session("python-1"))["status"] == "idle"


async def test_restart_of_a_stopped_session_starts_it(client: KallichoreClient) -> None:
    await client.create_session(**new_session_body("python-1"))
    response = await client.http.post("/sessions/python-1/restart")
    assert response.status_code == 200
    assert (await client.get_session("python-1"))["status"] == "idle"
    assert (await client.get_session("python-1"))["kernel_info"]["status"] == "ok"


async def test_cpu_is_tracked_per_session(client: KallichoreClient, supervisor: Supervisor) -> None:
    supervisor.resource_sample_interval_ms = 200
    await started_session(client, "python-1")
    await started_session(client, "python-2")
    async with client.channels("python-1") as one, client.channels("python-2") as two:
        samples: dict[str, list[int]] = {}
        for session_id, channels in (("python-1", one), ("python-2", two)):
            frames = await until(channels, lambda f: "resourceUsage" in f)
            for _ in range(4):
                frames += await until(channels, lambda f: "resourceUsage" in f)
            samples[session_id] = [u["cpu_percent"] for u in kernel_events(frames, "resourceUsage")]
    assert all(samples.values())
    # Two idle kernels: nobody is charged for the other's CPU or for the whole machine.
    assert max(samples["python-2"]) < 150
    assert max(samples["python-1"]) < 150


async def test_channels_negotiate_no_compression(
    client: KallichoreClient, server: RunningServer
) -> None:
    await client.create_session(**new_session_body("python-1"))
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(
            b"GET /sessions/python-1/channels HTTP/1.1\r\nHost: localhost\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
        )
        head = b""
        with trio.fail_after(30):
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some()
    assert head.startswith(b"HTTP/1.1 101")
    assert b"sec-websocket-extensions" not in head.lower()


# -- kept-alive connections on the TCP front door ------------------------------------------------


async def read_response(stream: trio.SocketStream, received: bytes) -> tuple[int, bytes, bytes]:
    """One response to a GET, read from `received` and then `stream`: its status, its body and
    whatever followed it."""
    reader = h11.Connection(h11.CLIENT)
    reader.send(h11.Request(method="GET", target="/", headers=[("Host", "localhost")]))
    reader.send(h11.EndOfMessage())
    if received:
        reader.receive_data(received)  # (b"" would mean the end of the stream)
    status, body = 0, b""
    with trio.fail_after(TIMEOUT):
        while True:
            event = reader.next_event()
            if event is h11.NEED_DATA:
                reader.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body, reader.trailing_data[0]
            else:
                raise AssertionError(f"unexpected {event!r}")


async def test_a_websocket_upgrade_after_plain_requests_on_the_same_connection(
    client: KallichoreClient, server: RunningServer
) -> None:
    """Two pipelined `GET /status` and then the channels upgrade, all on one connection."""
    await client.create_session(**new_session_body("python-1"))
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    upgrade = ws.send(
        wsproto.events.Request(
            host="localhost",
            target="/sessions/python-1/channels",
            extra_headers=[(b"Authorization", f"Bearer {TOKEN}".encode())],
        )
    )
    status = b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n"
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(status + status + upgrade)
        received = b""
        for _ in range(2):
            code, body, received = await read_response(stream, received)
            assert code == 200
            assert json.loads(body)["sessions"] == 1
        if received:
            ws.receive_data(received)
        events: list[wsproto.events.Event] = []
        with trio.fail_after(TIMEOUT):
            while not any(isinstance(e, wsproto.events.TextMessage) for e in events):
                events.extend(ws.events())
                if not events:
                    ws.receive_data(await stream.receive_some())
                    continue
                assert isinstance(events[0], wsproto.events.AcceptConnection), events[0]
                if len(events) == 1:
                    # The link works: the session has no kernel, so the request is refused.
                    frame = json.dumps(execute_request("1"))
                    await stream.send_all(ws.send(wsproto.events.TextMessage(frame)))
                    events.extend(ws.events())
                    ws.receive_data(await stream.receive_some())
    [frame] = [json.loads(e.data) for e in events if isinstance(e, wsproto.events.TextMessage)]
    assert frame["kind"] == "kernel"
    assert frame["error"]["code"] == "KS-3"


async def test_many_requests_on_one_kept_alive_connection(server: RunningServer) -> None:
    async with httpx.AsyncClient(
        base_url=server.url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        limits=httpx.Limits(max_connections=1),
        timeout=TIMEOUT,
    ) as http:
        used = set()
        for i in range(20):
            response = await http.put("/sessions", json=new_session_body(f"python-{i}"))
            assert response.status_code == 200, response.text
            assert (await http.get(f"/sessions/python-{i}")).json()["session_id"] == f"python-{i}"
            assert (await http.get("/sessions/nope")).status_code == 404
            head = await http.head("/status")
            assert head.status_code == 200
            assert head.content == b""
            assert (await http.get("/sessions")).json()["total"] == i + 1
            used.add(response.extensions["network_stream"].get_extra_info("client_addr"))
        assert len(used) == 1


async def test_bodies_up_to_the_limit_pass_the_front_door(client: KallichoreClient) -> None:
    limit = 16 * 1024 * 1024
    padding = "x" * (limit - 100)
    response = await client.http.post("/client_heartbeat", json={"process_id": None, "x": padding})
    assert response.status_code in (200, 400)  # the body arrived whole, and was read
    too_big = await client.http.post("/client_heartbeat", content=b" " * (limit + 1))
    assert too_big.status_code == 413
    assert (await client.http.get("/status")).status_code == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", 200),
        (b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\nNOT HTTP AT ALL\r\n\r\n", 400),
        (b"\x16\x03\x01 a TLS hello, say\r\n\r\n", 400),
    ],
)
async def test_connection_close_or_a_protocol_error_ends_the_connection(
    server: RunningServer, request_bytes: bytes, status: int
) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(request_bytes)
        received = b""
        with trio.fail_after(TIMEOUT):
            while chunk := await stream.receive_some():
                received += chunk
    if request_bytes.startswith(b"GET"):
        code, _, received = await read_response(stream, received)
        assert code == 200
    if status != 200:
        assert received.startswith(f"HTTP/1.1 {status} ".encode())
    else:
        assert received == b""


async def test_pipelined_requests_are_answered_in_order(server: RunningServer) -> None:
    """Requests sent back to back in one write, before any answer, each get theirs."""
    heads = b"".join(
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
        for path in ("/status", "/sessions/nope", "/status")
    )
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(heads)
        received = b""
        statuses = []
        for _ in range(3):
            status, _, received = await read_response(stream, received)
            statuses.append(status)
    assert statuses == [200, 404, 200]


async def test_a_client_waiting_for_100_continue_gets_it_then_the_answer(
    server: RunningServer,
) -> None:
    body = b'{"process_id": null}'
    head = h11.Request(
        method="POST",
        target="/client_heartbeat",
        headers=[
            ("Host", "localhost"),
            ("Authorization", f"Bearer {TOKEN}"),
            ("Content-Length", str(len(body))),
            ("Expect", "100-continue"),
        ],
    )
    client = h11.Connection(h11.CLIENT)
    events: list[h11.Event] = []
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(client.send(head) or b"")
        with trio.fail_after(TIMEOUT):
            while not events or not isinstance(events[-1], h11.EndOfMessage):
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some())
                    continue
                assert isinstance(event, h11.Event)
                events.append(event)
                if isinstance(event, h11.InformationalResponse):
                    # Only now does the body go out.
                    await stream.send_all(client.send(h11.Data(data=body)) or b"")
                    await stream.send_all(client.send(h11.EndOfMessage()) or b"")
    interim, response, data = events[:3]
    assert isinstance(interim, h11.InformationalResponse)
    assert interim.status_code == 100
    assert isinstance(response, h11.Response)
    assert response.status_code == 200
    assert isinstance(data, h11.Data)
    assert data.data == b"null"
