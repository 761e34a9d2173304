"""The dispatcher without a server: routing, refusals and error answers of a toy route table."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from kallichore.api.dispatch import Dispatcher
from kallichore.api.exchange import ApiRequest, ApiResponse
from kallichore.api.models import ClientHeartbeat, ErrorBody
from kallichore.api.routes import (
    Failure,
    Handler,
    NotFound,
    PathParameter,
    Refused,
    Reply,
    RouteTable,
)
from kallichore.errors import ErrorCode, KallichoreError

TOKEN = "secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _thing(things: dict[str, str], name: str) -> str:
    if name not in things:
        raise NotFound(name)
    return things[name]


TABLE = RouteTable(
    "toy",
    parameters={"name": PathParameter("thing", "A thing.", _thing, Reply(ErrorBody, "None."))},
)


def toy(method: str, path: str, **fields: Any) -> Callable[[Handler], Handler]:
    """A route of the toy table: only what a test looks at is said."""
    return TABLE.route(
        method,
        path,
        operation_id=f"{method} {path}",
        tag="t",
        summary="s",
        ok=Reply(dict, "."),
        **fields,
    )


@toy("GET", "/things")
async def list_things(things: dict[str, str]) -> Any:
    return things


@toy("GET", "/things/{name}", protected=True, takes_request=True)
async def get_thing(things: dict[str, str], thing: str, request: ApiRequest) -> Any:
    if request.argument("fail") == "refused":
        raise Refused(ErrorBody("418", "no"), 418)
    if request.argument("fail") == "error":
        raise KallichoreError(ErrorCode.SESSION_NOT_RUNNING, "not running")
    if request.argument("fail") == "bug":
        raise RuntimeError("a bug")
    return {"thing": thing}


@toy(
    "PUT",
    "/things/{name}",
    protected=True,
    body=ClientHeartbeat,
    location=lambda result: f"/things/{result['pid']}",
    failure=Failure(400, "Not running."),
)
async def put_thing(things: dict[str, str], thing: str, body: ClientHeartbeat) -> Any:
    body.check()
    if thing == "B":
        raise KallichoreError(ErrorCode.SESSION_NOT_RUNNING, "not running")
    return {"pid": body.process_id}


@pytest.fixture
def dispatcher() -> Dispatcher:
    dispatcher = Dispatcher()
    dispatcher.serve(TABLE, {"a": "A", "broken": "B"}, lambda: TOKEN)
    return dispatcher


async def ask(
    dispatcher: Dispatcher,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    query: dict[str, list[str]] | None = None,
    headers: dict[str, str] | None = None,
) -> ApiResponse:
    return await dispatcher.respond(ApiRequest(method, path, headers or {}, query or {}, body))


async def test_routes_by_path_and_method(dispatcher: Dispatcher) -> None:
    assert sorted(dispatcher.routes()) == [
        ("GET", "/things"),
        ("GET", "/things/{name}"),
        ("PUT", "/things/{name}"),
    ]
    listed = await ask(dispatcher, "GET", "/things")
    assert (listed.status, json.loads(listed.body)) == (200, {"a": "A", "broken": "B"})
    assert listed.content_type == "application/json"
    got = await ask(dispatcher, "GET", "/things/a", headers=AUTH)
    assert json.loads(got.body) == {"thing": "A"}
    assert (await ask(dispatcher, "HEAD", "/things")).status == 200
    assert (await ask(dispatcher, "GET", "/nothing")).status == 404
    assert (await ask(dispatcher, "GET", "/things/a/b", headers=AUTH)).status == 404
    assert (await ask(dispatcher, "GET", "/things/")).status == 404


async def test_other_methods_are_refused_and_options_lists_them(dispatcher: Dispatcher) -> None:
    refused = await ask(dispatcher, "DELETE", "/things/a", headers=AUTH)
    options = await ask(dispatcher, "OPTIONS", "/things/a")
    assert (refused.status, refused.body) == (405, b"")
    assert (options.status, options.body) == (200, b"")
    assert dict(options.headers)["Allow"] == "GET, HEAD, OPTIONS, PUT"


async def test_refusals(dispatcher: Dispatcher) -> None:
    no_token = await ask(dispatcher, "GET", "/things/a")
    assert (no_token.status, no_token.body) == (401, b"")
    assert (await ask(dispatcher, "GET", "/things/z", headers=AUTH)).status == 404
    page = {"origin": "https://example.com", "host": "127.0.0.1:1"}
    other_origin = await ask(dispatcher, "GET", "/things", headers=page)
    assert other_origin.status == 403
    assert json.loads(other_origin.body)["code"] == "403"
    assert (await ask(dispatcher, "GET", "/nothing", headers=page)).status == 403


async def test_bodies_and_errors(dispatcher: Dispatcher) -> None:
    put = await ask(dispatcher, "PUT", "/things/a", b'{"process_id": 7}', headers=AUTH)
    assert (put.status, dict(put.headers)["Location"]) == (200, "/things/7")
    for bad in (b"", b"{", b"[]", b'{"process_id": -1}'):
        answer = await ask(dispatcher, "PUT", "/things/a", bad, headers=AUTH)
        assert (answer.status, json.loads(answer.body)["code"]) == (400, "400"), bad
    failed = await ask(dispatcher, "PUT", "/things/broken", b"{}", headers=AUTH)
    assert (failed.status, json.loads(failed.body)["code"]) == (400, "KS-3")
    refused = await ask(dispatcher, "GET", "/things/a", query={"fail": ["refused"]}, headers=AUTH)
    assert (refused.status, json.loads(refused.body)["code"]) == (418, "418")
    # An error the route does not document, or a bug: a 500, and the next request is served.
    for fail in ("error", "bug"):
        answer = await ask(dispatcher, "GET", "/things/a", query={"fail": [fail]}, headers=AUTH)
        assert (answer.status, answer.body) == (500, b"")
    assert (await ask(dispatcher, "GET", "/things")).status == 200
