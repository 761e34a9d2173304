"""The Jupyter Server kernels API's REST side, driven with httpx against the real daemon and
real ipykernel kernels (one daemon for the module: each test cleans up the kernels it makes).

What a kernel sees (its environment, its directory) is read from its own process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio

from kallichore.api.app import ServerState
from kallichore.server.http import serve_api
from kallichore.supervisor import Supervisor
from tests.conftest import TIMEOUT

TOKEN = "jupyter-rest-token-0123"
ALLOWED = "KC_TEST_ALLOWED"
# A PNG's first bytes are enough for a logo file: the server never reads it.
LOGO = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
LAST_ACTIVITY = "%Y-%m-%dT%H:%M:%S.%fZ"
ONCE = (
    "import os, sys\n"
    "if os.path.exists({mark!r}): sys.exit(3)\n"
    "open({mark!r}, 'w').close()\n"
    "from ipykernel.kernelapp import launch_new_instance\n"
    "launch_new_instance()\n"
)


class Server:
    """The daemon, a client with the token, and its root directory."""

    def __init__(self, url: str, root: Path, pid: int) -> None:
        self.url = url
        self.root = root
        self.process = psutil.Process(pid)
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"token {TOKEN}"}, timeout=TIMEOUT
        )
        self.anonymous = httpx.Client(base_url=url, timeout=TIMEOUT)

    def start(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/api/kernels", json=body)
        assert response.status_code == 201, response.text
        model: dict[str, Any] = response.json()
        return model

    def kernel(self, kernel_id: str) -> httpx.Response:
        return self.http.get(f"/api/kernels/{kernel_id}")

    def wait_idle(self, kernel_id: str) -> dict[str, Any]:
        def idle() -> dict[str, Any] | None:
            model: dict[str, Any] = self.kernel(kernel_id).json()
            assert model["execution_state"] != "dead", model
            return model if model["execution_state"] == "idle" else None

        model: dict[str, Any] = until(idle)
        return model

    def pid(self, kernel_id: str) -> int:
        """The kernel's process, as the Kallichore API (same session id) tells it."""
        session = self.http.get(
            f"/sessions/{kernel_id}", headers={"Authorization": f"Bearer {TOKEN}"}
        ).json()
        pid: int = session["process_id"]
        return pid

    def delete(self, kernel_id: str) -> None:
        response = self.http.delete(f"/api/kernels/{kernel_id}")
        assert response.status_code == 204, response.text
        assert response.content == b""


def until(check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll `check` until it returns something truthy (a hang guard, not a measure of speed)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def process_gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def kernel_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {name.decode(): value.decode(errors="replace") for name, value in pairs}


def kernel_cwd(pid: int) -> Path:
    return Path(os.readlink(f"/proc/{pid}/cwd"))


@pytest.fixture(scope="module")
def server(isolated_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One daemon for the module, with a kernelspec of ours (bare `python`, a logo, kernel.js),
    a root directory with a `sub` directory, and one allowed variable."""
    base = tmp_path_factory.mktemp("jupyter-rest")
    spec_dir = Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels" / "testspec"
    spec_dir.mkdir(parents=True, exist_ok=True)
    kernel_json = {
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Test spec",
        "language": "python",
        "interrupt_mode": "signal",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json))
    (spec_dir / "logo-64x64.png").write_bytes(LOGO)
    (spec_dir / "kernel.js").write_text("// nothing\n")
    once_dir = spec_dir.parent / "once"
    once_dir.mkdir(exist_ok=True)
    once = {
        **kernel_json,
        "display_name": "Starts once",
        # A second start finds the mark of the first and exits: a restart that fails.
        "argv": [
            "python",
            "-c",
            ONCE.format(mark=str(base / "started-once")),
            "-f",
            "{connection_file}",
        ],
    }
    (once_dir / "kernel.json").write_text(json.dumps(once))
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    token_file = base / "token"
    token_file.write_text(TOKEN)
    connection = base / "connection.json"
    log = (base / "daemon.log").open("wb")
    env = {**os.environ, "KC_TEST_NOT_ALLOWED": "daemon's own"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kallichore",
            "--transport",
            "tcp",
            "--connection-file",
            str(connection),
            "--token",
            str(token_file),
            "--root-dir",
            str(root),
            "--jupyter-env-allow",
            ALLOWED,
        ],
        stdout=log,
        stderr=log,
        env=env,
        cwd=base,
    )
    try:
        until(lambda: connection.exists() or process.poll() is not None)
        assert process.poll() is None, (base / "daemon.log").read_text()
        until(connection.read_text)
        served = Server(json.loads(connection.read_text())["base_path"], root, process.pid)
        yield served
        assert served.http.get("/api/kernels").json() == [], "a test left a kernel behind"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)
        log.close()


@pytest.fixture(scope="module")
def bystander(server: Server) -> Iterator[dict[str, Any]]:
    """A kernel that other tests' requests must leave alone."""
    model = server.start()
    server.wait_idle(model["id"])
    yield model
    server.delete(model["id"])


def test_every_token_form_is_accepted_and_none_is_refused(server: Server) -> None:
    assert server.anonymous.get("/api", params={"token": TOKEN}).status_code == 200
    for scheme in ("token", "Bearer", "bearer"):
        answer = server.anonymous.get("/api", headers={"Authorization": f"{scheme} {TOKEN}"})
        assert answer.status_code == 200, scheme
        assert answer.json() == {"version": answer.json()["version"]}
    for headers, params in (({}, {}), ({"Authorization": "token wrong"}, {}), ({}, {"token": ""})):
        refused = server.anonymous.get("/api/kernels", headers=headers, params=params)
        assert refused.status_code == 401
        assert set(refused.json()) == {"message", "reason"}
        assert refused.json()["reason"] == "Unauthorized"
    # A CORS preflight carries no token.
    assert server.anonymous.options("/api/kernels").status_code == 200


async def test_with_auth_off_any_header_is_let_through(
    supervisor: Supervisor, nursery: trio.Nursery
) -> None:
    """`--token none`: jupyter_server's gateway client then sends `Authorization: token `."""
    running = await nursery.start(partial(serve_api, supervisor, ServerState(token=None)))
    async with httpx.AsyncClient(base_url=running.url, timeout=TIMEOUT) as http:
        for headers in ({}, {"Authorization": "token"}, {"Authorization": "Bearer wrong"}):
            answer = await http.get("/api/kernels", headers=headers)
            assert (answer.status_code, answer.json()) == (200, [])


def test_kernelspecs_and_their_files(server: Server) -> None:
    listing = server.http.get("/api/kernelspecs", params={"user": "someone"})
    assert listing.status_code == 200
    body = listing.json()
    assert body["default"] == "python3"
    assert {"python3", "testspec"} <= set(body["kernelspecs"])
    for name, model in body["kernelspecs"].items():
        assert model["name"] == name
        assert isinstance(model["resources"], dict)
        assert isinstance(model["spec"]["argv"], list)
    ours = server.http.get("/api/kernelspecs/testspec").json()
    assert ours == body["kernelspecs"]["testspec"]
    assert ours["spec"]["display_name"] == "Test spec"
    assert ours["resources"] == {
        "logo-64x64": "/kernelspecs/testspec/logo-64x64.png",
        "kernel.js": "/kernelspecs/testspec/kernel.js",
    }
    logo = server.http.get(ours["resources"]["logo-64x64"])
    assert logo.status_code == 200
    assert logo.content == LOGO
    assert logo.headers["content-type"] == "image/png"
    assert server.anonymous.get(ours["resources"]["logo-64x64"]).status_code == 401
    for missing in (
        "/api/kernelspecs/nope",
        "/kernelspecs/nope/logo-64x64.png",
        "/kernelspecs/testspec/logo-32x32.png",
        "/kernelspecs/testspec/kernel.json/..",
        "/kernelspecs/testspec/..%2Fpython3%2Fkernel.json",
        "/kernelspecs/testspec/%2E%2E",
    ):
        answer = server.http.get(missing)
        assert answer.status_code == 404, missing
        assert answer.content != LOGO


def test_a_kernel_from_start_to_delete(server: Server) -> None:
    model = server.start()
    kernel_id = model["id"]
    assert str(uuid.UUID(kernel_id)) == kernel_id
    assert model["execution_state"] == "starting"
    assert model["name"] == "python3"
    assert set(model) == {"id", "name", "last_activity", "execution_state", "connections"}
    assert model["connections"] == 0
    started = datetime.strptime(model["last_activity"], LAST_ACTIVITY)
    assert model["last_activity"].endswith("Z")

    idle = server.wait_idle(kernel_id)
    assert datetime.strptime(idle["last_activity"], LAST_ACTIVITY) > started
    # Both APIs list it, under the one id (its last_activity may have moved: the kernel's
    # start-up messages can still be arriving).
    listed = {k["id"]: k for k in server.http.get("/api/kernels").json()}
    assert listed[kernel_id]["name"] == idle["name"]
    sessions = server.http.get("/sessions", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert kernel_id in [s["session_id"] for s in sessions["sessions"]]

    interrupted = server.http.post(f"/api/kernels/{kernel_id}/interrupt", json={})
    assert (interrupted.status_code, interrupted.content) == (204, b"")

    old_pid = server.pid(kernel_id)
    restarted = server.http.post(f"/api/kernels/{kernel_id}/restart", json={})
    assert restarted.status_code == 200, restarted.text
    assert restarted.json()["id"] == kernel_id
    assert restarted.json()["name"] == "python3"
    assert restarted.json()["execution_state"] in ("idle", "busy")
    assert process_gone(old_pid)
    pid = server.pid(kernel_id)
    assert pid != old_pid

    server.delete(kernel_id)
    assert process_gone(pid)
    gone = server.kernel(kernel_id)
    assert gone.status_code == 404
    assert kernel_id in gone.json()["message"]
    assert server.http.get(f"/sessions/{kernel_id}").status_code == 404


def test_a_kernel_deleted_while_it_starts_leaves_no_process(server: Server) -> None:
    kernel_id = server.start()["id"]
    server.delete(kernel_id)
    assert server.kernel(kernel_id).status_code == 404
    assert server.process.children(recursive=True) == []


def test_a_restart_that_fails_is_a_500_and_leaves_the_kernel_dead(server: Server) -> None:
    kernel_id = server.start(name="once")["id"]
    server.wait_idle(kernel_id)
    failed = server.http.post(f"/api/kernels/{kernel_id}/restart", json={})
    assert failed.status_code == 500
    assert failed.json()["message"] == "Exception restarting kernel"
    assert server.kernel(kernel_id).json()["execution_state"] == "dead"
    server.delete(kernel_id)


def test_a_kallichore_session_is_a_jupyter_kernel(server: Server) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    created = server.http.put(
        "/sessions", json={"session_id": "made-by-kallichore", "argv": []}, headers=bearer
    )
    assert created.status_code == 200, created.text
    session = server.http.get("/sessions/made-by-kallichore", headers=bearer).json()
    kernels = {k["id"]: k for k in server.http.get("/api/kernels").json()}
    model = kernels[session["kernel_id"]]
    assert server.kernel(model["id"]).json() == model
    assert model["execution_state"] == "starting"
    server.delete(model["id"])
    assert server.http.get("/sessions/made-by-kallichore", headers=bearer).status_code == 404


def test_environment_and_working_directory(server: Server) -> None:
    env = {
        "KERNEL_FLAVOUR": "vanilla",
        ALLOWED: "allowed",
        "KC_TEST_REFUSED": "refused",
        "KERNEL_WORKING_DIR": "sub",
    }
    with_env = server.start(name="testspec", env=env)
    in_path = server.start(path="sub")
    absolute = server.start(env={"KERNEL_WORKING_DIR": str(server.root / "sub")})
    try:
        for model in (with_env, in_path, absolute):
            server.wait_idle(model["id"])
            assert kernel_cwd(server.pid(model["id"])) == server.root / "sub"
        seen = kernel_environ(server.pid(with_env["id"]))
        assert seen["KERNEL_FLAVOUR"] == "vanilla"
        assert seen[ALLOWED] == "allowed"
        assert "KC_TEST_REFUSED" not in seen
        # The daemon's own environment is the kernel's base, as for every kernel; its token
        # is in no variable.
        assert seen["KC_TEST_NOT_ALLOWED"] == "daemon's own"
        assert not [name for name, value in seen.items() if TOKEN in value]
        # The kernelspec's bare `python` ran the interpreter that has ipykernel.
        assert with_env["name"] == "testspec"
    finally:
        for model in (with_env, in_path, absolute):
            server.delete(model["id"])
    default = server.start()
    try:
        server.wait_idle(default["id"])
        assert kernel_cwd(server.pid(default["id"])) == server.root
    finally:
        server.delete(default["id"])


def test_sessions_from_creation_to_deletion(server: Server) -> None:
    created = server.http.post(
        "/api/sessions",
        json={"path": "sub/nb.ipynb", "name": "nb.ipynb", "type": "notebook", "kernel": {}},
    )
    assert created.status_code == 201, created.text
    session = created.json()
    assert created.headers["location"] == f"/api/sessions/{session['id']}"
    assert set(session) == {"id", "path", "name", "type", "kernel", "notebook"}
    assert session["notebook"] == {"path": "sub/nb.ipynb", "name": "nb.ipynb"}
    first = session["kernel"]["id"]
    server.wait_idle(first)
    assert kernel_cwd(server.pid(first)) == server.root / "sub"
    again = server.http.post("/api/sessions", json={"path": "sub/nb.ipynb"})
    assert again.status_code == 201
    assert again.json()["id"] == session["id"]
    assert [s["id"] for s in server.http.get("/api/sessions").json()] == [session["id"]]

    url = f"/api/sessions/{session['id']}"
    renamed = server.http.patch(url, json={"path": "other.ipynb", "name": "other"})
    assert renamed.status_code == 200
    assert (renamed.json()["path"], renamed.json()["kernel"]["id"]) == ("other.ipynb", first)

    # A new kernel by name: the old one is shut down.
    new_kernel = server.http.patch(url, json={"kernel": {"name": "testspec"}})
    assert new_kernel.status_code == 200, new_kernel.text
    second = new_kernel.json()["kernel"]["id"]
    assert second != first
    assert new_kernel.json()["kernel"]["name"] == "testspec"
    assert server.kernel(first).status_code == 404

    # Another running kernel by id.
    third = server.start()["id"]
    rebound = server.http.patch(url, json={"kernel": {"id": third}})
    assert rebound.json()["kernel"]["id"] == third
    assert server.kernel(second).status_code == 404

    deleted = server.http.delete(url)
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert server.http.get(url).status_code == 404
    assert server.kernel(third).status_code == 404

    # A session dies with its kernel.
    orphan = server.http.post("/api/sessions", json={"path": "x.ipynb"}).json()
    server.delete(orphan["kernel"]["id"])
    assert server.http.get(f"/api/sessions/{orphan['id']}").status_code == 404
    assert server.http.get("/api/sessions").json() == []


def test_bad_requests_are_refused_and_other_kernels_untouched(
    server: Server, bystander: dict[str, Any]
) -> None:
    missing = str(uuid.uuid4())
    json_type = {"Content-Type": "application/json"}
    cases: list[tuple[str, str, dict[str, Any], int]] = [
        ("POST", "/api/kernels", {"content": b"{not json", "headers": json_type}, 400),
        ("POST", "/api/kernels", {"content": b"[1]", "headers": json_type}, 400),
        ("POST", "/api/kernels", {"json": {"name": 5}}, 400),
        ("POST", "/api/kernels", {"content": b'{"name": ' + b"9" * 5000 + b"}"}, 400),
        ("POST", "/api/kernels", {"json": {"env": {"KERNEL_X": 10**30}}}, 400),
        ("POST", "/api/kernels", {"json": {"name": "python3\x00"}}, 400),
        ("POST", "/api/kernels", {"json": {"env": {"KERNEL_\x00": "x"}}}, 400),
        ("POST", "/api/kernels", {"json": {"env": {"KERNEL_A=B": "x"}}}, 400),
        ("POST", "/api/kernels", {"json": {"env": {"KERNEL_WORKING_DIR": "../.."}}}, 400),
        ("POST", "/api/kernels", {"json": {"env": {"KERNEL_WORKING_DIR": "nowhere"}}}, 400),
        ("POST", "/api/kernels", {"json": {"path": "/../../etc"}}, 400),
        ("POST", "/api/kernels", {"json": {"name": "no-such-kernel"}}, 404),
        ("GET", f"/api/kernels/{missing}", {}, 404),
        ("GET", "/api/kernels/not-a-uuid", {}, 404),
        ("DELETE", f"/api/kernels/{missing}", {}, 404),
        ("POST", f"/api/kernels/{missing}/interrupt", {}, 404),
        ("POST", f"/api/kernels/{missing}/restart", {}, 404),
        ("GET", f"/api/kernels/{missing}/channels", {}, 404),
        ("GET", f"/api/kernels/{bystander['id']}/channels", {}, 400),  # not an upgrade
        ("GET", f"/api/sessions/{missing}", {}, 404),
        ("PATCH", f"/api/sessions/{missing}", {"json": {}}, 404),
        ("DELETE", f"/api/sessions/{missing}", {}, 404),
        ("POST", "/api/sessions", {"content": b"\xff\xfe", "headers": json_type}, 400),
        ("POST", "/api/sessions", {"json": {"path": "a", "kernel": {"id": missing}}}, 404),
        ("POST", "/api/sessions", {"json": {"path": "../outside/nb.ipynb"}}, 400),
    ]
    for method, url, options, status in cases:
        answer = server.http.request(method, url, **options)
        assert answer.status_code == status, (method, url, options, answer.text)
        assert set(answer.json()) >= {"message", "reason"}, (method, url)
    assert server.http.get("/api/kernels").json() == [server.kernel(bystander["id"]).json()]
    assert server.http.get("/api/sessions").json() == []
    assert server.wait_idle(bystander["id"])["id"] == bystander["id"]
