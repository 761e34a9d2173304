"""A kept-alive connection carries the next request after any answer, early refusals included.

Over the server's own Unix socket (hypercorn, with no front door in between) and over TCP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from kallichore.api.app import ServerState
from kallichore.server.http import RunningServer, serve_api
from kallichore.supervisor import Supervisor

TOKEN = "keep-alive-token"
PAIRS = 5
# A guard against a hang, not a measure: every request here is answered at once.
ANSWER_SECONDS = 20


async def slow_body() -> AsyncIterator[bytes]:
    """A JSON body that arrives after its headers, as from a client that writes them apart."""
    yield b'{"session_id": '
    await trio.sleep(0.05)
    yield b'"late"}'


@pytest.fixture(params=["unix", "tcp"])
async def client(
    request: pytest.FixtureRequest, supervisor: Supervisor, nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    if request.param == "unix":
        socket = tmp_path / "api.sock"
        await nursery.start(partial(serve_api, supervisor, ServerState(TOKEN), unix_socket=socket))
        transport = httpx.AsyncHTTPTransport(uds=str(socket))
        http = httpx.AsyncClient(base_url="http://kallichore", transport=transport)
    else:
        server: RunningServer = await nursery.start(
            partial(serve_api, supervisor, ServerState(TOKEN), port=0)
        )
        http = httpx.AsyncClient(base_url=server.url)
    async with http:
        yield http


async def test_a_refusal_before_the_body_leaves_the_connection_usable(
    client: httpx.AsyncClient,
) -> None:
    """Bug 2b: a 401 or 404 sent before the body arrived hung the next request."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(PAIRS):
        with trio.fail_after(ANSWER_SECONDS):
            refused = await client.put("/sessions", content=slow_body())
            assert refused.status_code == 401
            assert (await client.get("/status")).status_code == 200
            missing = await client.post("/sessions/nope/start", content=slow_body(), headers=auth)
            assert missing.status_code == 404
            assert (await client.get("/status")).status_code == 200
