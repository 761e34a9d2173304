"""jupyter_server, unchanged, as a gateway client of the server (`--gateway-url` and
`--GatewayClient.auth_token`): driven through its own REST API and its proxied channels
WebSocket as JupyterLab drives them, so every kernel call crosses jupyter_server's gateway
client on its way to the server under test.

(jupyter_server speaks the legacy JSON protocol to a browser whose kernel is behind a gateway,
whatever the browser offers, so the WebSocket here is a legacy one.)
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from kallichore.client import (
    Channels,
    ExecuteResult,
    KernelMessage,
    execute_request,
    open_channels,
)
from tests.jupyter.servers import KERNEL_NAME, Server, jupyter_server, kernel_server, stop

GATEWAY_TOKEN = "gateway-token-0123456789"
LAB_TOKEN = "lab-token-0123456789"
NOTEBOOK = "work/notebook.ipynb"
# A hang guard, not a measure of speed.
TIMEOUT = 60


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """jupyter_server's root directory, with the notebook's directory in it."""
    path = tmp_path_factory.mktemp("lab")
    (path / "work").mkdir()
    return path


@pytest.fixture(scope="module")
def servers(server_kind: str, root: Path) -> Iterator[tuple[Server, Server]]:
    """The server under test and jupyter_server as its gateway client, started side by side."""
    with (
        kernel_server(server_kind, root / "gateway", GATEWAY_TOKEN, wait=False) as gateway,
        jupyter_server(gateway, root, LAB_TOKEN, wait=False) as lab,
    ):
        gateway.wait_ready()
        lab.wait_ready()
        yield gateway, lab


@pytest.fixture(scope="module")
def gateway(servers: tuple[Server, Server]) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def lab(servers: tuple[Server, Server]) -> Server:
    return servers[1]


@pytest.fixture(scope="module")
def notebook(lab: Server) -> dict[str, Any]:
    """A notebook session with a kernel, created as JupyterLab does when a notebook opens."""
    body = {"path": NOTEBOOK, "name": "", "type": "notebook", "kernel": {"name": KERNEL_NAME}}
    response = httpx.post(
        f"{lab.url}/api/sessions", json=body, headers=lab.headers, timeout=TIMEOUT
    )
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    return session


@asynccontextmanager
async def rest(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=server.url, headers=server.headers, timeout=TIMEOUT
    ) as http:
        yield http


@asynccontextmanager
async def kernel_channels(lab: Server, kernel_id: str) -> AsyncIterator[Channels]:
    """The kernel's channels WebSocket through jupyter_server, with a session_id of its own."""
    stream = await trio.open_tcp_stream("127.0.0.1", int(lab.url.rsplit(":", 1)[1]))
    resource = f"/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4()}"
    host = lab.url.removeprefix("http://")
    async with open_channels(stream, host, resource, list(lab.headers.items())) as channels:
        yield channels


async def execute(lab: Server, kernel_id: str, code: str) -> ExecuteResult:
    async with kernel_channels(lab, kernel_id) as channels:
        with trio.fail_after(TIMEOUT):
            return await channels.execute(code)


async def test_kernelspecs_come_from_the_server(lab: Server) -> None:
    async with rest(lab) as http:
        response = await http.get("/api/kernelspecs")
    assert response.status_code == 200
    specs = response.json()
    assert specs["default"] == KERNEL_NAME
    spec = specs["kernelspecs"][KERNEL_NAME]
    # The display name of the tests' own kernelspec, which only the server under test has.
    assert spec["spec"]["display_name"] == "Python 3 (clients)"
    assert spec["spec"]["language"] == "python"


async def test_the_notebook_session_has_a_kernel_on_the_server(
    lab: Server, gateway: Server, notebook: dict[str, Any]
) -> None:
    kernel_id = notebook["kernel"]["id"]
    assert str(uuid.UUID(kernel_id)) == kernel_id
    async with rest(lab) as http:
        sessions = (await http.get("/api/sessions")).json()
    assert [(s["path"], s["kernel"]["id"]) for s in sessions] == [(NOTEBOOK, kernel_id)]
    async with rest(gateway) as http:
        kernels = (await http.get("/api/kernels")).json()
    assert [k["id"] for k in kernels] == [kernel_id]
    assert len(gateway.kernel_processes()) == 1


@pytest.mark.usefixtures("needs_channels")
async def test_print_gives_42(lab: Server, notebook: dict[str, Any]) -> None:
    result = await execute(lab, notebook["kernel"]["id"], "print(6*7)")
    assert result.status == "ok"
    assert result.stdout == "42\n"


@pytest.mark.usefixtures("needs_channels")
async def test_interrupt_stops_a_sleep(lab: Server, notebook: dict[str, Any]) -> None:
    kernel_id = notebook["kernel"]["id"]
    async with kernel_channels(lab, kernel_id) as channels, rest(lab) as http:
        with trio.fail_after(TIMEOUT):
            code = "import time; print('sleeping', flush=True); time.sleep(60)"
            msg_id = await channels.send(execute_request(code))

            def ours(msg_type: str, channel: str) -> Any:
                return lambda event: (
                    isinstance(event, KernelMessage)
                    and event.msg_type == msg_type
                    and event.channel == channel
                    and event.parent_msg_id == msg_id
                )

            # Interrupted once its own code runs (a SIGINT while the kernel still sets up the
            # execution could lose the reply).
            await channels.receive_until(ours("stream", "iopub"))
            response = await http.post(f"/api/kernels/{kernel_id}/interrupt", json={})
            assert response.status_code == 204
            reply = (await channels.receive_until(ours("execute_reply", "shell")))[-1]
    assert isinstance(reply, KernelMessage)
    assert reply.content["status"] == "error"
    assert reply.content["ename"] == "KeyboardInterrupt"


@pytest.mark.usefixtures("needs_channels")
async def test_restart_clears_a_variable(lab: Server, notebook: dict[str, Any]) -> None:
    kernel_id = notebook["kernel"]["id"]
    assert (await execute(lab, kernel_id, "x = 1")).status == "ok"
    async with rest(lab) as http:
        response = await http.post(f"/api/kernels/{kernel_id}/restart", json={})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == kernel_id
    # JupyterLab reconnects its WebSocket after a restart: so does `execute`.
    result = await execute(lab, kernel_id, "x")
    assert result.error is not None
    assert result.error.name == "NameError"


@pytest.mark.usefixtures("needs_channels")
async def test_the_kernel_runs_where_the_notebook_is(
    server_kind: str, lab: Server, root: Path, notebook: dict[str, Any]
) -> None:
    code = "import os; print(os.environ.get('KERNEL_WORKING_DIR')); print(os.getcwd())"
    result = await execute(lab, notebook["kernel"]["id"], code)
    working_dir, cwd = result.stdout.splitlines()
    # jupyter_server asks for the notebook's directory in the kernel's environment.
    assert working_dir == str(root / "work")
    # Kernel Gateway only passes the variable on; the issue asks us to start the kernel there.
    if server_kind == "ours":
        assert cwd == str(root / "work")


async def test_deleting_the_session_stops_its_kernel(
    lab: Server, gateway: Server, notebook: dict[str, Any]
) -> None:
    kernel_id = notebook["kernel"]["id"]
    async with rest(lab) as http:
        assert (await http.delete(f"/api/sessions/{notebook['id']}")).status_code == 204
        assert (await http.get(f"/api/kernels/{kernel_id}")).status_code == 404
    async with rest(gateway) as http:
        assert (await http.get(f"/api/kernels/{kernel_id}")).status_code == 404
        assert (await http.get("/api/kernels")).json() == []
    assert gateway.kernel_processes() == []


async def test_stopping_jupyter_server_stops_its_kernels(lab: Server, gateway: Server) -> None:
    """The module's last scenario: jupyter_server deletes the kernels it started when it stops."""
    async with rest(lab) as http:
        response = await http.post("/api/kernels", json={"name": KERNEL_NAME})
    assert response.status_code == 201, response.text
    assert len(gateway.kernel_processes()) == 1
    await trio.to_thread.run_sync(stop, lab.process)
    async with rest(gateway) as http:
        assert (await http.get("/api/kernels")).json() == []
    assert gateway.kernel_processes() == []
