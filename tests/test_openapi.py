"""The OpenAPI document: valid, and in step with the routes, auth, models and frames it describes.

Each test compares it with the code or with what a live server does, never with itself.
"""

from __future__ import annotations

import json
import typing
import uuid
from typing import Any

import attrs
import httpx
import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import OpenAPIV30SpecValidator, validate

from kallichore import __version__
from kallichore.api import jupyter_models, models, single_kernel_models
from kallichore.api.app import ROUTE_TABLES, ServerState, create_api
from kallichore.api.openapi import WIRE_MODELS, openapi_document
from kallichore.channels.kallichore_framing import (
    FrameError,
    client_error,
    encode_event,
    kernel_event,
)
from kallichore.client import KallichoreClient, execute_request
from kallichore.jupyter.connection import ConnectionInfo
from kallichore.jupyter.wire import Channel, Message
from kallichore.server.http import RunningServer
from kallichore.server.lifetime import ServerLifetime
from kallichore.session.events import (
    Event,
    EventsDropped,
    ExecutionQueuedEvent,
    ExecutionRequestedEvent,
    ExitedEvent,
    HandshakeCompletedEvent,
    JupyterEvent,
    OutputEvent,
    ResourceUsageEvent,
    StatusEvent,
    WorkingDirChangedEvent,
)
from kallichore.session.model import Status
from kallichore.session.resources import ResourceUsage
from kallichore.supervisor import Supervisor
from tests.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SESSION = "openapi-1"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
BEARER: dict[str, list[str]] = {"bearerAuth": []}


@pytest.fixture
def document() -> dict[str, Any]:
    return openapi_document(*ROUTE_TABLES)


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(path, METHOD) -> operation."""
    return {
        (path, method.upper()): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def schema_validator(document: dict[str, Any], schema: dict[str, Any]) -> OAS30Validator:
    """A validator for `schema` whose `$ref`s resolve against the document's components."""
    return OAS30Validator({"allOf": [schema], "components": document["components"]})


def frame_schema(document: dict[str, Any], name: str) -> OAS30Validator:
    return schema_validator(document, {"$ref": f"#/components/schemas/{name}"})


def test_document_is_valid_openapi_30(document: dict[str, Any]) -> None:
    validate(document, cls=OpenAPIV30SpecValidator)
    assert document["info"]["version"] == __version__


async def test_paths_are_the_apps_routes(supervisor: Supervisor, document: dict[str, Any]) -> None:
    api = create_api(supervisor, ServerState(token=TOKEN, server_id="x"), ServerLifetime())
    routes = {(path, method) for method, path in api.routes()}
    documented = set(operations(document))
    assert routes == documented, (
        f"routes missing from the document: {sorted(routes - documented)}; "
        f"documented but not routed: {sorted(documented - routes)}"
    )


@pytest.fixture
async def http(anonymous: KallichoreClient) -> httpx.AsyncClient:
    """Requests without a token, to the `server` fixture holding one session."""
    created = await anonymous.http.put(
        "/sessions", json={"session_id": SESSION, "argv": []}, headers=AUTH
    )
    assert created.status_code == 200, created.text
    return anonymous.http


async def test_protected_operations_are_the_ones_the_server_protects(
    document: dict[str, Any], http: httpx.AsyncClient, server: RunningServer
) -> None:
    documented = {
        key for key, op in operations(document).items() if BEARER in op.get("security", [])
    }
    refused: dict[str, set[tuple[str, str]]] = {"no token": set(), "a wrong token": set()}
    # Last, so that an unprotected shutdown cannot stop the server under the other requests.
    order = sorted(operations(document), key=lambda key: key == ("/shutdown", "POST"))
    for path, method in order:
        url = path.format(
            session_id=SESSION,
            kernel_id=uuid.uuid4(),
            kernel_name="python3",
            file="logo-64x64.png",
            jupyter_session_id="x",
        )
        for name, headers in (("no token", {}), ("a wrong token", {"Authorization": "Bearer x"})):
            response = await http.request(method, url, headers=headers)
            if response.status_code == 401:
                # The Kallichore API's 401 is empty, the Jupyter API's says why.
                jupyter = "jupyter" in operations(document)[(path, method)]["tags"]
                assert bool(response.content) is jupyter, (method, path)
                refused[name].add((path, method))
    for name, paths in refused.items():
        assert paths == documented, (
            f"refused with {name} but not documented as protected: {sorted(paths - documented)}; "
            f"documented as protected but served with {name}: {sorted(documented - paths)}"
        )
    assert not server.shutdown_requested.is_set()


def test_every_wire_model_has_a_schema_with_its_fields(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    wire = [
        value
        for module in (models, jupyter_models, single_kernel_models)
        for value in vars(module).values()
        if isinstance(value, type) and attrs.has(value) and value.__module__ == module.__name__
    ]
    assert len(wire) >= 12
    # Core models the routes take or give straight are wire models too.
    routes = [route for table in ROUTE_TABLES for route in table.routes]
    routed = {route.body for route in routes if route.body is not None} | {
        reply.model
        for route in routes
        for reply in (route.ok, *route.replies.values())
        if isinstance(reply.model, type) and attrs.has(reply.model)
    }
    assert ConnectionInfo in routed
    assert [cls.__name__ for cls in {*wire, *routed} if cls not in WIRE_MODELS] == []
    for cls in WIRE_MODELS:
        schema = schemas[WIRE_MODELS[cls][0]]
        fields = attrs.fields(cls)
        assert set(schema["properties"]) == {field.name for field in fields}, cls.__name__
        omitted = {field.name for field in fields if field.metadata.get("omit_if_none")}
        assert not omitted & set(schema.get("required", [])), cls.__name__


def test_log_levels_are_the_apps(document: dict[str, Any]) -> None:
    schema = document["components"]["schemas"]["ServerConfigurationBody"]
    assert schema["properties"]["log_level"]["enum"] == list(models.LOG_LEVELS)


async def test_openapi_json_is_served_without_a_token(
    document: dict[str, Any], http: httpx.AsyncClient
) -> None:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == document


def check_response(document: dict[str, Any], path: str, response: httpx.Response) -> None:
    """The response is one the document lists for its operation, with a body of that schema."""
    method = response.request.method.lower()
    documented = document["paths"][path][method]["responses"].get(str(response.status_code))
    assert documented is not None, f"{method} {path}: {response.status_code} is not documented"
    if "content" not in documented:
        assert response.content == b""
        return
    schema = documented["content"]["application/json"]["schema"]
    schema_validator(document, schema).validate(response.json())


async def test_responses_match_their_documented_schemas(
    document: dict[str, Any], http: httpx.AsyncClient
) -> None:
    one = f"/sessions/{SESSION}"
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/sessions", {}),
        ("GET", "/sessions/{session_id}", {}),
        ("GET", "/sessions/{session_id}/connection_info", {"headers": AUTH}),
        ("GET", "/status", {}),
        ("GET", "/server_configuration", {}),
        ("POST", "/server_configuration", {"json": {"idle_shutdown_hours": 1}}),
        ("GET", "/server_configuration", {}),
        ("POST", "/server_configuration", {"json": {"idle_shutdown_hours": 70000}}),
        ("POST", "/client_heartbeat", {"json": {"process_id": 1}}),
        ("POST", "/client_heartbeat", {"json": {"process_id": "one"}}),
        ("PUT", "/sessions", {"json": {"session_id": SESSION}, "headers": AUTH}),
        ("PUT", "/sessions", {"json": {"session_id": "openapi-2"}, "headers": AUTH}),
        ("POST", "/sessions/{session_id}/kill", {"headers": AUTH}),
        ("POST", "/sessions/{session_id}/interrupt", {"headers": AUTH}),
        ("GET", "/sessions/{session_id}/channels", {"headers": AUTH}),
    ]
    for method, path, options in calls:
        url = path.replace("{session_id}", SESSION)
        check_response(document, path, await http.request(method, url, **options))
    missing = await http.get("/sessions/nope")
    assert missing.status_code == 404
    check_response(document, "/sessions/{session_id}", missing)
    deleted = await http.delete(one, headers=AUTH)
    assert deleted.status_code == 200
    check_response(document, "/sessions/{session_id}", deleted)


async def test_jupyter_responses_match_their_documented_schemas(
    document: dict[str, Any], http: httpx.AsyncClient
) -> None:
    """The Jupyter API's answers that start no kernel (the session of `http` is one)."""
    kernel_id = (await http.get("/sessions")).json()["sessions"][0]["kernel_id"]
    missing = str(uuid.uuid4())
    token = {"Authorization": f"token {TOKEN}"}
    calls: list[tuple[str, str, dict[str, str], dict[str, Any]]] = [
        ("GET", "/api", {}, {}),
        ("GET", "/api", {}, {"headers": {}}),
        ("GET", "/api/kernelspecs", {}, {}),
        ("GET", "/api/kernelspecs/{kernel_name}", {"kernel_name": "python3"}, {}),
        ("GET", "/api/kernelspecs/{kernel_name}", {"kernel_name": "nope"}, {}),
        ("GET", "/kernelspecs/{kernel_name}/{file}", {"kernel_name": "python3", "file": "x"}, {}),
        ("GET", "/api/kernels", {}, {}),
        ("GET", "/api/kernels/{kernel_id}", {"kernel_id": kernel_id}, {}),
        ("GET", "/api/kernels/{kernel_id}", {"kernel_id": missing}, {}),
        ("POST", "/api/kernels", {}, {"content": b"{"}),
        ("POST", "/api/kernels", {}, {"json": {"name": "nope"}}),
        ("POST", "/api/kernels/{kernel_id}/interrupt", {"kernel_id": kernel_id}, {}),
        ("GET", "/api/sessions", {}, {}),
        ("GET", "/api/sessions/{jupyter_session_id}", {"jupyter_session_id": missing}, {}),
        ("POST", "/api/sessions", {}, {"json": {"path": 5}}),
    ]
    for method, path, parameters, options in calls:
        options.setdefault("headers", token)
        response = await http.request(method, path.format(**parameters), **options)
        check_response(document, path, response)


def test_channel_frames_match_their_schemas(document: dict[str, Any]) -> None:
    connection = ConnectionInfo(1, 2, 3, 4, 5, key="k")
    message = Message(
        header={"msg_id": "a", "msg_type": "stream", "session": "s"},
        parent_header={"msg_id": "b", "msg_type": "execute_request"},
        content_json=b'{"name":"stdout","text":"hi"}',
        buffers=(b"\x00\x01",),
    )
    events: list[Event] = [
        JupyterEvent(Channel.IOPUB, message),
        JupyterEvent(
            Channel.SHELL, Message(header={"msg_id": "c", "msg_type": "x"}, parent_header={})
        ),
        StatusEvent(Status.UNINITIALIZED, None),
        StatusEvent(Status.BUSY, "execute_request"),
        OutputEvent("stderr", "warning\n"),
        ExecutionQueuedEvent("a"),
        ExecutionRequestedEvent("a", "print(1)", "api"),
        ExitedEvent(-9),
        WorkingDirChangedEvent("/tmp"),
        ResourceUsageEvent(ResourceUsage(1, 2, 3, 4, 5)),
        HandshakeCompletedEvent("s", connection),
        EventsDropped(3),
    ]
    assert {type(event) for event in events} == set(typing.get_args(Event))
    frames = [encode_event(event) for event in events] + [
        client_error(FrameError("not a channel message"), "a"),
        kernel_event("clientDisconnected", "another client connected"),
    ]
    server_frame = frame_schema(document, "ServerFrame")
    for frame in frames:
        server_frame.validate(json.loads(frame))
    for wrong in ({"kind": "kernel"}, {"kind": "kernel", "exited": 0, "status": None}):
        assert not server_frame.is_valid(wrong)
    client_frame = frame_schema(document, "JupyterChannelMessage")
    client_frame.validate(execute_request("1 + 1"))
    assert not client_frame.is_valid({**execute_request("1"), "channel": "iopub"})
