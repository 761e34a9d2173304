"""One dispatcher for the HTTP API, whatever transport carries the request.

An `ApiRequest` is matched against the route tables (`kallichore.api.routes`), checked (origin,
token, path parameters, body) and answered with an `ApiResponse`. The TCP front door calls it in
the task that read the request; on the Unix socket hypercorn and Quart carry the requests to
it (`kallichore.server.quart_shell`), so both transports serve the same routes the same way.

Why not Quart on TCP: its request context, the tasks it starts per request and werkzeug's
routing cost more than the routes themselves (about 60% of the CPU of a `GET /status`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from kallichore.api.exchange import ApiRequest, ApiResponse
from kallichore.api.models import BodyError, ErrorBody
from kallichore.api.routes import (
    CROSS_ORIGIN_REFUSAL,
    ApiStyle,
    Empty,
    KallichoreStyle,
    NotFound,
    Refused,
    Route,
    RouteTable,
    cross_origin,
    empty,
    json_response,
    read_body,
)
from kallichore.errors import KallichoreError

logger = logging.getLogger(__name__)

# What the server reads of a request body at most.
MAX_BODY_BYTES = 16 * 1024 * 1024
# A `{name}` in a route's path: one path segment.
_PARAMETER = re.compile(r"{([^{}]+)}")
_DEFAULT_STYLE = KallichoreStyle()


def log_response(method: str, path: str, status: int) -> None:
    """Log a refused (4xx) or failed (5xx) request by method, path and status.

    Never the query string (a client may put its token there) nor headers; the path is escaped
    so that it cannot forge log lines. Answers that went well are not news.
    """
    if status < 400:
        return
    level = logging.WARNING if status >= 500 else logging.INFO
    logger.log(level, "%s %s -> %d", method, repr(path)[1:-1], status)


def too_large() -> ApiResponse:
    """The answer to a body past `MAX_BODY_BYTES`; the rest of it is never read, so the
    connection cannot carry another request."""
    body = ErrorBody("413", f"the body is larger than {MAX_BODY_BYTES} bytes")
    response = json_response(body, 413)
    return attrs.evolve(response, headers=(("Connection", "close"),))


def _pattern(path: str) -> re.Pattern[str]:
    """What matches `path`, a `{name}` matching one segment (its group `name`)."""
    parts = _PARAMETER.split(path)  # text, name, text, name, ..., text
    return re.compile(
        "".join(
            re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
        )
    )


@attrs.frozen
class _Target:
    """A route as served: its table, and the context and token its handler is called with."""

    table: RouteTable
    route: Route
    context: Any
    token: Callable[[], str | None]

    async def answer(self, request: ApiRequest, path: dict[str, str]) -> ApiResponse:
        table, route, style = self.table, self.route, self.table.style
        arguments: dict[str, Any] = {}
        if route.protected or route.token_optional:
            authorized = style.authorized(self.token(), request)
            if route.protected and not authorized:
                return style.refusal(401, "the token is missing or wrong")
            if route.token_optional:
                arguments["authorized"] = authorized
        for name, value in path.items():
            parameter = table.parameters[name]
            try:
                arguments[parameter.argument] = parameter.resolve(self.context, value)
            except NotFound as missing:
                return style.refusal(404, str(missing))
        if route.body is not None:
            arguments["body"] = read_body(table, route, request.body)
        if route.takes_request:
            arguments["request"] = request
        result = await route.handler(self.context, **arguments)
        if isinstance(result, ApiResponse):
            return result
        if route.ok.model is Empty:
            return empty(route.status)
        response = json_response(result, route.status, style.converter)
        if route.location is not None:
            response = attrs.evolve(response, headers=(("Location", route.location(result)),))
        return response


class Dispatcher:
    """The routes of every table served, by path; see the module docstring."""

    def __init__(self) -> None:
        # Paths without parameters by their text; the others in the order they were served.
        self._static: dict[str, dict[str, _Target]] = {}
        self._patterns: dict[str, tuple[re.Pattern[str], dict[str, _Target]]] = {}
        self._on_close: list[Callable[[], None]] = []

    def at_close(self, cleanup: Callable[[], None]) -> None:
        """Call `cleanup` when the server stops serving."""
        self._on_close.append(cleanup)

    def close(self) -> None:
        """The server has stopped serving: what the routes left behind is cleaned up."""
        for cleanup in self._on_close:
            cleanup()

    def serve(self, table: RouteTable, context: Any, token: Callable[[], str | None]) -> None:
        """Serve `table`'s routes, handlers called with `context`; `token()` guards them."""
        for route in table.routes:
            target = _Target(table, route, context, token)
            if route.parameters:
                entry = self._patterns.setdefault(route.path, (_pattern(route.path), {}))
                entry[1][route.method] = target
            else:
                self._static.setdefault(route.path, {})[route.method] = target

    def routes(self) -> Iterator[tuple[str, str]]:
        """Every (method, path) served."""
        for path, methods in self._static.items():
            yield from ((method, path) for method in methods)
        for path, (_, methods) in self._patterns.items():
            yield from ((method, path) for method in methods)

    async def respond(self, request: ApiRequest) -> ApiResponse:
        """The answer to `request`; a handler's failure is logged and answered with a 500."""
        try:
            response = await self._respond(request)
        except Exception:
            logger.exception("%s %s failed", request.method, repr(request.path)[1:-1])
            response = ApiResponse(500)
        if not response.quiet:
            log_response(request.method, request.path, response.status)
        return response

    async def _respond(self, request: ApiRequest) -> ApiResponse:
        methods, path = self._match(request.path)
        target = methods.get(request.method)
        if target is None and request.method == "HEAD":
            target = methods.get("GET")
        style: ApiStyle = target.table.style if target is not None else _DEFAULT_STYLE
        if cross_origin(request.header("origin"), request.header("host")):
            return style.refusal(403, CROSS_ORIGIN_REFUSAL)
        if not methods:
            return empty(404)
        if target is None:
            allowed = {*methods, "OPTIONS", *(("HEAD",) if "GET" in methods else ())}
            allow = (("Allow", ", ".join(sorted(allowed))),)
            return ApiResponse(200 if request.method == "OPTIONS" else 405, headers=allow)
        try:
            return await target.answer(request, path)
        except KallichoreError as error:
            if target.route.failure is None:
                raise
            return target.route.failure.response(error, style)
        except BodyError as error:
            return style.refusal(400, str(error))
        except Refused as error:
            return json_response(error.body, error.status, style.converter)

    def _match(self, path: str) -> tuple[dict[str, _Target], dict[str, str]]:
        """The routes on `path` by method, and its parameters (no routes: nothing matched)."""
        methods = self._static.get(path)
        if methods is not None:
            return methods, {}
        for pattern, methods in self._patterns.values():
            if (match := pattern.fullmatch(path)) is not None:
                return methods, match.groupdict()
        return {}, {}
