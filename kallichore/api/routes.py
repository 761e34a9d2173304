"""Routes declared once: each route's method, path, auth, body, answers and errors in one entry.

A `RouteTable` is one API (today the Kallichore API; the Jupyter Server kernels API and the
agent API will be tables of their own on the same server). The same entries feed Quart
(`install`) and the OpenAPI document (`kallichore.api.openapi`), so what is served and what is
documented cannot drift apart. Handlers return their model and raise on failure: auth, path
parameters, body parsing and turning errors into responses happen here, once.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
from quart import Quart, Response, current_app, request

from kallichore.api.models import (
    BodyError,
    ErrorBody,
    StartupErrorBody,
    converter,
    structure_body,
)
from kallichore.errors import ErrorCode, KallichoreError

Schema = dict[str, Any]
# A handler gets the table's context, then its path parameters (resolved) and `body` by name.
Handler = Callable[..., Awaitable[Any]]


class Empty:
    """The model of an answer with an empty body (401, 404)."""


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
    body: type[ErrorBody | StartupErrorBody] = ErrorBody
    # Reported instead of the error's own code (interrupt failures are all `KS-10`).
    code: ErrorCode | None = None

    def response(self, error: KallichoreError) -> Response:
        if self.code is not None:
            error = KallichoreError(self.code, error.message, error.details)
        return json_response(self.body.of(error), self.status)


class Refused(Exception):
    """A request refused with an error object that is not a supervisor error (a bad body...)."""

    def __init__(self, body: ErrorBody, status: int = 400) -> None:
        super().__init__(body.message)
        self.body = body
        self.status = status


class NotFound(Exception):
    """A path parameter names nothing: a bare 404."""


@attrs.frozen
class PathParameter:
    """A `{name}` in paths, resolved before the handler runs and passed as `argument` (or 404)."""

    argument: str
    description: str
    resolve: Callable[[Any, str], Any]
    missing: Reply


@attrs.frozen
class Route:
    """One route: what Quart serves and what the OpenAPI document says of it."""

    method: str
    path: str
    operation_id: str
    tag: str
    summary: str
    handler: Handler
    ok: Reply
    description: str | None = None
    protected: bool = False
    # An open route that answers less without the token: its handler gets `authorized`.
    token_optional: bool = False
    body: type | None = None
    # An optional body: absent or unreadable, the model's defaults are used.
    body_required: bool = True
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


def json_response(body: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(converter.unstructure(body)), status=status, content_type="application/json"
    )


def empty(status: int) -> Response:
    return Response(b"", status=status)


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


async def read_body(route: Route) -> Any:
    """The request's body as `route.body`; `BodyError` if it must be there and is not right."""
    assert route.body is not None
    data = await request.get_data()
    try:
        if not data:
            raise BodyError("a JSON body is required")
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError) as exc:
            # ValueError: not UTF-8, not JSON, or an integer past Python's digit limit.
            raise BodyError(f"the body is not valid JSON: {exc}") from None
        return structure_body(parsed, route.body)
    except BodyError:
        if route.body_required:
            raise
        return route.body()


_ROUTES = "kallichore.routes"


def install(app: Quart, table: RouteTable, context: Any, token: Callable[[], str | None]) -> None:
    """Serve `table`'s routes on `app`, handlers called with `context`; `token()` guards them."""
    routes: dict[str, Route] = app.extensions.setdefault(_ROUTES, {})
    for route in table.routes:
        endpoint = f"{table.name}.{route.operation_id}"
        routes[endpoint] = route
        rule = re.sub(r"{([^{}]+)}", r"<\1>", route.path)
        app.add_url_rule(
            rule, endpoint, _view(table, route, context, token), methods=[route.method]
        )
    app.register_error_handler(KallichoreError, _supervisor_error)
    app.register_error_handler(BodyError, _body_error)
    app.register_error_handler(Refused, _refused)


def _view(
    table: RouteTable, route: Route, context: Any, token: Callable[[], str | None]
) -> Callable[..., Awaitable[Response]]:
    async def view(**path: str) -> Response:
        arguments: dict[str, Any] = {}
        if route.protected or route.token_optional:
            authorized = bearer_token_matches(token(), request.headers.get("Authorization"))
            if route.protected and not authorized:
                return empty(401)
            if route.token_optional:
                arguments["authorized"] = authorized
        for name, value in path.items():
            try:
                parameter = table.parameters[name]
                arguments[parameter.argument] = parameter.resolve(context, value)
            except NotFound:
                return empty(404)
        if route.body is not None:
            arguments["body"] = await read_body(route)
        return json_response(await route.handler(context, **arguments))

    return view


def _route() -> Route | None:
    routes: dict[str, Route] = current_app.extensions.get(_ROUTES, {})
    return routes.get(request.endpoint or "")


async def _supervisor_error(error: KallichoreError) -> Response:
    route = _route()
    if route is None or route.failure is None:
        raise error
    return route.failure.response(error)


async def _body_error(error: BodyError) -> Response:
    return json_response(ErrorBody("400", str(error)), 400)


async def _refused(error: Refused) -> Response:
    return json_response(error.body, error.status)


def bad_body(model: type) -> str:
    """What a 400 for a body that does not parse as `model` says, for the documentation."""
    return f"The body is not JSON or does not match {model.__name__} (code `400`, naming the field)"
