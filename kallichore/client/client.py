"""The Kallichore API over HTTP (httpx), on TCP or on the daemon's Unix socket.

One method per endpoint; a refusal raises `ApiError`. Bodies are the API's JSON as documented
by its OpenAPI document (`/openapi.json`), except where a typed value says more (connection
info). `channels()` opens a session's channels connection on either transport.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack

import httpx
import trio

from kallichore.client.channels import Channels, open_channels
from kallichore.client.errors import ApiError
from kallichore.client.events import JSON
from kallichore.jupyter.connection import ConnectionInfo

DEFAULT_URL = "http://127.0.0.1:8182"
NDJSON = "application/x-ndjson"
# Long enough for a start or a restart, which answer once the kernel does.
TIMEOUT = 120.0
# The host name requests carry over a Unix socket (the server ignores it).
SOCKET_HOST = "localhost"


class ExecuteOptions(TypedDict, total=False):
    """The options of an execution (the server's defaults for those left out)."""

    silent: bool
    store_history: bool
    stop_on_error: bool
    # After this many seconds the code is interrupted (its kernel restarted if it must be).
    timeout_seconds: float


class KallichoreClient:
    """A client of one Kallichore server; use it as an async context manager.

    `url` is the server's base URL (TCP), or give `socket_path` for the Unix-socket transport.
    `token` is the bearer token (None: the server runs without one).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float | None = TIMEOUT,
    ) -> None:
        self.token = token
        self.socket_path = None if socket_path is None else str(socket_path)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport = None
        if self.socket_path is not None:
            transport = httpx.AsyncHTTPTransport(uds=self.socket_path)
            url = f"http://{SOCKET_HOST}"
        # Public so that a caller can make requests this client has no method for.
        self.http = httpx.AsyncClient(
            base_url=url, headers=headers, transport=transport, timeout=timeout
        )

    @classmethod
    def from_connection_file(
        cls,
        path: str | os.PathLike[str],
        *,
        token: str | None = None,
        timeout: float | None = TIMEOUT,
    ) -> KallichoreClient:
        """A client of the server that wrote this connection file (`--connection-file`), with
        the file's token unless given another."""
        document = json.loads(Path(path).read_text())
        token = token or document.get("bearer_token")
        if document.get("socket_path"):
            return cls(token=token, socket_path=document["socket_path"], timeout=timeout)
        if document.get("base_path"):
            return cls(document["base_path"], token=token, timeout=timeout)
        transport = document.get("transport")
        raise ValueError(f"{path}: no base_path or socket_path (transport {transport!r})")

    async def __aenter__(self) -> KallichoreClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _call(
        self, method: str, path: str, body: Any = None, *, timeout: Any = httpx.USE_CLIENT_DEFAULT
    ) -> Any:
        """One request; the decoded JSON answer, or `ApiError`."""
        response = await self.http.request(method, path, json=body, timeout=timeout)
        if not response.is_success:
            raise ApiError.from_response(response)
        return response.json() if response.content else None

    # -- sessions ---------------------------------------------------------------------------

    async def list_sessions(self) -> list[JSON]:
        """Every session (exited ones included), as `GET /sessions/{id}` describes it."""
        sessions: list[JSON] = (await self._call("GET", "/sessions"))["sessions"]
        return sessions

    async def create_session(self, session_id: str, argv: Sequence[str], **fields: Any) -> str:
        """Create a session (nothing is launched yet); `fields` as in the API's NewSession.

        `argv` may use `{connection_file}`, replaced by the path of the kernel's connection file.
        """
        body = {"session_id": session_id, "argv": list(argv), **fields}
        created: JSON = await self._call("PUT", "/sessions", body)
        return str(created["session_id"])

    async def start_kernelspec(
        self, kernel_name: str, session_id: str | None = None, **fields: Any
    ) -> str:
        """Create a session running the server's kernelspec `kernel_name` and start it; returns
        the session id (by default the kernelspec's name and 8 random hex digits) once the kernel
        answers. `fields` as in the API's NewSession; `StartupFailed` if it does not start."""
        session_id = session_id or f"{kernel_name}-{secrets.token_hex(4)}"
        body = {"session_id": session_id, "kernel_name": kernel_name, **fields}
        created: JSON = await self._call("PUT", "/sessions", body)
        await self.start(created["session_id"])
        return str(created["session_id"])

    async def get_session(self, session_id: str) -> JSON:
        """Status, kernel_info, execution queue, resource usage, ..."""
        session: JSON = await self._call("GET", f"/sessions/{session_id}")
        return session

    async def delete_session(self, session_id: str) -> None:
        """Forget an exited session."""
        await self._call("DELETE", f"/sessions/{session_id}")

    async def start(self, session_id: str) -> JSON:
        """Launch the kernel; its kernel_info_reply content (or `StartupFailed`)."""
        info: JSON = await self._call("POST", f"/sessions/{session_id}/start")
        return info

    async def restart(
        self,
        session_id: str,
        *,
        working_directory: str | None = None,
        env: Sequence[Mapping[str, str]] | None = None,
    ) -> None:
        """Restart the kernel; `env` is a list of `{"action", "name", "value"}` actions."""
        body: JSON = {}
        if working_directory is not None:
            body["working_directory"] = working_directory
        if env is not None:
            body["env"] = [dict(action) for action in env]
        await self._call("POST", f"/sessions/{session_id}/restart", body)

    async def interrupt(self, session_id: str) -> None:
        await self._call("POST", f"/sessions/{session_id}/interrupt")

    async def kill(self, session_id: str) -> None:
        """SIGKILL the kernel; the session becomes `exited` when its exit is seen."""
        await self._call("POST", f"/sessions/{session_id}/kill")

    async def connection_info(self, session_id: str) -> ConnectionInfo:
        """Ports and key for a kernel somebody else starts (then `adopt` it)."""
        info: JSON = await self._call("GET", f"/sessions/{session_id}/connection_info")
        return ConnectionInfo.from_dict(info)

    async def adopt(self, session_id: str, connection_info: ConnectionInfo) -> JSON:
        """Take over a running kernel; its kernel_info_reply content."""
        path = f"/sessions/{session_id}/adopt"
        info: JSON = await self._call("PUT", path, connection_info.to_dict())
        return info

    # -- the agent API ----------------------------------------------------------------------

    async def execute(self, session_id: str, code: str, **options: Unpack[ExecuteOptions]) -> JSON:
        """Run `code` and wait for its outcome: `status`, `execution_count`, `output` (the
        items, in order), `data` (the execute_result's), `error_*` (see `/openapi.json`).

        The request waits as long as the code runs: bound it with `timeout_seconds`, after
        which the server interrupts the code (restarting the kernel if it must).
        """
        path = f"/sessions/{session_id}/execute"
        outcome: JSON = await self._call("POST", path, {"code": code, **options}, timeout=None)
        return outcome

    @asynccontextmanager
    async def execute_stream(
        self, session_id: str, code: str, **options: Unpack[ExecuteOptions]
    ) -> AsyncIterator[AsyncIterator[JSON]]:
        """Run `code`, its output items coming as the kernel sends them::

            async with client.execute_stream("python-1", code) as items:
                async for item in items:
                    ...

        Streams are not merged, and `{"type": "clear_output", "wait"}` says when to clear;
        the last item is `{"type": "result", ...}`: `execute`'s outcome without `output`.
        """
        async with self.http.stream(
            "POST",
            f"/sessions/{session_id}/execute",
            json={"code": code, **options},
            headers={"Accept": NDJSON},
            timeout=None,
        ) as response:
            if not response.is_success:
                await response.aread()
                raise ApiError.from_response(response)
            yield _json_lines(response)

    async def history(self, session_id: str, limit: int | None = None) -> list[JSON]:
        """The session's last executions (`limit` of them), most recent last, whoever ran
        them (`source`: `api` or `client`), with their output clipped."""
        query = "" if limit is None else f"?limit={limit}"
        executions: list[JSON] = await self._call("GET", f"/sessions/{session_id}/history{query}")
        return executions

    # -- the server -------------------------------------------------------------------------

    async def kernelspecs(self) -> JSON:
        """The server's kernelspecs: `{"default": name, "kernelspecs": {name: {"name", "spec",
        "resources"}}}`, as the Jupyter API's `GET /api/kernelspecs` gives them."""
        specs: JSON = await self._call("GET", "/api/kernelspecs")
        return specs

    async def status(self) -> JSON:
        status: JSON = await self._call("GET", "/status")
        return status

    async def server_configuration(self) -> JSON:
        configuration: JSON = await self._call("GET", "/server_configuration")
        return configuration

    async def set_server_configuration(self, **fields: Any) -> None:
        """`idle_shutdown_hours`, `resource_sample_interval_ms`, `log_level`."""
        await self._call("POST", "/server_configuration", fields)

    async def client_heartbeat(self, process_id: int | None = None) -> None:
        """Keep the server from shutting down for idleness (and name the client's process)."""
        body = {} if process_id is None else {"process_id": process_id}
        await self._call("POST", "/client_heartbeat", body)

    async def shutdown(self) -> None:
        """Shut every kernel down, then the server."""
        await self._call("POST", "/shutdown")

    # -- channels ---------------------------------------------------------------------------

    @asynccontextmanager
    async def channels(
        self, session_id: str, *, resume: bool | int = False
    ) -> AsyncIterator[Channels]:
        """The session's channels connection (displacing any other client of the session).

        On TCP, a WebSocket upgrade of `/sessions/{id}/channels` with the bearer token; on
        the Unix-socket transport, the same request answers with the path of the session's
        own socket, and the WebSocket runs over that. `resume`: numbered frames (True), and
        continuing after the event of that seq (an int: an earlier connection's
        `resume_point`).
        """
        resource = f"/sessions/{session_id}/channels"
        stream: trio.abc.Stream
        if self.socket_path is not None:
            path: str = await self._call("GET", resource)
            stream = await trio.open_unix_socket(path)
            host = SOCKET_HOST
        else:
            stream, host, prefix = await self._open_tcp()
            resource = prefix + resource
        if resume is not False:
            resource += "?resume" if resume is True else f"?resume={resume}"
        async with open_channels(stream, host, resource, self._bearer()) as channels:
            yield channels

    @asynccontextmanager
    async def jupyter_channels(
        self, kernel_id: str, client_session: str | None = None
    ) -> AsyncIterator[Channels]:
        """A kernel's channels as the Jupyter API serves them (TCP only): one of many clients,
        beside the session's Kallichore channels client, never displacing it. Iopub reaches every
        such client, a reply only the one that sent the request.

        `kernel_id` is the session's `kernel_id`; `client_session` is this client's Jupyter
        `session_id` (a reconnection with the same one gets what it missed; default: a new
        one). Frames are the legacy JSON framing: kernel messages without `kind`; one that
        carries binary buffers arrives as a binary frame, which `Channels.receive` cannot
        decode (it raises `ValueError`).
        """
        if self.socket_path is not None:
            raise ValueError("the Jupyter channels are served on TCP only")
        stream, host, prefix = await self._open_tcp()
        query = f"?session_id={client_session or secrets.token_hex(16)}"
        resource = f"{prefix}/api/kernels/{kernel_id}/channels{query}"
        async with open_channels(stream, host, resource, self._bearer()) as channels:
            yield channels

    def _bearer(self) -> list[tuple[str, str]]:
        """A WebSocket upgrade's headers: the token, if there is one."""
        return [("Authorization", f"Bearer {self.token}")] if self.token else []

    async def _open_tcp(self) -> tuple[trio.SocketStream, str, str]:
        """A connection to the server for a WebSocket: the stream, the Host header, and the
        base URL's path (without its last slash), which prefixes the resource."""
        url = self.http.base_url
        port = url.port or (443 if url.scheme == "https" else 80)
        stream = await trio.open_tcp_stream(url.host, port)
        return stream, f"{url.host}:{port}", url.raw_path.decode().rstrip("/")


async def _json_lines(response: httpx.Response) -> AsyncIterator[JSON]:
    async for line in response.aiter_lines():
        if line:
            item: JSON = json.loads(line)
            yield item
