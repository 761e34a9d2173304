"""What the daemon tells the person running it: its log, read as a user would grep it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kallichore import __version__
from kallichore.client import ApiError
from tests.conftest import daemon, daemon_command, new_session_body, started_session


async def test_the_log_tells_each_session_event_at_info_and_no_secret(tmp_path: Path) -> None:
    log_file = tmp_path / "kallichore.log"
    async with daemon(
        tmp_path, "--transport", "tcp", "--log-level", "info", "--log-file", str(log_file)
    ) as d:
        async with d.client() as client:
            await started_session(client, "python-log")
            key = (await client.connection_info("python-log")).key
            await client.interrupt("python-log")
            async with client.channels("python-log"), client.channels("python-log"):
                pass  # the second displaces the first
            await client.restart("python-log")
            await client.kill("python-log")
            await client.start("python-log")  # shut down with the daemon, below
            await client.create_session(
                **new_session_body(
                    "python-fails",
                    argv=[sys.executable, "-c", "import sys; sys.exit('no such module: xyz')"],
                )
            )
            with pytest.raises(ApiError):
                await client.start("python-fails")
            with pytest.raises(ApiError):
                await client.get_session("no-such-session")
        async with d.client(token=None) as anonymous:
            with pytest.raises(ApiError):
                await anonymous.create_session(**new_session_body("python-nope"))
        async with httpx.AsyncClient(base_url=d.connection["base_path"]) as raw:
            response = await raw.get("/no/such/route?token=secret-in-the-query")
            assert response.status_code == 404
        assert d.token is not None
        token = d.token
    log = log_file.read_text()

    def said(session: str, *events: str) -> None:
        for event in events:
            assert f"session {session}: {event}" in log, event

    said(
        "python-log",
        "created (Python (test), python)",
        "kernel started (pid ",
        "kernel ready",
        "interrupting the kernel (by message)",
        "a channels client connected",
        "a channels client was displaced",
        "a channels client disconnected",
        "restarting the kernel",
        "killing the kernel (pid ",
        "shutting the kernel down",
    )
    assert "exited with code 0" in log  # the restart's shutdown_request
    assert "was killed by SIGKILL" in log  # the kill
    said("python-fails", "the kernel failed to start: ")
    assert "(exit code 1)\n  | no such module: xyz" in log  # its last words say why
    for request in (
        "POST /sessions/python-fails/start -> 500",
        "GET /sessions/no-such-session -> 404",
        "PUT /sessions -> 401",
        "GET /no/such/route -> 404",
    ):
        assert request in log, request
    # No secret: the token, the kernel's HMAC key, the kernel's environment, a query string.
    for secret in (token, key, "test_value", "secret-in-the-query"):
        assert secret not in log
    # hypercorn's banner names the private socket behind the TCP port: debug only.
    assert "Running on" not in log


def test_version_names_the_program_it_was_started_as() -> None:
    by_module = subprocess.run(
        daemon_command("--version"), capture_output=True, text=True, check=True
    )
    assert by_module.stdout == f"kallichore {__version__}\n"
    alias = Path(sys.executable).parent / "kcserver"
    by_alias = subprocess.run([str(alias), "--version"], capture_output=True, text=True, check=True)
    assert by_alias.stdout == f"kcserver {__version__}\n"
