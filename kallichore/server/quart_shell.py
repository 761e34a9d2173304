"""The API on the Unix socket: hypercorn and Quart carry each request to the dispatcher.

The socket transport is not the hot path (a client there makes a few requests, then talks to
its session's own channel socket), so it keeps the framework; what it serves and how is the
dispatcher's (`kallichore.api.dispatch`), shared with the TCP front door: one catch-all view
turns Quart's request into an `ApiRequest` and the `ApiResponse` back into Quart's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from quart import Response, request
from quart_trio import QuartTrio

from kallichore.api.dispatch import MAX_BODY_BYTES, Dispatcher, too_large
from kallichore.api.exchange import ApiRequest, ApiResponse, StreamedBody

# Every method reaches the dispatcher, which answers 405s and OPTIONS itself.
_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


def quart_app(dispatcher: Dispatcher) -> QuartTrio:
    """A Quart-Trio app answering every request with `dispatcher`."""
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    async def dispatch(path: str = "") -> Response:
        # The whole body first: hypercorn (0.18) tears down a connection whose response ended
        # before the request body did, and quart-trio's cancellation then hangs it.
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), value)
        answer = await dispatcher.respond(
            ApiRequest(
                request.method, request.path, headers, request.args.to_dict(flat=False), body
            )
        )
        return _quart_response(answer)

    app.add_url_rule("/", "dispatch", dispatch, methods=_METHODS, provide_automatic_options=False)
    app.add_url_rule(
        "/<path:path>", "dispatch", dispatch, methods=_METHODS, provide_automatic_options=False
    )

    @app.errorhandler(413)
    async def body_too_large(_: Exception) -> Response:
        return _quart_response(too_large())

    return app


def _quart_response(answer: ApiResponse) -> Response:
    body: bytes | AsyncIterator[bytes] = (
        answer.body if answer.stream is None else _chunks(answer.stream)
    )
    response = Response(body, status=answer.status, headers=dict(answer.headers))
    if answer.content_type is not None:
        response.content_type = answer.content_type
    return response


async def _chunks(body: StreamedBody) -> AsyncIterator[bytes]:
    async with body as chunks:
        async for chunk in chunks:
            yield chunk
