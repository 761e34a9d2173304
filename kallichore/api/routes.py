"""Routes declared once: each route's method, path, auth, body, answers and errors in one entry.

A `RouteTable` is one API (the Kallichore API, the agent API, the Jupyter Server kernels API...)
on the same server, each with its `ApiStyle`: how a client shows the token, what a refusal
looks like, and the cattrs converter of its models. The same entries feed the dispatcher
(`kallichore.api.dispatch`) and the OpenAPI document (`kallichore.api.openapi`), so what is
served and what is documented cannot drift apart. Handlers return their model and raise on
failure: auth, path parameters, body parsing and turning errors into responses happen in the
dispatcher, once.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import attrs
import cattrs

from kallichore.api.exchange import ApiRequest, ApiResponse
from kallichore.api.models import BodyError, ErrorBody, converter, structure_body
from kallichore.errors import ErrorCode, KallichoreError

Schema = dict[str, Any]
# A handler gets the table's context, then its path parameters (resolved) and `body` by name.
Handler = Callable[..., Awaitable[Any]]


class Empty:
    """The model of an answer with an empty body (401, 404, 204)."""


class Null:
    """The model of an action's answer: the JSON `null`."""


@attrs.frozen
class Reply:
    """One documented answer: its body's model (an attrs class, `Null`, `Empty`, or a schema)."""

    model: type | Schema
    description: str


@attrs.frozen
class Failure:
    """How the route answers a `KallichoreError`: status, body shape, and the code it reports."""

    status: int
    description: str
    body: type[ErrorModel] = ErrorBody
    # Reported instead of the error's own code (interrupt failures are all `KS-10`).
    code: ErrorCode | None = None

    def response(self, error: KallichoreError, style: ApiStyle) -> ApiResponse:
        if self.code is not None:
            error = KallichoreError(self.code, error.message, error.details)
        return json_response(self.body.of(error), self.status, style.converter)


class ErrorModel(Protocol):
    """An API's error object, made from a supervisor error."""

    @classmethod
    def of(cls, error: KallichoreError) -> Any: ...


class Refused(Exception):
    """A request refused with an error object that is not a supervisor error (a bad body...)."""

    def __init__(self, body: Any, status: int = 400) -> None:
        super().__init__(getattr(body, "message", ""))
        self.body = body
        self.status = status


class NotFound(Exception):
    """A path parameter names nothing: a 404 (its message, for APIs whose 404s have a body)."""


class ApiStyle(Protocol):
    """What differs from one API to another on the same server."""

    @property
    def converter(self) -> cattrs.Converter:
        """Turns the API's models into JSON and request bodies into its models."""

    def authorized(self, token: str | None, request: ApiRequest) -> bool:
        """`request` carries `token` in a form this API accepts (None: open)."""

    def refusal(self, status: int, message: str) -> ApiResponse:
        """A 400, 401 or 404 this API answers before a handler runs."""


class KallichoreStyle:
    """Bearer auth; 401 and 404 with empty bodies, 400 and 403 with the error object."""

    converter = converter

    def authorized(self, token: str | None, request: ApiRequest) -> bool:
        return bearer_token_matches(token, request.header("authorization"))

    def refusal(self, status: int, message: str) -> ApiResponse:
        if status in (400, 403):
            return json_response(ErrorBody(str(status), message), status)
        return empty(status)


@attrs.frozen
class PathParameter:
    """A `{name}` in paths, resolved before the handler runs and passed as `argument` (or 404)."""

    argument: str
    description: str
    resolve: Callable[[Any, str], Any]
    missing: Reply


@attrs.frozen
class Route:
    """One route: what the dispatcher serves and what the OpenAPI document says of it."""

    method: str
    path: str
    operation_id: str
    tag: str
    summary: str
    handler: Handler
    ok: Reply
    description: str | None = None
    # The status of the `ok` answer (an `Empty` model answers with an empty body).
    status: int = 200
    # The `Location` header of the `ok` answer, from the handler's result.
    location: Callable[[Any], str] | None = None
    protected: bool = False
    # An open route that answers less without the token: its handler gets `authorized`.
    token_optional: bool = False
    # The handler gets the request itself (`request`), to read a header or the query.
    takes_request: bool = False
    body: type | None = None
    # An optional body: absent, the model's defaults are used.
    body_required: bool = True
    # An optional body that cannot be read is taken as absent (Kallichore's restart).
    ignore_bad_body: bool = False
    failure: Failure | None = None
    # Further documented answers, by status (they win over a path parameter's 404).
    replies: Mapping[int, Reply] = attrs.field(factory=dict)
    extensions: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def parameters(self) -> list[str]:
        return re.findall(r"{([^{}]+)}", self.path)


@attrs.define
class RouteTable:
    """One API's routes, in the order they are documented, and its path parameters."""

    name: str
    parameters: dict[str, PathParameter] = attrs.field(factory=dict)
    routes: list[Route] = attrs.field(factory=list)
    style: ApiStyle = attrs.field(factory=KallichoreStyle)

    def route(self, method: str, path: str, **fields: Any) -> Callable[[Handler], Handler]:
        """Declare the decorated handler as the route `method path`."""

        def declare(handler: Handler) -> Handler:
            route = Route(method, path, handler=handler, **fields)
            unknown = set(route.parameters) - set(self.parameters)
            if unknown:
                raise ValueError(f"{path}: undeclared path parameters {sorted(unknown)}")
            self.routes.append(route)
            return handler

        return declare


def json_response(body: Any, status: int = 200, using: cattrs.Converter = converter) -> ApiResponse:
    return ApiResponse(status, json.dumps(using.unstructure(body)).encode(), "application/json")


def empty(status: int) -> ApiResponse:
    return ApiResponse(status)


def bearer_token_matches(token: str | None, authorization: str | None) -> bool:
    """Bearer auth, scheme case-insensitive, token compared in constant time; no token: open."""
    if token is None:
        return True
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


# What a request from a web page of another origin is told (see `cross_origin`).
CROSS_ORIGIN_REFUSAL = "requests from a web page of another origin are refused"


def cross_origin(origin: str | None, host: str | None) -> bool:
    """A request a browser made for a page of another origin (its `Origin` header names
    another scheme://host:port than the `Host` it asked): what a web page would send to drive
    a daemon on loopback (cross-site requests, cross-site WebSocket hijacking), which the token
    alone does not stop when it is off. Agents, Positron and jupyter_server send no `Origin`."""
    if origin is None:
        return False
    scheme, _, netloc = origin.partition("://")
    return scheme.lower() not in ("http", "https") or netloc.lower() != (host or "").lower()


def jupyter_token_matches(
    token: str | None, authorization: str | None, query_token: str | None
) -> bool:
    """Auth as Jupyter clients send it: `?token=T`, else `Authorization: token T` or
    `Bearer T` (scheme case-insensitive); compared in constant time; no token: open.

    With auth off a header is ignored: jupyter_server's gateway client sends
    `Authorization: token ` with an empty token.
    """
    if token is None:
        return True
    given = query_token
    if given is None and authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() in ("token", "bearer"):
            given = value.strip()
    if not given:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


def read_body(table: RouteTable, route: Route, data: bytes) -> Any:
    """`data` read as `route.body`; `BodyError` if it must be there and is not right."""
    assert route.body is not None
    if not data and not route.body_required:
        return route.body()
    try:
        if not data:
            raise BodyError("a JSON body is required")
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError) as exc:
            # ValueError: not UTF-8, not JSON, or an integer past Python's digit limit.
            raise BodyError(f"the body is not valid JSON: {exc}") from None
        return structure_body(parsed, route.body, table.style.converter)
    except BodyError:
        if not route.ignore_bad_body:
            raise
        return route.body()


def bad_body(model: type) -> str:
    """What a 400 for a body that does not parse as `model` says, for the documentation."""
    return f"The body is not JSON or does not match {model.__name__} (code `400`, naming the field)"
