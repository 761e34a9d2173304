"""Single-kernel mode, as an agent sandbox uses it: `kallichore --default-kernel python3`, then
`/health` and the `/kernel/*` routes over HTTP, and jupyter_client beside them through the
connection file `/kernel/connection` hands out.

One daemon (one kernel) serves the whole module; each test leaves its kernel healthy.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import psutil
import pytest
import trio
from jupyter_client.blocking.client import BlockingKernelClient
from openapi_schema_validator import OAS30Validator

from kallichore import cli
from kallichore.client import KallichoreClient
from tests.conftest import TIMEOUT, daemon_command

KERNEL_ROUTES = [
    ("POST", "/kernel/execute"),
    ("POST", "/kernel/reset"),
    ("POST", "/kernel/interrupt"),
    ("GET", "/kernel/connection"),
    ("GET", "/kernel/status"),
    ("GET", "/kernel/debug"),
]


@attrs.frozen
class Sandbox:
    """The daemon in single-kernel mode, and an HTTP client of it."""

    process: subprocess.Popen[bytes]
    url: str
    token: str
    log: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def start_daemon(directory: Path, *args: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """The daemon on TCP with `args`, once its connection file is written (or it has exited)."""
    connection_file = directory / "daemon.json"
    with (directory / "daemon.log").open("wb") as log:
        process = subprocess.Popen(
            daemon_command("--transport", "tcp", "--connection-file", str(connection_file), *args),
            stdout=log,
            stderr=log,
        )
    deadline = time.monotonic() + TIMEOUT
    while not connection_file.exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.05)
    return process, json.loads(connection_file.read_text()) if connection_file.exists() else {}


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=TIMEOUT) == 0


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    directory = tmp_path_factory.mktemp("single-kernel")
    process, connection = start_daemon(directory, "--default-kernel", "python3")
    assert connection, (directory / "daemon.log").read_text()
    try:
        yield Sandbox(
            process, connection["base_path"], connection["bearer_token"], directory / "daemon.log"
        )
    finally:
        stop_daemon(process)


@pytest.fixture
async def http(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=TIMEOUT) as client:
        yield client


async def documented(http: httpx.AsyncClient, response: httpx.Response, path: str) -> Any:
    """The response's JSON, checked against what the served OpenAPI document says of it."""
    document = (await http.get("/openapi.json")).json()
    method = response.request.method.lower()
    answer = document["paths"][path][method]["responses"][str(response.status_code)]
    schema = answer["content"]["application/json"]["schema"]
    body = response.json()
    OAS30Validator({"allOf": [schema], "components": document["components"]}).validate(body)
    return body


async def execute(http: httpx.AsyncClient, sandbox: Sandbox, code: str) -> dict[str, Any]:
    response = await http.post("/kernel/execute", json={"code": code}, headers=sandbox.auth)
    assert response.status_code == 200, response.text
    outcome: dict[str, Any] = await documented(http, response, "/kernel/execute")
    return outcome


async def test_health_is_open_and_names_the_running_kernel(
    sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    health = await documented(http, await http.get("/health"), "/health")
    pid = health["kernel_pid"]
    assert health == {"status": "healthy", "kernel_alive": True, "kernel_pid": pid}
    assert psutil.Process(pid).ppid() == sandbox.process.pid
    status = await http.get("/kernel/status", headers=sandbox.auth)
    body = await documented(http, status, "/kernel/status")
    assert body["alive"] is True
    assert body["pid"] == pid
    assert body["status"] in ("idle", "busy")
    assert body["client_connected"] is False
    assert Path(body["connection_file"]).is_file()
    debug = await documented(
        http, await http.get("/kernel/debug", headers=sandbox.auth), "/kernel/debug"
    )
    assert debug["session_id"] == "default"
    assert debug["process_id"] == pid
    assert debug["kernel_info"]["language_info"]["name"] == "python"
    async with (
        KallichoreClient(sandbox.url, token=sandbox.token, timeout=TIMEOUT) as client,
        client.channels("default"),
    ):
        # The server attaches the connection just after the handshake the client waited for.
        with trio.fail_after(TIMEOUT):
            while not (await http.get("/kernel/status", headers=sandbox.auth)).json()[
                "client_connected"
            ]:
                await trio.sleep(0.05)


async def test_kernel_routes_need_the_token(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    for method, path in KERNEL_ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = await http.request(method, path, headers=headers, json={"code": "1"})
            assert (response.status_code, response.content) == (401, b""), (method, path)
    assert (await http.get("/health")).status_code == 200


async def test_no_cors_and_no_requests_from_web_pages(
    sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    page = {"Origin": "https://example.com"}
    preflight = await http.options(
        "/kernel/execute",
        headers={**page, "Access-Control-Request-Method": "POST"},
    )
    answers = [
        preflight,
        await http.get("/health", headers=page),
        await http.get("/status", headers=page),
        await http.get("/kernel/status", headers={**page, **sandbox.auth}),
    ]
    for answer in answers:
        assert not any(h.lower().startswith("access-control-") for h in answer.headers)
    pid = (await http.get("/health")).json()["kernel_pid"]
    reset = await http.post("/kernel/reset", headers={**page, **sandbox.auth})
    assert reset.status_code == 403
    assert (await documented(http, reset, "/kernel/reset"))["code"] == "403"
    assert (await http.get("/health")).json()["kernel_pid"] == pid


def test_listens_on_loopback_only(sandbox: Sandbox) -> None:
    listening = [
        c.laddr
        for c in psutil.Process(sandbox.process.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening
    assert {address.ip for address in listening} == {"127.0.0.1"}


def client_of(connection_file: str) -> BlockingKernelClient:
    client = BlockingKernelClient()
    client.load_connection_file(connection_file)
    client.start_channels()
    client.wait_for_ready(timeout=TIMEOUT)
    return client


def run_in(client: BlockingKernelClient, code: str) -> str:
    """What `code`'s execute_result says, as jupyter_client sees it."""
    results: list[str] = []

    def output(message: dict[str, Any]) -> None:
        if message["msg_type"] == "execute_result":
            results.append(message["content"]["data"]["text/plain"])

    reply = client.execute_interactive(code, timeout=TIMEOUT, output_hook=output)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(results)


async def test_jupyter_client_shares_the_kernel_with_kernel_execute(
    sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    response = await http.get("/kernel/connection", headers=sandbox.auth)
    connection = await documented(http, response, "/kernel/connection")
    path = Path(connection["connection_file"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == connection["config"]
    assert connection["config"]["kernel_name"] == "python3"
    client = await trio.to_thread.run_sync(client_of, str(path))
    try:
        assert await trio.to_thread.run_sync(run_in, client, "shared = 41; shared") == "41"
        outcome = await execute(http, sandbox, "from_api = shared + 1; from_api")
        assert outcome["status"] == "ok"
        assert outcome["data"]["text/plain"] == "42"
        assert await trio.to_thread.run_sync(run_in, client, "from_api") == "42"
    finally:
        client.stop_channels()


async def test_kernel_execute_streams_when_asked(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    headers = {**sandbox.auth, "Accept": "application/x-ndjson"}
    code = "print('six', flush=True); print('seven', flush=True); 6 * 7"
    async with http.stream("POST", "/kernel/execute", json={"code": code}, headers=headers) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        items = [json.loads(line) async for line in r.aiter_lines() if line]
    assert "".join(i["text"] for i in items if i["type"] == "stream") == "six\nseven\n"
    assert items[-1]["type"] == "result"
    assert items[-1]["data"]["text/plain"] == "42"


async def test_reset_gives_a_new_kernel_without_the_old_state(
    sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    await execute(http, sandbox, "forget_me = 6 * 7")
    old = (await http.get("/health")).json()["kernel_pid"]
    response = await http.post("/kernel/reset", headers=sandbox.auth)
    reset = await documented(http, response, "/kernel/reset")
    assert reset["status"] == "success"
    assert reset["old_pid"] == old
    assert reset["new_pid"] not in (None, old)
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE
    assert (await http.get("/health")).json()["kernel_pid"] == reset["new_pid"]
    assert Path(reset["connection_file"]).is_file()
    outcome = await execute(http, sandbox, "forget_me")
    assert (outcome["status"], outcome["error_name"]) == ("error", "NameError")


async def wait_until_busy(http: httpx.AsyncClient, sandbox: Sandbox) -> None:
    with trio.fail_after(TIMEOUT):
        while (await http.get("/kernel/status", headers=sandbox.auth)).json()["status"] != "busy":
            await trio.sleep(0.05)


async def test_interrupt_stops_the_running_code(sandbox: Sandbox, http: httpx.AsyncClient) -> None:
    outcomes: list[dict[str, Any]] = []

    async def run_long() -> None:
        outcomes.append(await execute(http, sandbox, "import time; time.sleep(60)"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_long)
        await wait_until_busy(http, sandbox)
        response = await http.post("/kernel/interrupt", headers=sandbox.auth)
        assert (await documented(http, response, "/kernel/interrupt"))["status"] == "success"
    [outcome] = outcomes
    assert (outcome["status"], outcome["error_name"]) == ("error", "KeyboardInterrupt")
    assert (await execute(http, sandbox, "6 * 7"))["data"]["text/plain"] == "42"


async def test_health_is_503_once_the_kernel_is_killed_and_reset_revives_it(
    sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    pid = (await http.get("/health")).json()["kernel_pid"]
    handed_out = (await http.get("/kernel/connection", headers=sandbox.auth)).json()
    os.kill(pid, signal.SIGKILL)
    # A hang guard: the daemon is told of its child's death at once.
    with trio.fail_after(10):
        while (health := await http.get("/health")).status_code == 200:
            await trio.sleep(0.05)
    assert health.status_code == 503
    body = await documented(http, health, "/health")
    assert body == {"status": "unhealthy", "kernel_alive": False, "kernel_pid": None}
    status = (await http.get("/kernel/status", headers=sandbox.auth)).json()
    assert (status["alive"], status["pid"], status["status"]) == (False, None, "exited")
    assert "connection_file" not in status
    assert not Path(handed_out["connection_file"]).exists()
    connection = await http.get("/kernel/connection", headers=sandbox.auth)
    assert connection.status_code == 400
    assert connection.json()["code"] == "KS-3"
    interrupt = await http.post("/kernel/interrupt", headers=sandbox.auth)
    assert (interrupt.status_code, interrupt.json()["code"]) == (400, "KS-10")
    reset = (await http.post("/kernel/reset", headers=sandbox.auth)).json()
    assert (reset["status"], reset["old_pid"]) == ("success", None)
    health = await http.get("/health")
    assert (health.status_code, health.json()["kernel_pid"]) == (200, reset["new_pid"])
    # The probes' "unhealthy" answers are not failures in the log.
    assert "/health -> 503" not in sandbox.log.read_text()


# -- without a default session, and the daemon's flags -------------------------------------


async def test_without_a_default_session(
    anonymous: KallichoreClient, client: KallichoreClient
) -> None:
    health = await anonymous.http.get("/health")
    assert health.status_code == 503
    assert health.json() == {"status": "unhealthy", "kernel_alive": False, "kernel_pid": None}
    status = await client.http.get("/kernel/status")
    assert status.status_code == 404
    assert status.json()["code"] == "KS-1"
    assert "--default-kernel" in status.json()["message"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--host", "0.0.0.0", "--token", "none"], "--host 0.0.0.0 needs a token"),
        (["--host", "example.com", "--token", "none"], "--host example.com needs a token"),
        (["--transport", "socket", "--host", "::"], "--host can only be used with the tcp"),
        (
            ["--default-kernel", "no-such-kernel"],
            "--default-kernel: no kernelspec is named 'no-such-kernel'",
        ),
    ],
)
def test_refused_before_anything_is_bound(
    args: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--transport", "tcp", *args]) == 1
    assert f"Error: {error}" in capsys.readouterr().err


def test_a_default_kernel_that_fails_to_start_stops_the_daemon(tmp_path: Path) -> None:
    kernels = tmp_path / "share" / "kernels" / "broken"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-c", "import sys; sys.exit(3)", "{connection_file}"],
                "display_name": "Broken",
                "language": "python",
            }
        )
    )
    os.environ["JUPYTER_PATH"] = str(tmp_path / "share")
    try:
        process, connection = start_daemon(tmp_path, "--default-kernel", "broken")
    finally:
        del os.environ["JUPYTER_PATH"]
    assert process.wait(timeout=TIMEOUT) == 1
    assert connection == {}
    log = (tmp_path / "daemon.log").read_text()
    assert "Error: the default kernel (broken) failed to start" in log
    assert "exit code 3" in log


def test_another_host_with_a_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-token-for-the-network")
    process, connection = start_daemon(tmp_path, "--host", "0.0.0.0", "--token", str(token))
    try:
        listening = [
            c.laddr
            for c in psutil.Process(process.pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        ]
        assert [address.ip for address in listening] == ["0.0.0.0"]
        assert connection["base_path"] == f"http://127.0.0.1:{connection['port']}"
        assert f"Listening at 0.0.0.0:{connection['port']}" in (tmp_path / "daemon.log").read_text()
        assert httpx.get(connection["base_path"] + "/status", timeout=TIMEOUT).status_code == 200
    finally:
        stop_daemon(process)
