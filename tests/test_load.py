"""The load test (`nox -s load`, not in CI: a few minutes): 50 sessions executing at once, then
1,000 API requests a second for 30 s, against a daemon on loopback.

It passes when every execution gives its output and every request its 200, and prints what
it measured: latencies (p50, p99, max), errors, and the daemon's RSS and CPU from /proc.
Requests are sent on a fixed schedule, whatever the answers: what the daemon could not keep
up with shows as lateness and missed requests (no coordinated omission). The figures belong
in docs/reliability.md.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from kallichore.client import KallichoreClient
from tests.conftest import daemon, new_session_body, stream_text
from tests.suites import FULL, cpu_seconds, rss_mib

pytestmark = [
    pytest.mark.load,
    pytest.mark.skipif(not FULL, reason="the load test runs with `nox -s load`"),
    pytest.mark.timeout(1800),
]

SESSIONS = 50
RATE = 1000
SECONDS = 30
CONNECTIONS = 20


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
    }


class DaemonSampler:
    """The daemon's RSS (peak) and CPU (share of one core) over a span, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = rss_mib(pid)
        self._cpu, self._wall = cpu_seconds(pid), time.monotonic()

    async def run(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, rss_mib(self.pid))
            await trio.sleep(0.2)

    def result(self) -> dict[str, float]:
        cpu = cpu_seconds(self.pid) - self._cpu
        wall = time.monotonic() - self._wall
        return {
            "rss_peak_mib": round(self.peak_rss, 1),
            "rss_end_mib": round(rss_mib(self.pid), 1),
            "cpu_percent": round(100 * cpu / wall, 1),
        }


async def sessions_executing_at_once(client: KallichoreClient) -> dict[str, Any]:
    ids = [f"load-{n}" for n in range(SESSIONS)]
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for session_id in ids:
            nursery.start_soon(start_one, client, session_id)
    start_seconds = time.monotonic() - started
    seconds: list[float] = []

    async def execute(session_id: str) -> None:
        async with client.channels(session_id) as channels:
            result = await channels.execute(f"print(sum(range(10**6)), {session_id!r})")
        assert stream_text(result.frames) == f"499999500000 {session_id}\n"
        seconds.append(result.seconds)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for session_id in ids:
            nursery.start_soon(execute, session_id)
    return {
        "sessions": SESSIONS,
        "start_all_seconds": round(start_seconds, 1),
        "execute_all_seconds": round(time.monotonic() - started, 2),
        "execution": summary(seconds),
    }


async def start_one(client: KallichoreClient, session_id: str) -> None:
    await client.create_session(**new_session_body(session_id, connection_timeout=300))
    await client.start(session_id)


async def requests_at_a_steady_rate(base_url: str, token: str | None) -> dict[str, Any]:
    """RATE requests a second for SECONDS, spread over CONNECTIONS kept-alive connections.

    Each request is timed from when it was sent (`latency`) and from when it was due
    (`lateness`: how far the daemon fell behind the schedule); what was due but never sent
    before the time was up is `missed`."""
    paths = ["/status", "/sessions", "/sessions/load-0", "/server_configuration"]
    latencies: list[float] = []
    lateness: list[float] = []
    errors: list[str] = []
    interval = CONNECTIONS / RATE
    begin = trio.current_time() + 0.5
    end = begin + SECONDS

    async def connection(n: int) -> None:
        async with KallichoreClient(base_url, token=token, timeout=30) as client:
            k = 0
            while (due := begin + n * interval / CONNECTIONS + k * interval) < end:
                await trio.sleep_until(due)
                if trio.current_time() >= end:
                    return
                path = paths[(n + k) % len(paths)]
                sent = trio.current_time()
                try:
                    response = await client.http.get(path)
                    if response.status_code != 200:
                        errors.append(f"{path}: {response.status_code}")
                except Exception as exc:  # counted, whatever it is
                    errors.append(f"{path}: {exc!r}")
                now = trio.current_time()
                latencies.append(now - sent)
                lateness.append(now - due)
                k += 1

    async with trio.open_nursery() as nursery:
        for n in range(CONNECTIONS):
            nursery.start_soon(connection, n)
    elapsed = trio.current_time() - begin
    return {
        "target_per_second": RATE,
        "seconds": round(elapsed, 1),
        "connections": CONNECTIONS,
        "requests": len(latencies),
        "missed": RATE * SECONDS - len(latencies),
        "achieved_per_second": round(len(latencies) / elapsed, 1),
        "errors": len(errors),
        "first_errors": errors[:5],
        "latency": summary(latencies),
        "lateness": summary(lateness),
    }


async def test_load(tmp_path: Path) -> None:
    args = ("--transport", "tcp", "--port", "0")
    async with daemon(tmp_path, *args) as d, d.client() as client:
        pid = d.process.pid
        figures: dict[str, Any] = {"daemon_rss_idle_mib": round(rss_mib(pid), 1)}
        async with trio.open_nursery() as nursery:
            sampler = DaemonSampler(pid)
            nursery.start_soon(sampler.run)
            figures["sessions"] = await sessions_executing_at_once(client)
            figures["sessions"]["daemon"] = sampler.result()
            sampler = DaemonSampler(pid)
            nursery.start_soon(sampler.run)
            figures["api"] = await requests_at_a_steady_rate(d.connection["base_path"], d.token)
            figures["api"]["daemon"] = sampler.result()
            figures["api"]["daemon"]["cpu_ms_per_request"] = round(
                10
                * figures["api"]["daemon"]["cpu_percent"]
                * figures["api"]["seconds"]
                / max(1, figures["api"]["requests"]),
                2,
            )
            nursery.cancel_scope.cancel()
        print("\nload figures:", json.dumps(figures, indent=2))
        (tmp_path / "load.json").write_text(json.dumps(figures, indent=2))
        assert figures["api"]["errors"] == 0, figures["api"]["first_errors"]
        assert (await client.status())["sessions"] == SESSIONS
