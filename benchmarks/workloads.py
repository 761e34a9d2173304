"""The workloads, each alternating between the configurations (A B C ... A B C ...).

- latency: execute `1` until execute_reply and iopub idle; batches interleaved per round;
- throughput: many small display_data messages, and a stream of tens of MB;
- start: "create session" to "kernel_info reply in hand", one start per configuration a round;
- scale: 50 sessions at once in one server: time until all are ready, the server's own CPU and
  RSS while they sit idle, and one session's latency meanwhile (interleaved with the floor);
- agent: callers running `1` through the agent API's `POST /sessions/{id}/execute` at once,
  spread over a few sessions of one daemon, for a while: executions per second;
- memory: the daemon's RSS per idle session, per connected client (Kallichore channels, Jupyter
  v1 channels), and at its peak while a kernel prints a burst to a client that does not read.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
import trio_websocket

from benchmarks.clients import ClientFailed
from benchmarks.configs import (
    Configuration,
    Context,
    Daemon,
    DaemonSession,
    ExecuteSession,
    GatewaySession,
    JupyterServer,
    Session,
    new_id,
)
from benchmarks.environment import log, process_cpu_seconds
from benchmarks.wsclient import TIMEOUT, Connection, Execution
from kallichore.client import (
    ApiError,
    EventsDropped,
    KernelMessage,
    decode_frame,
    execute_request,
)
from kallichore.session.events import DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class Plan:
    """How much of each workload to run."""

    latency_warmup: int = 50
    latency_rounds: int = 25
    latency_per_batch: int = 40
    throughput_rounds: int = 7
    small_messages: int = 20_000
    stream_mib: int = 64
    stream_chunk_kib: int = 256
    start_rounds: int = 10
    start_warmup: int = 1
    scale_sessions: int = 50
    scale_idle_seconds: float = 30.0
    scale_latency_rounds: int = 10
    scale_latency_per_batch: int = 30
    scale_jupyter_server: bool = True
    agent_callers: int = 10
    agent_sessions: int = 4
    agent_seconds: float = 20.0
    memory_sessions: int = 20
    memory_settle_seconds: float = 3.0
    burst_mib: int = 100
    burst_chunk_kib: int = 64

    @classmethod
    def quick(cls) -> Plan:
        """A smoke run: every code path, a few iterations, tiny sizes."""
        return cls(
            latency_warmup=2,
            latency_rounds=2,
            latency_per_batch=5,
            throughput_rounds=1,
            small_messages=300,
            stream_mib=1,
            stream_chunk_kib=64,
            start_rounds=1,
            start_warmup=0,
            scale_sessions=3,
            scale_idle_seconds=2.0,
            scale_latency_rounds=2,
            scale_latency_per_batch=5,
            agent_seconds=2.0,
            memory_sessions=1,
            memory_settle_seconds=0.2,
            burst_mib=2,
        )


LATENCY_CODE = "1"
# What a failed execution looks like from here: it is recorded, and the run goes on.
FAILURES = (
    trio_websocket.ConnectionClosed,
    trio.TooSlowError,
    TimeoutError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    httpx.HTTPError,
    ApiError,
    ClientFailed,
)


async def attempt(
    session: Session, code: str, key: str, failures: dict[str, list[str]]
) -> Execution | None:
    """Run `code`; on a failure, note it under `key`, reconnect, and return None."""
    try:
        return await session.execute(code)
    except FAILURES as exc:
        reason = f"{type(exc).__name__}: {exc}"[:300]
        log(f"{key}: an execution failed: {reason}")
        failures.setdefault(key, []).append(reason)
        await session.recover()
        return None


def small_messages_code(count: int) -> str:
    """`count` display_data messages, published with the kernel's own Session.

    IPython's `display()` costs about 300 us a call, which would cap every configuration at the
    kernel's ~3,000 msg/s; sending through the kernel's session leaves the kernel able to
    publish faster than any of the configurations forwards.
    """
    return (
        "_k = get_ipython().kernel\n"
        "_parent = _k.get_parent()\n"
        "_content = {'data': {'text/plain': 'x'}, 'metadata': {}, 'transient': {}}\n"
        f"for _ in range({count}):\n"
        "    _k.session.send(_k.iopub_socket, 'display_data', _content, parent=_parent)\n"
    )


def stream_code(mib: int, chunk_kib: int) -> str:
    """`mib` MiB of stdout, flushed every `chunk_kib` KiB (one stream message per flush)."""
    return (
        "import sys\n"
        f"_chunk = 'x' * ({chunk_kib} * 1024)\n"
        f"for _ in range({mib * 1024 // chunk_kib}):\n"
        "    sys.stdout.write(_chunk)\n"
        "    sys.stdout.flush()\n"
    )


# -- latency ----------------------------------------------------------------------------------


class ServerCpu:
    """The CPU seconds a session's server process spends on something (NaN without one): the
    rounds are sequential, so what the server does meanwhile is that session's."""

    def __init__(self, session: Session) -> None:
        self.pid = session.server_pid
        self.before = process_cpu_seconds(self.pid) if self.pid else math.nan

    def spent(self) -> float:
        return process_cpu_seconds(self.pid) - self.before if self.pid else math.nan


async def latency_batches(
    sessions: dict[str, Session],
    rounds: int,
    per_batch: int,
    warmup: int,
    failures: dict[str, list[str]],
    *,
    server_cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[list[float]]]:
    """Round-trip seconds: for each configuration, one batch per round; with `server_cpu`,
    also the CPU seconds its server spent on each batch (for those with a server)."""
    for key, session in sessions.items():
        for _ in range(warmup):
            await attempt(session, LATENCY_CODE, key, failures)
    batches: dict[str, list[list[float]]] = {key: [] for key in sessions}
    for round_ in range(rounds):
        for key, session in sessions.items():
            batch = []
            cpu = ServerCpu(session)
            for _ in range(per_batch):
                execution = await attempt(session, LATENCY_CODE, key, failures)
                if execution is not None:
                    batch.append(execution.seconds)
            batches[key].append(batch)
            if server_cpu is not None and cpu.pid:
                server_cpu.setdefault(key, []).append(cpu.spent())
        log(f"latency round {round_ + 1}/{rounds} done")
    return batches


# -- throughput -------------------------------------------------------------------------------


def describe(execution: Execution, cpu: ServerCpu) -> dict[str, Any]:
    run = {
        "seconds": execution.seconds,
        "messages": execution.iopub_messages,
        "bytes": execution.stream_bytes,
        "complete": execution.complete,
    }
    if cpu.pid:
        run["server_cpu_seconds"] = cpu.spent()
    return run


async def throughput(
    sessions: dict[str, Session], plan: Plan, failures: dict[str, list[str]]
) -> dict[str, Any]:
    """For each workload and configuration, one run a round."""
    sessions = {key: session for key, session in sessions.items() if not session.round_trips_only}
    workloads = {
        "small_messages": small_messages_code(plan.small_messages),
        "stream": stream_code(plan.stream_mib, plan.stream_chunk_kib),
    }
    expected = {
        # busy, execute_input, the messages, idle
        "small_messages": {"messages": plan.small_messages + 3, "bytes": 0},
        "stream": {"messages": plan.stream_mib * 1024 // plan.stream_chunk_kib + 3},
    }
    expected["stream"]["bytes"] = plan.stream_mib * 2**20
    for key, session in sessions.items():
        await attempt(session, small_messages_code(100), key, failures)
        await attempt(session, stream_code(1, 256), key, failures)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {key: [] for key in sessions} for name in workloads
    }
    for round_ in range(plan.throughput_rounds):
        for name, code in workloads.items():
            for key, session in sessions.items():
                cpu = ServerCpu(session)
                execution = await attempt(session, code, key, failures)
                run: dict[str, Any] = describe(execution, cpu) if execution else {"failed": True}
                runs[name][key].append(run)
        log(f"throughput round {round_ + 1}/{plan.throughput_rounds} done")
    return {"expected": expected, "runs": runs}


# -- start ------------------------------------------------------------------------------------


async def starts(
    configurations: list[Configuration], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds from create to kernel_info reply; `warmup` starts each, then `rounds`."""
    measured = [c for c in configurations if c.measures_starts]
    seconds: dict[str, list[float]] = {c.key: [] for c in measured}
    for round_ in range(1 - warmup, rounds + 1):
        for configuration in measured:
            session, elapsed = await configuration.start_session(connect=False)
            await session.close()
            if round_ > 0:
                seconds[configuration.key].append(elapsed)
        if round_ > 0:
            log(f"start round {round_}/{rounds} done")
    return seconds


# -- scale ------------------------------------------------------------------------------------


async def idle_cost(pid: int, seconds: float) -> dict[str, float]:
    """CPU (% of one core) and RSS (MB) of one process alone, sampled over `seconds`."""
    process = psutil.Process(pid)
    before = process.cpu_times()
    started = time.perf_counter()
    rss: list[int] = []
    while (elapsed := time.perf_counter() - started) < seconds:
        rss.append(process.memory_info().rss)
        await trio.sleep(min(1.0, seconds - elapsed))
    after = process.cpu_times()
    elapsed = time.perf_counter() - started
    rss.append(process.memory_info().rss)
    cpu = (after.user + after.system) - (before.user + before.system)
    return {
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "cpu_percent_of_one_core": 100 * cpu / elapsed,
        "rss_mb_max": max(rss) / 1e6,
        "rss_mb_end": rss[-1] / 1e6,
    }


async def scale_kallichore(
    context: Context, floor: Session, plan: Plan, failures: dict[str, list[str]]
) -> dict[str, Any]:
    """`plan.scale_sessions` sessions started at once in a fresh daemon (over TCP)."""
    daemon = Daemon(context, "tcp")
    await daemon.start("kallichore-scale")
    try:
        assert daemon.process is not None
        pid = daemon.process.pid
        rss_empty = psutil.Process(pid).memory_info().rss / 1e6
        ids = [new_id("scale") for _ in range(plan.scale_sessions)]
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for session_id in ids:
                nursery.start_soon(daemon.create_and_start, session_id, 600.0)
        ready = time.perf_counter() - started
        log(f"kallichore: {len(ids)} sessions ready in {ready:.1f} s")
        one = DaemonSession(daemon, ids[0], await daemon.channels(ids[0]))
        return await loaded_server_figures(
            "kallichore",
            pid,
            ready=ready,
            rss_empty=rss_empty,
            one=one,
            floor=floor,
            plan=plan,
            failures=failures,
        )
    finally:
        await daemon.stop()


async def scale_jupyter_server(
    context: Context, floor: Session, plan: Plan, failures: dict[str, list[str]]
) -> dict[str, Any]:
    """The same with jupyter_server (ready = kernel_info reply over the kernel's WebSocket;
    the WebSockets are then closed, so the kernels sit idle with no client, as in kallichore).
    The latency is taken with the TCP_QUICKACK client."""
    server = JupyterServer(context, "server")
    await server.start()
    try:
        assert server.process is not None
        pid = server.process.pid
        rss_empty = psutil.Process(pid).memory_info().rss / 1e6
        kernel_ids: list[str] = []

        async def start_one() -> None:
            try:
                kernel_id = await server.create(timeout=600.0)
                channels = await server.channels(kernel_id, quickack=True)
                await channels.kernel_info()
                await channels.aclose()
            except (trio_websocket.ConnectionClosed, httpx.HTTPError, ApiError) as error:
                # One kernel failing to come up must not lose the rest of the run.
                failures.setdefault("server", []).append(f"scale: a kernel failed: {error!r}")
                return
            kernel_ids.append(kernel_id)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(plan.scale_sessions):
                nursery.start_soon(start_one)
        ready = time.perf_counter() - started
        log(f"jupyter_server: {len(kernel_ids)} kernels ready in {ready:.1f} s")
        channels = await server.channels(kernel_ids[0], quickack=True)
        one = GatewaySession(server, kernel_ids[0], channels, quickack=True)
        return await loaded_server_figures(
            "jupyter_server",
            pid,
            ready=ready,
            rss_empty=rss_empty,
            one=one,
            floor=floor,
            plan=plan,
            failures=failures,
        )
    finally:
        await server.stop()


async def loaded_server_figures(
    name: str,
    pid: int,
    *,
    ready: float,
    rss_empty: float,
    one: Session,
    floor: Session,
    plan: Plan,
    failures: dict[str, list[str]],
) -> dict[str, Any]:
    """A server full of idle sessions: its own idle cost, then one session's round trips
    interleaved with the floor's (closes `one`)."""
    await trio.sleep(2)
    idle = await idle_cost(pid, plan.scale_idle_seconds)
    log(f"{name} idle: {idle['cpu_percent_of_one_core']:.2f}% CPU")
    try:
        batches = await latency_batches(
            {"scale": one, "floor": floor},
            plan.scale_latency_rounds,
            plan.scale_latency_per_batch,
            plan.scale_latency_per_batch,
            failures,
        )
    finally:
        await one.close()
    return {
        "sessions": plan.scale_sessions,
        "ready_seconds": ready,
        "rss_mb_empty": rss_empty,
        "idle": idle,
        "latency": batches,
    }


# -- agent ------------------------------------------------------------------------------------


async def agent_rate(
    context: Context, plan: Plan, failures: dict[str, list[str]]
) -> dict[str, Any]:
    """`plan.agent_callers` callers at once over `plan.agent_sessions` sessions of a fresh
    daemon (TCP), each running `1` with `POST /sessions/{id}/execute` again and again for
    `plan.agent_seconds`: the executions per second, and each call's seconds."""
    daemon = Daemon(context, "tcp")
    await daemon.start("kallichore-agent")
    try:
        ids = [new_id("agent") for _ in range(plan.agent_sessions)]
        async with trio.open_nursery() as nursery:
            for session_id in ids:
                nursery.start_soon(daemon.create_and_start, session_id)
        sessions = [ExecuteSession(daemon, session_id, None) for session_id in ids]
        for session in sessions:
            await attempt(session, LATENCY_CODE, "agent", failures)
        calls: list[float] = []
        deadline = time.perf_counter() + plan.agent_seconds

        async def caller(session: Session) -> None:
            while time.perf_counter() < deadline:
                execution = await attempt(session, LATENCY_CODE, "agent", failures)
                if execution is not None:
                    calls.append(execution.seconds)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for n in range(plan.agent_callers):
                nursery.start_soon(caller, sessions[n % len(sessions)])
        elapsed = time.perf_counter() - started
        log(f"agent: {len(calls)} executions in {elapsed:.1f} s")
        return {
            "callers": plan.agent_callers,
            "sessions": plan.agent_sessions,
            "seconds": elapsed,
            "executions": len(calls),
            "call_seconds": calls,
        }
    finally:
        await daemon.stop()


# -- memory -----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 1e6


def peak_rss_mb(pid: int) -> float:
    """The highest RSS the process ever had (VmHWM, which the kernel keeps: no sample missed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    return math.nan


async def settled_rss_mb(pid: int, plan: Plan) -> float:
    """RSS once the process has sat idle for a moment: what a step leaves behind."""
    await trio.sleep(plan.memory_settle_seconds)
    return rss_mb(pid)


async def footprint(
    pid: int,
    plan: Plan,
    start: Callable[[], Awaitable[str]],
    connect: Callable[[str], Awaitable[Connection]],
) -> dict[str, Any]:
    """RSS of a server: empty, with `plan.memory_sessions` idle sessions `start`ed at once, and
    with a client of each `connect`ed (each having run one round trip). One session, connected
    to and left, comes first: what the first of anything costs (imports, caches) is not spread
    over the others."""
    warm = await connect(await start())
    await warm.execute(LATENCY_CODE)
    await warm.aclose()
    empty = await settled_rss_mb(pid, plan)
    ids: list[str] = []

    async def start_one() -> None:
        ids.append(await start())

    async with trio.open_nursery() as nursery:
        for _ in range(plan.memory_sessions):
            nursery.start_soon(start_one)
    with_sessions = await settled_rss_mb(pid, plan)
    connections = [await connect(session_id) for session_id in ids]
    try:
        for connection in connections:
            await connection.execute(LATENCY_CODE)
        with_clients = await settled_rss_mb(pid, plan)
    finally:
        for connection in connections:
            await connection.aclose()
    return {
        "sessions": len(ids),
        "rss_mb_empty": empty,
        "rss_mb_with_sessions": with_sessions,
        "rss_mb_with_clients": with_clients,
    }


async def burst_to_slow_client(daemon: Daemon, plan: Plan) -> dict[str, Any]:
    """A kernel prints `plan.burst_mib` MiB to a channels client that stops reading as soon as
    the output begins and reads again once the kernel is done: the daemon's RSS meanwhile (the
    session's event log holds what the client has not read, within its byte bound), and what
    the client gets in the end (everything, or a loss notice and the newest output)."""
    assert daemon.process is not None
    pid = daemon.process.pid
    kallichore = daemon.client()
    session_id = new_id("burst")
    await daemon.create_and_start(session_id)
    before = await settled_rss_mb(pid, plan)
    # The kernel leaves this file once it has printed everything (the session's status may
    # still read idle when the first output is in: it is no signal).
    printed = daemon.context.home.root / f"{session_id}.printed"
    code = stream_code(plan.burst_mib, plan.burst_chunk_kib)
    code += f"open({str(printed)!r}, 'w').close()\n"
    request = execute_request(code)
    msg_id = request["header"]["msg_id"]
    url = kallichore.http.base_url
    stream_bytes = dropped_events = 0
    idle = False

    def take(text: str | bytes) -> bool:
        """Count a frame; True once it is the first of the output."""
        nonlocal stream_bytes, dropped_events, idle
        event = decode_frame(json.loads(text))
        if isinstance(event, EventsDropped):
            dropped_events += event.count
        elif isinstance(event, KernelMessage) and event.parent_msg_id == msg_id:
            if event.msg_type == "stream":
                stream_bytes += len(event.content["text"])
                return True
            if event.msg_type == "status" and event.content["execution_state"] == "idle":
                idle = True
        return False

    # No queue in the client (trio-websocket's reader waits for each message to be taken), so
    # not reading leaves everything to the daemon and the sockets.
    async with trio_websocket.open_websocket(
        str(url.host),
        int(url.port or 80),
        f"/sessions/{session_id}/channels",
        use_ssl=False,
        message_queue_size=0,
        max_message_size=2**31,
    ) as websocket:
        with trio.fail_after(TIMEOUT):
            await websocket.send_message(json.dumps(request))
            while not take(await websocket.get_message()):
                pass
        started = time.perf_counter()
        sampled = before
        with trio.fail_after(TIMEOUT * 5):
            while not printed.exists() or (
                (await kallichore.get_session(session_id))["status"] != "idle"
            ):
                sampled = max(sampled, rss_mb(pid))
                await trio.sleep(0.05)
        printing = time.perf_counter() - started
        held = rss_mb(pid)
        with trio.fail_after(TIMEOUT):
            while not idle:
                take(await websocket.get_message())
    after = await settled_rss_mb(pid, plan)
    await daemon.kill(session_id)
    log(
        f"burst of {plan.burst_mib} MiB: {stream_bytes / 2**20:.1f} MiB delivered, "
        f"{dropped_events} events dropped, RSS {before:.0f} -> peak {peak_rss_mb(pid):.0f} MB"
    )
    return {
        "burst_bytes": plan.burst_mib * 2**20,
        "chunk_bytes": plan.burst_chunk_kib * 1024,
        "printing_seconds": printing,
        "rss_mb_before": before,
        "rss_mb_sampled_max": sampled,
        "rss_mb_peak": peak_rss_mb(pid),
        "rss_mb_when_printed": held,
        "rss_mb_after": after,
        "stream_bytes_delivered": stream_bytes,
        "events_dropped": dropped_events,
    }


async def memory(
    context: Context, plan: Plan, *, kallichore: bool, jupyter: bool
) -> dict[str, Any]:
    """Each part in a fresh daemon over TCP: `kallichore`, sessions and Kallichore channels
    clients, then the burst (last: it raises the daemon's peak for good); `jupyter`, kernels
    and v1 channels clients of the Jupyter Server kernels API."""
    result: dict[str, Any] = {"event_log_bytes": DEFAULT_MAX_BYTES}
    if kallichore:
        daemon = Daemon(context, "tcp")
        await daemon.start("kallichore-memory")
        try:
            assert daemon.process is not None

            async def start() -> str:
                session_id = new_id("memory")
                await daemon.create_and_start(session_id, 600.0)
                return session_id

            result["kallichore"] = await footprint(daemon.process.pid, plan, start, daemon.channels)
            result["burst"] = await burst_to_slow_client(daemon, plan)
        finally:
            await daemon.stop()
    if jupyter:
        server = JupyterServer(context, "kallichore")
        await server.start()
        try:
            assert server.process is not None

            async def connect(kernel_id: str) -> Connection:
                return await server.channels(kernel_id, quickack=False, v1=True)

            result["jupyter"] = await footprint(
                server.process.pid, plan, partial(server.create, 600.0), connect
            )
        finally:
            await server.stop()
    return result
