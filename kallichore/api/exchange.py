"""What a route sees of HTTP: the request, read whole, and the response it answers with.

Neither depends on the server carrying them: the TCP front door and the Unix socket's server
build an `ApiRequest` from what they parsed and write the `ApiResponse` back their own way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager

import attrs

# A body sent as it is made: entered, it gives the chunks; left, what made them is over.
StreamedBody = AbstractAsyncContextManager[AsyncIterator[bytes]]


@attrs.frozen
class ApiRequest:
    """One request: its path percent-decoded, header names lower-case (first value kept)."""

    method: str
    path: str
    headers: Mapping[str, str]
    query: Mapping[str, list[str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The header `name` (lower-case)."""
        return self.headers.get(name)

    def argument(self, name: str) -> str | None:
        """The query string's first value for `name`."""
        values = self.query.get(name)
        return values[0] if values else None


@attrs.frozen
class ApiResponse:
    """A status, extra headers, and a body: whole (`body`) or streamed (`stream`)."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    stream: StreamedBody | None = None
    # An error status that is an answer, not a failure (a probe's "unhealthy"): not logged.
    quiet: bool = False
