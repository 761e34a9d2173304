"""The configurations compared, each a `Configuration` with the same async interface.

A configuration starts sessions (`start_session` returns the session and the seconds from
"create" to "kernel_info reply in hand"); a session runs code (`execute` returns once the
execute_reply and the iopub idle have both arrived) and is closed. Servers are started once and
shared by the configurations that use them (the gateways' stock and TCP_QUICKACK clients).
"""

from __future__ import annotations

import itertools
import queue
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import trio
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from benchmarks.clients import ClientProcess, client_argv
from benchmarks.environment import KERNEL_NAME, Home, Processes, free_port, log
from benchmarks.wsclient import (
    QUIET_SECONDS,
    Connection,
    Execution,
    QuickAckStream,
    Tally,
    V1Channels,
)
from kallichore import JupyterEvent, KernelSession, SessionSpec, Supervisor, open_supervisor
from kallichore.channels.jupyter_framing import V1_SUBPROTOCOL
from kallichore.client import Channels, KallichoreClient, open_channels
from kallichore.jupyter.wire import Channel

TIMEOUT = 120.0
_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


class Session(ABC):
    """One running kernel, reached through one configuration."""

    # Measured by the latency workload only (its executions hand back outcomes, not streams).
    round_trips_only = False

    @abstractmethod
    async def execute(self, code: str) -> Execution: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def recover(self) -> None:
        """After a failed execution: get a working connection to the same kernel again."""
        await trio.lowlevel.checkpoint()

    @property
    def server_pid(self) -> int | None:
        """The server process between client and kernel, whose CPU the workloads measure
        (None: there is none, or it is this process)."""
        return None


@dataclass
class Context:
    """What configurations share: the home, the processes, a nursery for WebSocket readers,
    an exit stack for servers, and the servers' virtualenv."""

    home: Home
    processes: Processes
    nursery: trio.Nursery
    stack: AsyncExitStack
    gateway_bin: Path | None
    servers: dict[str, Any] = field(default_factory=dict)
    _lock: trio.Lock = field(default_factory=trio.Lock)


class Configuration(ABC):
    key: str
    label: str
    # What it is compared with: "floor", "kallichore" or "gateway".
    family: str
    # Whether the start workload times it (not when another configuration starts the same way).
    measures_starts = True

    def __init__(self, context: Context) -> None:
        self.context = context

    async def setup(self) -> None:  # noqa: B027 - most configurations need nothing
        """Start whatever server this configuration needs (once)."""

    @abstractmethod
    async def start_session(self, *, connect: bool = True) -> tuple[Session, float]:
        """Create a session and wait for its kernel_info reply; the session and the seconds.

        Without `connect`, no channels are opened beyond what getting kernel_info needs.
        """

    @property
    def server_pid(self) -> int | None:
        """The supervising process (for resource figures), if it is not this one."""
        return None


# -- floor: jupyter_client straight to the kernel -------------------------------------------


class FloorSession(Session):
    """jupyter_client's BlockingKernelClient, driven from a worker thread.

    The time is taken inside the thread, around the blocking calls only.
    """

    def __init__(self, manager: KernelManager, client: BlockingKernelClient) -> None:
        self.manager = manager
        self.client = client

    async def execute(self, code: str) -> Execution:
        return await trio.to_thread.run_sync(self._execute, code)

    def _execute(self, code: str) -> Execution:
        client = self.client
        tally = Tally()
        tally.msg_id = client.execute(code, allow_stdin=False)
        deadline = tally.started + TIMEOUT
        while not tally.idle and time.perf_counter() < deadline:
            try:
                message = client.get_iopub_msg(timeout=QUIET_SECONDS)
            except queue.Empty:
                self._take_reply(tally, 0.1)
                if tally.replied:
                    break  # the rest was lost (not seen here so far)
                continue
            if message["parent_header"].get("msg_id") == tally.msg_id:
                tally.add("iopub", message["msg_type"], message["content"])
        last = tally.last
        while not tally.replied and time.perf_counter() < deadline:
            self._take_reply(tally, TIMEOUT)
        if not tally.replied:
            raise TimeoutError(f"no reply to {code!r} within {TIMEOUT} s")
        if not tally.idle:
            tally.last = last
        return tally.result()

    def _take_reply(self, tally: Tally, timeout: float) -> None:
        try:
            reply = self.client.get_shell_msg(timeout=timeout)
        except queue.Empty:
            return
        if reply["parent_header"].get("msg_id") == tally.msg_id:
            tally.add("shell", reply["msg_type"], reply["content"])

    async def close(self) -> None:
        def stop() -> None:
            self.client.stop_channels()
            self.manager.shutdown_kernel(now=True)

        await trio.to_thread.run_sync(stop)


class Floor(Configuration):
    key = "floor"
    label = "jupyter_client -> ZeroMQ (floor)"
    family = "floor"

    async def start_session(self, *, connect: bool = True) -> tuple[Session, float]:
        def start() -> tuple[Session, float]:
            started = time.perf_counter()
            manager = KernelManager(kernel_name=KERNEL_NAME)
            # (The kernel's own stdout/stderr: only a warning about TCP without encryption.)
            manager.start_kernel(
                cwd=str(self.context.home.work),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            client = manager.blocking_client()
            client.start_channels()
            client.wait_for_ready(timeout=TIMEOUT)
            return FloorSession(manager, client), time.perf_counter() - started

        return await trio.to_thread.run_sync(start)


class FloorControl(Floor):
    """A second floor: how far two identical configurations drift apart in the same run."""

    key = "floor-2"
    label = "jupyter_client -> ZeroMQ again (A/A control)"
    family = "control"


# -- kallichore embedded ---------------------------------------------------------------------


class EmbeddedSession(Session):
    def __init__(self, supervisor: Supervisor, session: KernelSession) -> None:
        self.supervisor = supervisor
        self.session = session
        self.events = session.events.subscribe()

    async def execute(self, code: str) -> Execution:
        tally = Tally()
        tally.msg_id = await self.session.execute(code, allow_stdin=False)
        with trio.fail_after(TIMEOUT):
            while not tally.done:
                events = None
                with trio.move_on_after(QUIET_SECONDS if tally.replied else TIMEOUT):
                    events = await self.events.receive()
                if events is None:
                    break
                for event in events:
                    if (
                        isinstance(event, JupyterEvent)
                        and event.message.parent_msg_id == tally.msg_id
                    ):
                        message = event.message
                        channel = "iopub" if event.channel is Channel.IOPUB else "shell"
                        tally.add(channel, message.msg_type, message.content)
        return tally.result()

    async def close(self) -> None:
        self.events.close()
        await self.session.shutdown()
        await self.supervisor.delete(self.session.session_id)


class Embedded(Configuration):
    key = "embedded"
    label = "kallichore embedded (open_supervisor)"
    family = "kallichore"
    supervisor: Supervisor

    async def setup(self) -> None:
        self.supervisor = await self.context.stack.enter_async_context(open_supervisor())

    async def start_session(self, *, connect: bool = True) -> tuple[Session, float]:
        started = time.perf_counter()
        spec = SessionSpec(
            session_id=new_id("embedded"),
            argv=self.context.home.kernel_argv,
            working_directory=str(self.context.home.work),
            connection_timeout=TIMEOUT,
        )
        session = await self.supervisor.create_session(spec)
        await session.start()
        elapsed = time.perf_counter() - started
        return EmbeddedSession(self.supervisor, session), elapsed


# -- kallichore's daemon ----------------------------------------------------------------------


class Daemon:
    """`python -m kallichore` as a subprocess, over TCP or its Unix socket, and a client of it."""

    def __init__(self, context: Context, transport: str) -> None:
        self.context = context
        self.transport = transport
        self.process: trio.Process | None = None
        self.kallichore: KallichoreClient | None = None

    async def start(self, name: str) -> None:
        root = self.context.home.root
        connection_file = root / f"{name}.json"
        argv = [sys.executable, "-m", "kallichore", "--transport", self.transport]
        argv += ["--token", "none", "--connection-file", str(connection_file)]
        if self.transport == "socket":
            argv += ["--socket-dir", str(root / "tmp")]
        processes = self.context.processes
        self.process = process = await processes.spawn(argv, name)
        with trio.fail_after(60):
            while not connection_file.exists():
                if process.returncode is not None:
                    raise RuntimeError(f"kallichore exited: {processes.log_text(name)}")
                await trio.sleep(0.02)
            await trio.sleep(0.05)  # written in one go, but let it land
            # (Generous: the scale workload starts 50 kernels at once.)
            self.kallichore = KallichoreClient.from_connection_file(connection_file, timeout=600)
        self.context.stack.push_async_callback(self.stop)

    async def stop(self) -> None:
        """Stop the daemon (it shuts its kernels down); idempotent."""
        kallichore, self.kallichore = self.kallichore, None
        if kallichore is not None:
            await kallichore.aclose()
        process, self.process = self.process, None
        if process is not None:
            await self.context.processes.stop(process)

    def client(self) -> KallichoreClient:
        assert self.kallichore is not None
        return self.kallichore

    async def create_and_start(self, session_id: str, timeout: float = TIMEOUT) -> None:
        home = self.context.home
        kallichore = self.client()
        await kallichore.create_session(
            session_id,
            home.kernel_argv,
            display_name="Python 3 (benchmark)",
            language="python",
            username="bench",
            input_prompt="",
            continuation_prompt="",
            session_mode="console",
            working_directory=str(home.work),
            env=[],
            connection_timeout=int(timeout),
            interrupt_mode="signal",
            protocol_version="5.3",
            startup_environment="none",
        )
        await kallichore.start(session_id)

    async def channels(self, session_id: str) -> Connection:
        return await Connection.open(
            self.context.nursery, lambda: self.client().channels(session_id)
        )

    async def kill(self, session_id: str) -> None:
        kallichore = self.client()
        await kallichore.kill(session_id)
        with trio.fail_after(30):
            # Polling, as an API client does.
            while (await kallichore.get_session(session_id))["status"] != "exited":  # noqa: ASYNC110
                await trio.sleep(0.02)
        await kallichore.delete_session(session_id)


async def shared_daemon(context: Context, transport: str) -> Daemon:
    """The run's daemon on `transport`, started by whichever configuration asks first: our
    client and the clients on other stacks meet the same daemon."""
    name = f"kallichore-{transport}"
    async with context._lock:
        if name not in context.servers:
            daemon = Daemon(context, transport)
            await daemon.start(name)
            context.servers[name] = daemon
    shared: Daemon = context.servers[name]
    return shared


class DaemonSession(Session):
    def __init__(self, daemon: Daemon, session_id: str, channels: Connection | None) -> None:
        self.daemon = daemon
        self.session_id = session_id
        self.channels = channels

    @property
    def server_pid(self) -> int | None:
        return self.daemon.process.pid if self.daemon.process else None

    async def execute(self, code: str) -> Execution:
        if self.channels is None:
            self.channels = await self.daemon.channels(self.session_id)
        return await self.channels.execute(code)

    async def close(self) -> None:
        if self.channels is not None:
            await self.channels.aclose()
        await self.daemon.kill(self.session_id)

    async def recover(self) -> None:
        if self.channels is not None:
            await self.channels.aclose()
        self.channels = await self.daemon.channels(self.session_id)


class ExecuteSession(DaemonSession):
    """Runs code with one `POST /sessions/{id}/execute` (the agent API): no channels at all."""

    round_trips_only = True

    async def execute(self, code: str) -> Execution:
        started = time.perf_counter()
        outcome = await self.daemon.client().execute(self.session_id, code)
        seconds = time.perf_counter() - started
        if outcome["status"] != "ok":
            raise RuntimeError(f"{code!r} ended {outcome['status']}")
        output = outcome["output"]
        text = sum(len(item["text"]) for item in output if item["type"] == "stream")
        return Execution(seconds, len(output), text)

    async def recover(self) -> None:
        await trio.lowlevel.checkpoint()


class KallichoreWebSocket(Configuration):
    family = "kallichore"
    transport = "tcp"
    daemon: Daemon

    async def setup(self) -> None:
        self.daemon = await shared_daemon(self.context, self.transport)

    async def start_session(self, *, connect: bool = True) -> tuple[Session, float]:
        session_id = new_id(f"ws-{self.transport}")
        started = time.perf_counter()
        await self.daemon.create_and_start(session_id)
        elapsed = time.perf_counter() - started
        channels = await self.daemon.channels(session_id) if connect else None
        return DaemonSession(self.daemon, session_id, channels), elapsed

    @property
    def server_pid(self) -> int | None:
        return self.daemon.process.pid if self.daemon.process else None


class KallichoreTcp(KallichoreWebSocket):
    key = "ws-tcp"
    label = "kallichore daemon, WebSocket over TCP"
    transport = "tcp"


class KallichoreUnix(KallichoreWebSocket):
    key = "ws-unix"
    label = "kallichore daemon, WebSocket over its Unix socket"
    transport = "socket"


class ClientSession(DaemonSession):
    """A session of the daemon whose channels a client on another stack holds
    (`benchmarks.clients`): our own client is not on the path."""

    def __init__(self, daemon: Daemon, session_id: str, stack: str) -> None:
        super().__init__(daemon, session_id, None)
        self.stack = stack
        self.client: ClientProcess | None = None

    async def connect(self) -> None:
        """Start a client process connected to the session's channels."""
        resource = f"/sessions/{self.session_id}/channels"
        kallichore = self.daemon.client()
        if kallichore.socket_path is not None:
            # (The daemon answers with the session's own socket.)
            response = await kallichore.http.get(resource)
            response.raise_for_status()
            transport, address = "unix", str(response.json())
        else:
            url = kallichore.http.base_url
            transport, address = "tcp", f"{url.host}:{url.port}"
            resource = url.raw_path.decode().rstrip("/") + resource
        argv = client_argv(self.stack, transport, address, resource)
        processes = self.daemon.context.processes
        self.client = await ClientProcess.start(processes, argv, f"client-{self.session_id}")

    async def execute(self, code: str) -> Execution:
        if self.client is None:
            await self.connect()
        assert self.client is not None
        return await self.client.execute(code)

    async def _disconnect(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    async def close(self) -> None:
        await self._disconnect()
        await self.daemon.kill(self.session_id)

    async def recover(self) -> None:
        await self._disconnect()
        await self.connect()


# The client stacks besides ours, as `benchmarks.clients` starts them.
CLIENT_STACKS = {
    "websockets-sync": "the websockets package's sync client",
    "websockets-asyncio": "the websockets package's asyncio client",
    "node-ws": "Node's ws (as Positron)",
}


class ClientStack(KallichoreWebSocket):
    """The same daemon as `ws-tcp` or `ws-unix`, reached by a client on another stack; its
    starts are `ws-tcp`'s and `ws-unix`'s, so the start workload leaves it out."""

    stack: str
    measures_starts = False

    async def start_session(self, *, connect: bool = True) -> tuple[Session, float]:
        session_id = new_id(self.key)
        started = time.perf_counter()
        await self.daemon.create_and_start(session_id)
        elapsed = time.perf_counter() - started
        session = ClientSession(self.daemon, session_id, self.stack)
        if connect:
            await session.connect()
        return session, elapsed


def client_stack(stack: str, transport: str) -> type[Configuration]:
    over = "TCP" if transport == "tcp" else "its Unix socket"
    attributes = {
        "key": f"{stack}-{'tcp' if transport == 'tcp' else 'unix'}",
        "label": f"kallichore daemon over {over}, client: {CLIENT_STACKS[stack]}",
        "stack": stack,
        "transport": transport,
    }
    return type(f"ClientStack-{attributes['key']}", (ClientStack,), attributes)


class KallichoreExecute(KallichoreWebSocket):
    """The agent API's one-call execution, against the same daemon's channels (`ws-tcp`)."""

    key = "execute-tcp"
    label = "kallichore daemon, POST /sessions/{id}/execute over TCP (agent API)"
    transport = "tcp"

    async def setup(self) -> None:
        self.daemon = Daemon(self.context, self.transport)
        await self.daemon.start("kallichore-execute")

    async def start_session(self, *, connect: bool = True) -> tuple[Session, float]:
        session_id = new_id("execute")
        started = time.perf_counter()
        await self.daemon.create_and_start(session_id)
        return ExecuteSession(self.daemon, session_id, None), time.perf_counter() - started


# -- Jupyter Kernel Gateway and jupyter_server ---------------------------------------------


class JupyterServer:
    """A server with the Jupyter Server kernels API: `jupyter kernelgateway` or `jupyter server`
    (tornado), or kallichore's daemon (`python -m kallichore`, auth off).

    IOPub rate limiting is turned off in the tornado ones (it would drop most of the throughput
    workloads' messages); everything else is as they come.
    """

    TOKEN = "benchmark-token"

    def __init__(self, context: Context, kind: str) -> None:
        self.context = context
        self.kind = kind
        self.port = free_port()
        self.process: trio.Process | None = None
        self.http: httpx.AsyncClient | None = None
        # Kernels created and not deleted yet (Kernel Gateway does not list its kernels).
        self.kernels: set[str] = set()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.TOKEN}"} if self.kind == "server" else {}

    async def start(self) -> None:
        bin_dir = self.context.gateway_bin
        no_rate_limit = "--ZMQChannelsWebsocketConnection.limit_rate=False"
        if self.kind == "kallichore":
            argv = [sys.executable, "-m", "kallichore", "--port", str(self.port), "--token", "none"]
        elif self.kind == "kg":
            assert bin_dir is not None, "the servers' virtualenv is not set up"
            argv = [
                str(bin_dir / "jupyter-kernelgateway"),
                "--KernelGatewayApp.ip=127.0.0.1",
                f"--KernelGatewayApp.port={self.port}",
                "--KernelGatewayApp.port_retries=0",
                no_rate_limit,
            ]
        else:
            assert bin_dir is not None, "the servers' virtualenv is not set up"
            argv = [
                str(bin_dir / "jupyter-server"),
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                "--ServerApp.open_browser=False",
                "--ServerApp.allow_root=True",
                f"--ServerApp.root_dir={self.context.home.work}",
                f"--IdentityProvider.token={self.TOKEN}",
                no_rate_limit,
            ]
        name = f"jupyter-{self.kind}"
        processes = self.context.processes
        self.process = process = await processes.spawn(argv, name, cwd=self.context.home.work)
        self.context.stack.push_async_callback(self.stop)
        self.http = http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}", headers=self.headers, timeout=TIMEOUT
        )
        with trio.fail_after(90):
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"{name} exited: {processes.log_text(name)}")
                try:
                    if (await http.get("/api/kernelspecs")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)

    async def stop(self) -> None:
        """Delete every kernel, then stop the server; idempotent."""
        if self.http is not None:
            with trio.move_on_after(30) as scope:
                scope.shield = True
                async with trio.open_nursery() as nursery:
                    for kernel_id in list(self.kernels):
                        nursery.start_soon(self.delete, kernel_id)
        http, self.http = self.http, None
        if http is not None:
            await http.aclose()
        process, self.process = self.process, None
        if process is not None:
            await self.context.processes.stop(process)

    def client(self) -> httpx.AsyncClient:
        assert self.http is not None
        return self.http

    async def create(self, timeout: float = TIMEOUT) -> str:
        response = await self.client().post(
            "/api/kernels", json={"name": KERNEL_NAME}, timeout=timeout
        )
        response.raise_for_status()
        kernel_id: str = response.json()["id"]
        self.kernels.add(kernel_id)
        return kernel_id

    async def channels(self, kernel_id: str, *, quickack: bool, v1: bool = False) -> Connection:
        """The kernel's channels WebSocket: legacy JSON frames, or with `v1` the v1 subprotocol
        (which the server must accept)."""
        headers = list(self.headers.items())
        resource = f"/api/kernels/{kernel_id}/channels"
        host = f"127.0.0.1:{self.port}"
        offered = [V1_SUBPROTOCOL] if v1 else []

        @asynccontextmanager
        async def connect() -> AsyncIterator[Channels]:
            stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            if quickack:
                stream = QuickAckStream(cast(trio.SocketStream, stream))
            async with open_channels(stream, host, resource, headers, offered) as channels:
                if not v1:
                    yield channels
                    return
                chosen = channels.websocket.subprotocol
                if chosen != V1_SUBPROTOCOL:
                    raise RuntimeError(f"{self.kind} answered subprotocol {chosen!r}, not v1")
                yield V1Channels(channels.websocket)

        return await Connection.open(self.context.nursery, connect)

    async def delete(self, kernel_id: str) -> None:
        self.kernels.discard(kernel_id)
        await self.client().delete(f"/api/kernels/{kernel_id}")


class GatewaySession(Session):
    def __init__(
        self,
        server: JupyterServer,
        kernel_id: str,
        channels: Connection,
        quickack: bool,
        v1: bool = False,
    ) -> None:
        self.server = server
        self.kernel_id = kernel_id
        self.channels = channels
        self.quickack = quickack
        self.v1 = v1

    async def execute(self, code: str) -> Execution:
        return await self.channels.execute(code)

    async def close(self) -> None:
        await self.channels.aclose()
        await self.server.delete(self.kernel_id)

    @property
    def server_pid(self) -> int | None:
        return self.server.process.pid if self.server.process else None

    async def recover(self) -> None:
        await self.channels.aclose()
        self.channels = await self.server.channels(
            self.kernel_id, quickack=self.quickack, v1=self.v1
        )


class Gateway(Configuration):
    family = "gateway"
    kind = "kg"
    quickack = False
    v1 = False
    server: JupyterServer

    async def setup(self) -> None:
        context = self.context
        async with context._lock:
            if self.kind not in context.servers:
                log(f"starting {self.kind}")
                server = JupyterServer(context, self.kind)
                await server.start()
                context.servers[self.kind] = server
        self.server = context.servers[self.kind]

    async def start_session(self, *, connect: bool = True) -> tuple[Session, float]:
        started = time.perf_counter()
        kernel_id = await self.server.create()
        channels = await self.server.channels(kernel_id, quickack=self.quickack, v1=self.v1)
        await channels.kernel_info()
        elapsed = time.perf_counter() - started
        session = GatewaySession(self.server, kernel_id, channels, self.quickack, self.v1)
        return session, elapsed

    @property
    def server_pid(self) -> int | None:
        return self.server.process.pid if self.server.process else None


class KernelGateway(Gateway):
    key = "kg"
    label = "Jupyter Kernel Gateway, WebSocket"
    kind = "kg"


class KernelGatewayQuickAck(Gateway):
    key = "kg-quickack"
    label = "Jupyter Kernel Gateway, WebSocket, client TCP_QUICKACK"
    kind = "kg"
    quickack = True


class Server(Gateway):
    key = "server"
    label = "jupyter_server, WebSocket"
    kind = "server"


class ServerQuickAck(Gateway):
    key = "server-quickack"
    label = "jupyter_server, WebSocket, client TCP_QUICKACK"
    kind = "server"
    quickack = True


class KernelGatewayV1(Gateway):
    key = "kg-v1"
    label = "Jupyter Kernel Gateway, WebSocket v1, client TCP_QUICKACK"
    kind = "kg"
    quickack = True
    v1 = True


class ServerV1(Gateway):
    key = "server-v1"
    label = "jupyter_server, WebSocket v1, client TCP_QUICKACK"
    kind = "server"
    quickack = True
    v1 = True


class KallichoreJupyter(Gateway):
    """Our daemon's Jupyter Server kernels API (/api/kernels and its channels, v1), reached
    exactly as the gateways are: same client, same calls."""

    key = "jupyter-v1"
    label = "kallichore daemon, Jupyter kernels API, WebSocket v1"
    family = "kallichore"
    kind = "kallichore"
    v1 = True


CONFIGURATIONS: list[type[Configuration]] = [
    Floor,
    Embedded,
    KallichoreTcp,
    KallichoreUnix,
    *(client_stack(stack, transport) for transport in ("tcp", "socket") for stack in CLIENT_STACKS),
    KallichoreJupyter,
    KallichoreExecute,
    KernelGateway,
    KernelGatewayQuickAck,
    KernelGatewayV1,
    Server,
    ServerQuickAck,
    ServerV1,
    FloorControl,
]
KEYS = [c.key for c in CONFIGURATIONS]


def needs_gateways(keys: list[str]) -> bool:
    return any(c.family == "gateway" for c in CONFIGURATIONS if c.key in keys)
