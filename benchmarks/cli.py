"""`python -m benchmarks`: set up, run the workloads, write JSON, Markdown and charts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from benchmarks import report
from benchmarks.configs import (
    CONFIGURATIONS,
    KEYS,
    Context,
    Session,
    needs_gateways,
)
from benchmarks.environment import (
    DEFAULT_CACHE_DIR,
    REPO_DIR,
    Home,
    Processes,
    ensure_gateway_venv,
    gateway_versions,
    git_revision,
    log,
    machine,
    our_versions,
    private_home,
    reap_own_children,
)
from benchmarks.workloads import (
    Plan,
    agent_rate,
    latency_batches,
    memory,
    scale_jupyter_server,
    scale_kallichore,
    starts,
    throughput,
)

WORKLOADS = ["latency", "throughput", "start", "scale", "agent", "memory"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure kallichore against jupyter_client, Kernel Gateway and "
        "jupyter_server, alternating the configurations in one run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: a few iterations of everything, tiny sizes (about a minute)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write the JSON, Markdown and charts here (default: benchmarks/results/ and docs/; "
        "with --quick: benchmarks/.cache/quick/)",
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated configurations (the floor is always included): {','.join(KEYS)}",
    )
    parser.add_argument(
        "--workload",
        action="append",
        choices=WORKLOADS,
        help="run only this workload (repeatable; default: all)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="run nothing: write the Markdown and charts again from a results file",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help="where the Jupyter servers' virtualenv is kept (default: benchmarks/.cache)",
    )
    return parser.parse_args(argv)


def chosen_keys(only: str | None) -> list[str]:
    if not only:
        return list(KEYS)
    wanted = {k.strip() for k in only.split(",") if k.strip()}
    unknown = wanted - set(KEYS)
    if unknown:
        raise SystemExit(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    return [k for k in KEYS if k in wanted or k == "floor"]


class _PhaseTimer:
    """Records how long each workload took, in raw["phase_seconds"]."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.laps: dict[str, float] = {}
        raw["phase_seconds"] = self.laps
        self.last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = now - self.last
        self.last = now


async def _stop_on_sigterm(scope: trio.CancelScope, raw: dict[str, Any]) -> None:
    """SIGTERM ends the run as Ctrl-C does: everything started is stopped first."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            log("SIGTERM: stopping everything")
            raw["interrupted"] = 143
            scope.cancel()
            return


async def _close_quietly(session: Session) -> None:
    with trio.move_on_after(60) as scope:
        scope.shield = True
        try:
            await session.close()
        except Exception as exc:
            log(f"closing a session failed: {exc!r}")


async def run_workloads(
    home: Home, plan: Plan, keys: list[str], workloads: list[str], gateway_bin: Path | None
) -> dict[str, Any]:
    """Start every configuration and its session up front, then run the workloads in turn."""
    raw: dict[str, Any] = {}
    processes = Processes(home.env, home.logs)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_sigterm, nursery.cancel_scope, raw)
            try:
                async with AsyncExitStack() as stack:
                    context = Context(home, processes, nursery, stack, gateway_bin)
                    configurations = [cls(context) for cls in CONFIGURATIONS if cls.key in keys]
                    for configuration in configurations:
                        await configuration.setup()
                    sessions: dict[str, Session] = {}
                    long_lived = [
                        c
                        for c in configurations
                        if {"latency", "throughput"} & set(workloads) or c.key == "floor"
                    ]
                    for configuration in long_lived:
                        session, _ = await configuration.start_session()
                        stack.push_async_callback(_close_quietly, session)
                        sessions[configuration.key] = session
                    log(f"sessions ready: {', '.join(sessions)}")
                    timer = _PhaseTimer(raw)
                    failures: dict[str, list[str]] = {}
                    raw["failures"] = failures
                    if "latency" in workloads:
                        raw["latency_server_cpu"] = {}
                        raw["latency"] = await latency_batches(
                            sessions,
                            plan.latency_rounds,
                            plan.latency_per_batch,
                            plan.latency_warmup,
                            failures,
                            server_cpu=raw["latency_server_cpu"],
                        )
                        timer.lap("latency")
                    if "throughput" in workloads:
                        raw["throughput"] = await throughput(sessions, plan, failures)
                        timer.lap("throughput")
                    if "start" in workloads:
                        raw["start"] = await starts(
                            configurations, plan.start_rounds, plan.start_warmup
                        )
                        timer.lap("start")
                    if "scale" in workloads:
                        raw["scale"] = {}
                        if {"ws-tcp", "ws-unix", "embedded"} & set(keys):
                            raw["scale"]["kallichore"] = await scale_kallichore(
                                context, sessions["floor"], plan, failures
                            )
                        if plan.scale_jupyter_server and {"server", "server-quickack"} & set(keys):
                            raw["scale"]["server"] = await scale_jupyter_server(
                                context, sessions["floor"], plan, failures
                            )
                        timer.lap("scale")
                    if "agent" in workloads and "execute-tcp" in keys:
                        raw["agent"] = await agent_rate(context, plan, failures)
                        timer.lap("agent")
                    if "memory" in workloads and {"ws-tcp", "jupyter-v1"} & set(keys):
                        raw["memory"] = await memory(
                            context,
                            plan,
                            kallichore="ws-tcp" in keys,
                            jupyter="jupyter-v1" in keys,
                        )
                        timer.lap("memory")
                    log("workloads done; stopping everything")
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await processes.stop_all()
    return raw


def output_paths(args: argparse.Namespace, date: str) -> tuple[Path, Path, Path]:
    """(JSON file, Markdown file, chart directory)."""
    if args.out is not None or args.quick:
        out = (args.out or DEFAULT_CACHE_DIR / "quick").resolve()
        return out / f"{date}.json", out / "benchmarks.md", out
    return (
        REPO_DIR / "benchmarks" / "results" / f"{date}.json",
        REPO_DIR / "docs" / "benchmarks.md",
        REPO_DIR / "docs",
    )


def shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_DIR))
    except ValueError:
        return str(path)


def write_reports(document: dict[str, Any], markdown_path: Path, chart_dir: Path) -> int:
    """The Markdown and the charts of `document` (the summary is computed again)."""
    raw = document.pop("raw")
    document["summary"] = report.summarise(raw)
    document["raw"] = raw  # (after the summary, for whoever reads the file)
    written = report.charts(document, chart_dir, "benchmarks-")
    if not written:
        log("matplotlib is not installed: no charts")
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(report.markdown(document, written))
    return len(written)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        loaded: dict[str, Any] = json.loads(args.render.read_text())
        _, markdown_path, chart_dir = output_paths(args, "")
        count = write_reports(loaded, markdown_path, chart_dir)
        report.write_json(args.render, loaded)
        log(f"wrote {shown(markdown_path)} and {count} chart(s) from {shown(args.render)}")
        return 0
    plan = Plan.quick() if args.quick else Plan()
    keys = chosen_keys(args.only)
    workloads = [w for w in WORKLOADS if w in (args.workload or WORKLOADS)]
    started = time.monotonic()
    load_before = os.getloadavg()
    wants_server_scale = "scale" in workloads and {"server", "server-quickack"} & set(keys)
    gateway_bin = None
    if needs_gateways(keys) or wants_server_scale:
        gateway_bin = ensure_gateway_venv(args.cache_dir)
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    json_path, markdown_path, chart_dir = output_paths(args, date)
    log(f"configurations: {', '.join(keys)}; workloads: {', '.join(workloads)}")
    raw: dict[str, Any] = {"interrupted": 130}  # unless the run returns: Ctrl-C
    with private_home() as home:
        try:
            raw = trio.run(run_workloads, home, plan, keys, workloads, gateway_bin)
        except* KeyboardInterrupt:
            pass
    left = reap_own_children()
    if left:
        log(f"killed {left} process(es) that outlived their configuration")
    if raw.get("interrupted"):
        log("interrupted: nothing written")
        return int(raw["interrupted"])
    labels = {cls.key: cls.label for cls in CONFIGURATIONS if cls.key in keys}
    document: dict[str, Any] = {
        "metadata": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable, "-m", "benchmarks", *(argv or sys.argv[1:])]),
            "quick": args.quick,
            "wall_seconds": time.monotonic() - started,
            "phase_seconds": raw.pop("phase_seconds", {}),
            # Other work on the machine shows here (1, 5 and 15 minute load averages).
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "plan": dataclasses.asdict(plan),
            "labels": labels,
            "workloads": workloads,
            "machine": machine(),
            "versions": our_versions(),
            "gateway_versions": gateway_versions(gateway_bin) if gateway_bin else None,
            "git": git_revision(),
            "json_path": shown(json_path),
            "statistics": "median with IQR (p25-p75); ratios per round against the floor",
        },
        "raw": raw,
    }
    if document["metadata"]["gateway_versions"]:
        for name in ("jupyter-kernel-gateway", "jupyter_server", "tornado"):
            document["metadata"]["versions"][name] = document["metadata"]["gateway_versions"][name]
    count = write_reports(document, markdown_path, chart_dir)
    report.write_json(json_path, document)
    met = sum(t["met"] for t in document["summary"]["targets"])
    total = len(document["summary"]["targets"])
    log(f"wrote {shown(json_path)}, {shown(markdown_path)} and {count} chart(s)")
    log(f"targets met: {met} of {total}; took {(time.monotonic() - started) / 60:.1f} min")
    return 0
