"""Summaries, targets, and the three outputs: JSON, Markdown and PNG charts."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.stats import Spread, paired_ratios, percentile, scaled, spread
from benchmarks.wsclient import QUIET_SECONDS

# Our daemon's channels through clients on other stacks (benchmarks.clients), beside ours.
CLIENT_STACKS = [
    f"{stack}-{transport}"
    for transport in ("tcp", "unix")
    for stack in ("websockets-sync", "websockets-asyncio", "node-ws")
]
KALLICHORE = ["embedded", "ws-tcp", "ws-unix", *CLIENT_STACKS, "jupyter-v1"]
GATEWAYS = ["kg", "kg-quickack", "kg-v1", "server", "server-quickack", "server-v1"]
KERNEL_GATEWAY = ["kg", "kg-quickack", "kg-v1"]
# Our Jupyter kernels API against our Kallichore channels: the round trip no slower than +5 %.
JUPYTER_LATENCY_VS_CHANNELS = 1.05
# The agent API's one-call execution against the channels round trip of the same code.
EXECUTE_LATENCY_VS_CHANNELS = 1.2
LATENCY_LIMITS = {
    "embedded": 1.00,
    "ws-tcp": 1.10,
    "ws-unix": 1.10,
    **dict.fromkeys(CLIENT_STACKS, 1.10),
}
# The daemon's own CPU (all its threads) per channels round trip of `1`, in ms.
SERVER_CPU_PER_ROUND_TRIP_MAX = 0.5
THROUGHPUT_MIN = 0.9
START_MAX = 0.8
IDLE_CPU_MAX = 1.0  # % of one core
IDLE_RSS_MAX = 150.0  # MB
# What a burst to a client that does not read may add to the daemon's RSS at its peak, in
# multiples of the event log's byte bound: the log itself, and what is in flight besides (the
# batch being framed and written, ZeroMQ's receive queue).
BURST_PEAK_MAX = 2.0


# -- summaries --------------------------------------------------------------------------------


def median_of(batch: Sequence[float]) -> float:
    return percentile(batch, 50)


def latency_summary(
    batches: dict[str, list[list[float]]], server_cpu: dict[str, list[float]] | None = None
) -> dict[str, dict[str, Any]]:
    """p50/p90/p99 over every round trip (ms), the spread of batch medians, and ratios; with
    `server_cpu` (CPU seconds per batch), the server's CPU ms per round trip: all batches'
    CPU over all their round trips (the clock ticks in 10 ms steps, too coarse for one batch
    alone), with the spread of the batches' own figures."""
    floor_medians = [median_of(b) for b in batches.get("floor", [])]
    floor_all = [x for b in batches.get("floor", []) for x in b]
    summary: dict[str, dict[str, Any]] = {}
    for key, rounds in batches.items():
        samples = [x for b in rounds for x in b]
        medians = [median_of(b) for b in rounds]
        entry: dict[str, Any] = {
            "runs": len(samples),
            "p50_ms": percentile(samples, 50) * 1e3,
            "p90_ms": percentile(samples, 90) * 1e3,
            "p99_ms": percentile(samples, 99) * 1e3,
            "batch_median_ms": scaled(spread(medians), 1e3),
        }
        if floor_all:
            entry["ratio_p50"] = spread(paired_ratios(medians, floor_medians))
            entry["ratio_p90"] = entry["p90_ms"] / (percentile(floor_all, 90) * 1e3)
            entry["ratio_p99"] = entry["p99_ms"] / (percentile(floor_all, 99) * 1e3)
        cpu = (server_cpu or {}).get(key)
        if cpu and samples:
            entry["server_cpu_ms_per_round_trip"] = sum(cpu) / len(samples) * 1e3
            entry["server_cpu_ms_per_round_trip_batches"] = spread(
                [c / len(b) * 1e3 for c, b in zip(cpu, rounds, strict=False) if b]
            )
        summary[key] = entry
    return summary


def throughput_summary(data: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """msg/s and MB/s per run, with their spread and ratios to the floor's run of the round."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for workload, per_key in data["runs"].items():
        expected = data["expected"][workload]
        nan = math.nan
        rates = {
            key: {
                "msg_per_s": [
                    nan if r.get("failed") else r["messages"] / r["seconds"] for r in runs
                ],
                "mb_per_s": [
                    nan if r.get("failed") else r["bytes"] / r["seconds"] / 1e6 for r in runs
                ],
                "seconds": [nan if r.get("failed") else r["seconds"] for r in runs],
                "lost": [
                    nan if r.get("failed") else expected["messages"] - r["messages"] for r in runs
                ],
            }
            for key, runs in per_key.items()
        }
        floor = rates.get("floor")
        summary[workload] = {}
        for key, figures in rates.items():
            entry: dict[str, Any] = {
                "msg_per_s": spread(figures["msg_per_s"]),
                "mb_per_s": spread(figures["mb_per_s"]),
                "seconds": spread(figures["seconds"]),
                "messages_lost": spread(figures["lost"]),
                "runs_without_idle": sum(not r.get("complete", True) for r in per_key[key]),
                "runs_failed": sum(bool(r.get("failed")) for r in per_key[key]),
                "runs_with_losses": sum(lost > 0 for lost in figures["lost"]),
                "most_lost": max((x for x in figures["lost"] if not math.isnan(x)), default=0),
            }
            cpu = server_cpu_per_output(workload, per_key[key])
            if cpu is not None:
                entry["server_cpu"] = cpu
            if floor is not None:
                entry["ratio_msg_per_s"] = spread(
                    paired_ratios(figures["msg_per_s"], floor["msg_per_s"])
                )
                if workload == "stream":
                    entry["ratio_mb_per_s"] = spread(
                        paired_ratios(figures["mb_per_s"], floor["mb_per_s"])
                    )
            summary[workload][key] = entry
    return summary


def server_cpu_per_output(workload: str, runs: list[dict[str, Any]]) -> Spread | None:
    """The server's CPU per unit of output over a configuration's runs: ms per MB streamed
    (stream), us per message (small messages); None without a server."""
    measured = [r for r in runs if not r.get("failed") and "server_cpu_seconds" in r]
    if not measured:
        return None
    if workload == "stream":
        return spread([r["server_cpu_seconds"] * 1e3 / (r["bytes"] / 1e6) for r in measured])
    return spread([r["server_cpu_seconds"] * 1e6 / r["messages"] for r in measured])


def start_summary(seconds: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    floor = seconds.get("floor")
    summary: dict[str, dict[str, Any]] = {}
    for key, values in seconds.items():
        entry: dict[str, Any] = {"seconds": spread(values)}
        if floor is not None:
            entry["ratio"] = spread(paired_ratios(values, floor))
        summary[key] = entry
    return summary


def scale_summary(data: dict[str, Any]) -> dict[str, Any]:
    latency = latency_summary(data["latency"])
    return {
        "sessions": data["sessions"],
        "ready_seconds": data["ready_seconds"],
        "rss_mb_empty": data["rss_mb_empty"],
        "idle": data["idle"],
        "latency": latency["scale"],
        "floor_latency": latency["floor"],
    }


def agent_summary(data: dict[str, Any]) -> dict[str, Any]:
    calls = data["call_seconds"]
    return {
        "callers": data["callers"],
        "sessions": data["sessions"],
        "seconds": data["seconds"],
        "executions": data["executions"],
        "per_s": data["executions"] / data["seconds"],
        "call_p50_ms": percentile(calls, 50) * 1e3 if calls else math.nan,
        "call_p99_ms": percentile(calls, 99) * 1e3 if calls else math.nan,
    }


def memory_summary(data: dict[str, Any]) -> dict[str, Any]:
    """MB per idle session and per connected client, from the RSS steps of each API; and the
    burst's peak over the RSS before it."""
    summary: dict[str, Any] = {"event_log_mb": data["event_log_bytes"] / 1e6}
    for api in ("kallichore", "jupyter"):
        if api in data:
            steps = data[api]
            sessions = steps["sessions"]
            summary[api] = {
                "sessions": sessions,
                "rss_mb_empty": steps["rss_mb_empty"],
                "mb_per_session": (steps["rss_mb_with_sessions"] - steps["rss_mb_empty"])
                / sessions,
                "mb_per_client": (steps["rss_mb_with_clients"] - steps["rss_mb_with_sessions"])
                / sessions,
            }
    if "burst" in data:
        burst = data["burst"]
        summary["burst"] = {
            **burst,
            "peak_growth_mb": burst["rss_mb_peak"] - burst["rss_mb_before"],
            "delivered_all": burst["stream_bytes_delivered"] == burst["burst_bytes"],
            "told_of_loss": burst["events_dropped"] > 0,
        }
    return summary


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if "latency" in raw:
        summary["latency"] = latency_summary(raw["latency"], raw.get("latency_server_cpu"))
    if "throughput" in raw:
        summary["throughput"] = throughput_summary(raw["throughput"])
    if "start" in raw:
        summary["start"] = start_summary(raw["start"])
    if "scale" in raw:
        summary["scale"] = {name: scale_summary(data) for name, data in raw["scale"].items()}
    if "agent" in raw:
        summary["agent"] = agent_summary(raw["agent"])
    if "memory" in raw:
        summary["memory"] = memory_summary(raw["memory"])
    summary["failures"] = {
        key: {"count": len(reasons), "reasons": sorted(set(reasons))}
        for key, reasons in raw.get("failures", {}).items()
    }
    summary["fan_out"] = (
        "not applicable: a session has one channels client at a time (Kallichore's semantics)"
    )
    summary["targets"] = [t.as_dict() for t in targets(summary)]
    return summary


# -- targets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    workload: str
    configuration: str
    what: str
    value: float
    limit: float
    met: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "configuration": self.configuration,
            "what": self.what,
            "value": self.value,
            "limit": self.limit,
            "met": self.met,
        }


def _below_gateways(
    workload: str,
    figures: dict[str, float],
    what: str,
    higher_is_better: bool = False,
) -> list[Target]:
    """Each kallichore configuration against the best gateway configuration measured."""
    gateways = {k: v for k, v in figures.items() if k in GATEWAYS and not math.isnan(v)}
    if not gateways:
        return []
    pick: Callable[[Any], float] = max if higher_is_better else min
    best = pick(gateways.values())
    found = []
    for key in KALLICHORE:
        if key in figures:
            value = figures[key]
            met = value > best if higher_is_better else value < best
            found.append(Target(workload, key, what, value, best, met))
    return found


def targets(summary: dict[str, Any]) -> list[Target]:
    found: list[Target] = []
    latency = summary.get("latency", {})
    if "floor" in latency:
        for key, limit in LATENCY_LIMITS.items():
            if key in latency:
                ratio = latency[key]["ratio_p50"]["median"]
                found.append(Target("latency", key, "p50 / floor", ratio, limit, ratio <= limit))
        for key in LATENCY_LIMITS:
            cpu = latency.get(key, {}).get("server_cpu_ms_per_round_trip")
            if cpu is not None:
                limit = SERVER_CPU_PER_ROUND_TRIP_MAX
                what = "server CPU ms / round trip"
                found.append(Target("latency", key, what, cpu, limit, cpu <= limit))
        p50 = {key: entry["p50_ms"] for key, entry in latency.items()}
        found += _below_gateways("latency", p50, "p50 ms < best gateway")
    for workload, per_key in summary.get("throughput", {}).items():
        if "floor" not in per_key:
            continue
        measure = "msg_per_s" if workload == "small_messages" else "mb_per_s"
        unit = "msg/s" if measure == "msg_per_s" else "MB/s"
        for key in KALLICHORE:
            if key in per_key:
                ratio = per_key[key][f"ratio_{measure}"]["median"]
                found.append(
                    Target(
                        f"throughput {workload}",
                        key,
                        f"{unit} / floor",
                        ratio,
                        THROUGHPUT_MIN,
                        ratio >= THROUGHPUT_MIN,
                    )
                )
        rates = {key: entry[measure]["median"] for key, entry in per_key.items()}
        found += _below_gateways(
            f"throughput {workload}", rates, f"{unit} > best gateway", higher_is_better=True
        )
    found += _jupyter_api_targets(summary)
    if "execute-tcp" in latency and "ws-tcp" in latency:
        ratio = latency["execute-tcp"]["p50_ms"] / latency["ws-tcp"]["p50_ms"]
        limit = EXECUTE_LATENCY_VS_CHANNELS
        what = "p50 / ws-tcp p50"
        found.append(Target("latency", "execute-tcp", what, ratio, limit, ratio <= limit))
    start = summary.get("start", {})
    if "floor" in start:
        for key in KALLICHORE:
            if key in start:
                ratio = start[key]["ratio"]["median"]
                met = ratio <= START_MAX
                found.append(Target("start", key, "s / floor", ratio, START_MAX, met))
        medians = {key: entry["seconds"]["median"] for key, entry in start.items()}
        found += _below_gateways("start", medians, "s < best gateway")
    scale = summary.get("scale", {})
    if "kallichore" in scale:
        idle = scale["kallichore"]["idle"]
        cpu = idle["cpu_percent_of_one_core"]
        rss = idle["rss_mb_max"]
        cpu_what = f"idle CPU % of a core < {IDLE_CPU_MAX:g}"
        found.append(Target("scale", "ws-tcp", cpu_what, cpu, IDLE_CPU_MAX, cpu < IDLE_CPU_MAX))
        rss_what = f"idle RSS MB < {IDLE_RSS_MAX:g}"
        found.append(Target("scale", "ws-tcp", rss_what, rss, IDLE_RSS_MAX, rss < IDLE_RSS_MAX))
        if "server" in scale:
            ours, theirs = scale["kallichore"], scale["server"]
            for what, a, b in (
                ("all ready s < jupyter_server", ours["ready_seconds"], theirs["ready_seconds"]),
                (
                    "p50 / floor < jupyter_server's",
                    ours["latency"]["ratio_p50"]["median"],
                    theirs["latency"]["ratio_p50"]["median"],
                ),
            ):
                found.append(Target("scale", "ws-tcp", what, a, b, a < b))
    found += _memory_targets(summary)
    return found


def _memory_targets(summary: dict[str, Any]) -> list[Target]:
    """A burst to a client that does not read ends in delivery or a loss notice, and costs
    the daemon at most BURST_PEAK_MAX times the event log's bound at its peak."""
    burst = summary.get("memory", {}).get("burst")
    if burst is None:
        return []
    limit = BURST_PEAK_MAX * summary["memory"]["event_log_mb"]
    growth = burst["peak_growth_mb"]
    ended = bool(burst["delivered_all"] or burst["told_of_loss"])
    return [
        Target("memory", "ws-tcp", "burst: delivered or loss told", float(ended), 1, ended),
        Target(
            "memory",
            "ws-tcp",
            f"burst: peak RSS growth MB <= {BURST_PEAK_MAX:g}x the event log's bound",
            growth,
            limit,
            growth <= limit,
        ),
    ]


def _jupyter_api_targets(summary: dict[str, Any]) -> list[Target]:
    """Our Jupyter kernels API (`jupyter-v1`): a round trip within +5 % of our Kallichore
    channels' (`ws-tcp`), throughput at least Kernel Gateway's best, and no message lost in a
    workload where Kernel Gateway loses some."""
    key = "jupyter-v1"
    found = []
    latency = summary.get("latency", {})
    if key in latency and "ws-tcp" in latency:
        ratio = latency[key]["p50_ms"] / latency["ws-tcp"]["p50_ms"]
        limit = JUPYTER_LATENCY_VS_CHANNELS
        found.append(Target("latency", key, "p50 / ws-tcp p50", ratio, limit, ratio <= limit))
    for workload, per_key in summary.get("throughput", {}).items():
        if key not in per_key:
            continue
        measure = "msg_per_s" if workload == "small_messages" else "mb_per_s"
        kg = [per_key[k][measure]["median"] for k in KERNEL_GATEWAY if k in per_key]
        if kg:
            ours, best = per_key[key][measure]["median"], max(kg)
            what = f"{measure.replace('_per_s', '/s')} >= Kernel Gateway's best"
            found.append(Target(f"throughput {workload}", key, what, ours, best, ours >= best))
        if any(per_key[k]["runs_with_losses"] for k in KERNEL_GATEWAY if k in per_key):
            lost = per_key[key]["most_lost"]
            what = "messages lost (Kernel Gateway lost some)"
            found.append(Target(f"throughput {workload}", key, what, lost, 0, lost == 0))
    return found


# -- JSON -------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """NaN is not JSON: write null; round floats to keep the file readable."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 7)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(document), indent=1) + "\n")


# -- Markdown ---------------------------------------------------------------------------------


def _ms(s: Spread) -> str:
    return f"{s['median']:.2f} [{s['p25']:.2f}-{s['p75']:.2f}]"


def _ratio(s: Spread | None) -> str:
    if s is None or not s["n"]:
        return "-"
    return f"{s['median']:.2f}x [{s['p25']:.2f}-{s['p75']:.2f}]"


def _rate(s: Spread, digits: int = 0) -> str:
    return f"{s['median']:,.{digits}f} [{s['p25']:,.{digits}f}-{s['p75']:,.{digits}f}]"


def _cpu(s: Spread | None, digits: int) -> str:
    return "-" if s is None else _rate(s, digits)


def _server_cpu_per_round_trip(entry: dict[str, Any]) -> str:
    if "server_cpu_ms_per_round_trip" not in entry:
        return "-"
    batches = entry["server_cpu_ms_per_round_trip_batches"]
    return (
        f"{entry['server_cpu_ms_per_round_trip']:.2f} [{batches['p25']:.2f}-{batches['p75']:.2f}]"
    )


def _phrase(t: Target) -> str:
    mark = "met" if t.met else "**not met**"
    measure = t.what.split(" ")[0]
    measure = "time" if measure == "s" else measure
    if "best gateway" in t.what:
        side = "above" if ">" in t.what else "below"
        return f"{measure} {side} the gateways: {mark}"
    if t.what.startswith("server CPU"):
        return f"server CPU <= {t.limit:g} ms: {mark}"
    if "/ floor" in t.what:
        sign = ">=" if t.workload.startswith("throughput") else "<="
        return f"{measure} {sign} {t.limit:.2f}x floor: {mark}"
    return f"{t.what}: {mark}"


def _verdicts(found: list[Target], workload: str, key: str) -> str:
    words = [
        _phrase(t) for t in found if t.workload.startswith(workload) and t.configuration == key
    ]
    return "; ".join(words) or "-"


def _revision(git: dict[str, Any]) -> str:
    if not git.get("commit"):
        return ""
    dirty = " with uncommitted changes" if git.get("dirty") else ""
    return f" Code: commit `{git['commit'][:10]}`{dirty}."


def markdown(document: dict[str, Any], charts: dict[str, str]) -> str:
    meta = document["metadata"]
    summary = document["summary"]
    labels: dict[str, str] = meta["labels"]
    found = [Target(**t) for t in summary["targets"]]
    plan = meta["plan"]
    lines = [
        "# Benchmarks",
        "",
        "`nox -s bench` (or `python -m benchmarks` in an environment with kallichore's test",
        "extras and matplotlib) measures kallichore against jupyter_client talking ZeroMQ",
        "straight to the kernel (the *floor*), Jupyter Kernel Gateway and jupyter_server. It",
        "sets up what it needs (a virtualenv for the two Jupyter servers under",
        "`benchmarks/.cache/`, a private HOME and Jupyter directories, one kernelspec) and",
        "writes `benchmarks/results/<date>.json`, this page and its charts. `nox -s bench_smoke`",
        "(`python -m benchmarks --quick`) runs every workload and configuration a few times with",
        "tiny sizes and writes to `benchmarks/.cache/quick/` instead; `--only KEY,...` and",
        "`--workload NAME` narrow a run (`python -m benchmarks --help`).",
        "",
        "Every configuration runs the same kernel (ipykernel from the benchmark's interpreter,",
        "one kernelspec for all) on loopback, and the workloads alternate between the",
        "configurations (A B C ... A B C ...) so the machine's drift hits all of them alike. Each",
        "figure is the median with its interquartile range in brackets (p25-p75); each ratio is",
        "taken per round against the floor's figure from the same round, and its median and",
        "IQR over the rounds are shown. `floor-2` is a second, identical floor: its ratio",
        "shows how far two identical configurations drift apart in the same run.",
        "",
        "| key | configuration |",
        "|---|---|",
        *[f"| `{key}` | {label} |" for key, label in labels.items()],
        "",
        "The gateways run as they come except for IOPub rate limiting, which is turned off",
        "(`--ZMQChannelsWebsocketConnection.limit_rate=False`): with it they drop most of the",
        "throughput workloads' output. Their `-quickack` rows use the same server with a client",
        "that sets `TCP_QUICKACK` on its socket before every read, which removes a ~40 ms",
        "delayed-ACK stall. The WebSocket rows but the other client stacks' (below) use one",
        "client (ours: trio-websocket, no compression), with legacy JSON frames except the",
        "`-v1` rows, which speak the Jupyter servers' v1 subprotocol (binary frames, as",
        "JupyterLab 4 does). `jupyter-v1` is our",
        "daemon's Jupyter Server kernels API (`/api/kernels` and its channels), reached exactly",
        "as the gateways are; its targets: a round trip within +5 % of `ws-tcp`'s, throughput",
        "at least Kernel Gateway's best, and no message lost where Kernel Gateway loses some.",
        "The `websockets-*` and `node-ws-*` rows are our daemon's channels (the same daemon as",
        "`ws-tcp` and `ws-unix`, in the same rounds) through the clients people use instead of",
        "ours: the `websockets` package's sync and asyncio clients and Node's `ws` (Positron's),",
        "each in a process of its own with its defaults, timing its round trips itself.",
        "",
        f"## Last full run: {meta['date']}",
        "",
        f"{meta['machine']['cpu_count']} cores ({meta['machine']['cpu_model']}), "
        f"{meta['machine']['platform']}, Python {meta['machine']['python']}; the run took "
        f"{meta['wall_seconds'] / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("phase_seconds", {}).items())
        + "); load average (1 min) before and after: "
        f"{meta['load_average_before'][0]:.2f}, {meta['load_average_after'][0]:.2f}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
        + ". Raw figures: `"
        + meta["json_path"]
        + "`."
        + _revision(meta.get("git") or {}),
        "",
    ]
    latency = summary.get("latency")
    if latency:
        lines += [
            "### Latency",
            "",
            "Round trip of `execute_request` for `1` until both the execute_reply and the iopub",
            f"idle are in hand: {plan['latency_rounds']} rounds x {plan['latency_per_batch']} "
            f"round trips per configuration after {plan['latency_warmup']} warm-up ones.",
            "p50/p90/p99 over all round trips; the ratio is that of the batch medians.",
            "*Server CPU* is the CPU time of the server process between client and kernel (all",
            "its threads, ZeroMQ's I/O thread included; the kernel's not) over all the",
            "batches, per round trip, from /proc/PID/stat (the batches' own figures in",
            "brackets: they are coarse, the clock ticks in 10 ms steps).",
            "",
            "| configuration | p50 ms | p90 ms | p99 ms | batch median ms | p50 vs floor "
            "| server CPU ms / round trip | target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, entry in latency.items():
            lines.append(
                f"| `{key}` | {entry['p50_ms']:.2f} | {entry['p90_ms']:.2f} | "
                f"{entry['p99_ms']:.2f} | {_ms(entry['batch_median_ms'])} | "
                f"{_ratio(entry.get('ratio_p50'))} | {_server_cpu_per_round_trip(entry)} | "
                f"{_verdicts(found, 'latency', key)} |"
            )
        if "latency" in charts:
            lines += ["", f"![latency distributions]({charts['latency']})"]
        lines.append("")
    throughput = summary.get("throughput")
    if throughput:
        lines += [
            "### Throughput",
            "",
            "Messages and bytes received by the client per second, from sending the",
            f"execute_request until the final idle, {plan['throughput_rounds']} rounds.",
            f"*Small messages*: the kernel publishes {plan['small_messages']:,} `display_data`",
            "messages through its own session (IPython's `display()` is ~300 us a call and would",
            "cap every configuration at the kernel's own ~3,000 msg/s). *Stream*:",
            f"{plan['stream_mib']} MiB of stdout in {plan['stream_chunk_kib']} KiB flushes (one",
            "stream message each).",
            "",
            "A server that cannot keep up loses messages: the kernel's PUB socket drops what its",
            "subscriber (the server) has not taken once ZeroMQ's high-water marks are reached.",
            "Lost messages are shown next to the rate; when the final idle itself is lost, the",
            f"run ends {QUIET_SECONDS:g} s after the last message and is timed to that message.",
            "Server CPU: as in the latency table, per message (small) and per MB (stream).",
            "",
            "| configuration | small: msg/s | vs floor | server CPU us / msg | stream: MB/s "
            "| vs floor | server CPU ms / MB | target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        small = throughput.get("small_messages", {})
        expected_small = document["raw"]["throughput"]["expected"]["small_messages"]["messages"]
        stream = throughput.get("stream", {})
        for key in small:
            s, b = small[key], stream.get(key)
            verdict = _verdicts(found, "throughput", key)
            lost_note = (
                f" (lost messages in {s['runs_with_losses']} of {s['msg_per_s']['n']} runs, "
                f"up to {s['most_lost']:,.0f} of {expected_small:,})"
                if s.get("runs_with_losses")
                else ""
            )
            lines.append(
                f"| `{key}` | {_rate(s['msg_per_s'])}{lost_note} | "
                f"{_ratio(s.get('ratio_msg_per_s'))} | {_cpu(s.get('server_cpu'), 1)} | "
                f"{_rate(b['mb_per_s'], 1) if b else '-'} | "
                f"{_ratio(b.get('ratio_mb_per_s')) if b else '-'} | "
                f"{_cpu(b.get('server_cpu'), 1) if b else '-'} | {verdict} |"
            )
        if "throughput" in charts:
            lines += ["", f"![throughput]({charts['throughput']})"]
        lines.append("")
    start = summary.get("start")
    if start:
        lines += [
            "### Start",
            "",
            f'From "create session" to "kernel_info reply in hand", {plan["start_rounds"]}',
            f"starts per configuration after {plan.get('start_warmup', 1)} warm-up start(s) each. "
            "The floor is jupyter_client's",
            "`KernelManager.start_kernel` + `BlockingKernelClient.wait_for_ready`; kallichore's",
            "daemon: `PUT /sessions` + `POST /sessions/{id}/start` (which returns kernel_info);",
            "the gateways: `POST /api/kernels`, then the channels WebSocket and a",
            "kernel_info_request.",
            "",
            "| configuration | seconds | vs floor | target |",
            "|---|---|---|---|",
        ]
        for key, entry in start.items():
            lines.append(
                f"| `{key}` | {_rate(entry['seconds'], 3)} | {_ratio(entry.get('ratio'))} | "
                f"{_verdicts(found, 'start', key)} |"
            )
        lines.append("")
    scale = summary.get("scale")
    if scale:
        lines += [
            "### Scale",
            "",
            f"{plan['scale_sessions']} sessions started at once in one fresh server (kallichore's",
            "daemon over TCP; jupyter_server for comparison, its kernels reached over the",
            "WebSocket with the TCP_QUICKACK client). CPU and RSS are the server process's own",
            f"(kernels excluded) over {plan['scale_idle_seconds']:.0f} s with every session idle",
            "and no client attached; then one session's round trips while the others sit idle,",
            f"{plan['scale_latency_rounds']} batches of {plan['scale_latency_per_batch']},",
            "interleaved with batches of the floor's kernel, which is the ratio's reference.",
            "The two servers run one after the other, so their latencies are compared by that",
            "ratio, not in milliseconds.",
            "",
            "| server | all ready s | idle CPU % of a core | RSS MB (empty -> "
            "with sessions) | latency p50 / p99 ms | p50 vs floor | target |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, entry in scale.items():
            idle = entry["idle"]
            verdict = _verdicts(found, "scale", "ws-tcp") if name == "kallichore" else "-"
            lines.append(
                f"| {name} | {entry['ready_seconds']:.1f} | "
                f"{idle['cpu_percent_of_one_core']:.2f} | "
                f"{entry['rss_mb_empty']:.0f} -> {idle['rss_mb_max']:.0f} | "
                f"{entry['latency']['p50_ms']:.2f} / {entry['latency']['p99_ms']:.2f} | "
                f"{_ratio(entry['latency'].get('ratio_p50'))} | {verdict} |"
            )
        lines.append("")
    agent = summary.get("agent")
    if agent:
        lines += [
            "### Agent API",
            "",
            f"{agent['callers']} callers at once over {agent['sessions']} sessions of one fresh",
            "daemon (TCP), each running `1` with `POST /sessions/{id}/execute` again and again",
            f"for {plan['agent_seconds']:g} s (the same client as `execute-tcp`, httpx). The",
            "one-call round trip itself is `execute-tcp` in the latency table; its target is",
            f"at most {EXECUTE_LATENCY_VS_CHANNELS:g}x the channels' (`ws-tcp`) p50.",
            "",
            "| callers | sessions | executions | per second | call p50 ms | call p99 ms |",
            "|---|---|---|---|---|---|",
            f"| {agent['callers']} | {agent['sessions']} | {agent['executions']:,} | "
            f"{agent['per_s']:.1f} | {agent['call_p50_ms']:.1f} | {agent['call_p99_ms']:.1f} |",
            "",
        ]
    lines += memory_section(summary, plan, found)
    lines += client_stacks(summary)
    failures = summary.get("failures")
    if failures:
        lines += [
            "### Failures",
            "",
            "Executions that failed (the connection is re-opened and the run goes on; failed",
            "runs are left out of the figures above):",
            "",
            "| configuration | failed executions | why |",
            "|---|---|---|",
        ]
        for key, entry in failures.items():
            why = "; ".join(f"`{r}`" for r in entry["reasons"])
            lines.append(f"| `{key}` | {entry['count']} | {why} |")
        lines.append("")
    lines += [
        "### Fan-out",
        "",
        "Not applicable yet: a session has one channels client at a time (Kallichore's",
        "semantics; a second client displaces the first).",
        "",
        "### Targets",
        "",
        f"{sum(t.met for t in found)} of {len(found)} met.",
        "",
        "| workload | configuration | what | value | limit | met |",
        "|---|---|---|---|---|---|",
    ]
    for t in found:
        lines.append(
            f"| {t.workload} | `{t.configuration}` | {t.what} | {t.value:.4g} | "
            f"{t.limit:.4g} | {'yes' if t.met else '**no**'} |"
        )
    lines.append("")
    return "\n".join(lines)


def memory_section(summary: dict[str, Any], plan: dict[str, Any], found: list[Target]) -> list[str]:
    memory = summary.get("memory")
    if not memory:
        return []
    lines = [
        "### Memory",
        "",
        "The daemon's RSS (kernels excluded), each API in a fresh daemon over TCP: empty",
        "(after one session was started, connected to and left, so that what the first of",
        f"anything costs is not spread), with {plan['memory_sessions']} idle sessions started",
        "at once, and with one client connected to each (each having run one round trip),",
        f"each taken after {plan['memory_settle_seconds']:g} s at rest. Per session and per",
        "client: the step over the count.",
        "",
        "| API | sessions | RSS MB empty | MB per idle session | MB per connected client |",
        "|---|---|---|---|---|",
    ]
    apis = {"kallichore": "Kallichore channels", "jupyter": "Jupyter kernels API, v1 channels"}
    rows = [(name, memory[api]) for api, name in apis.items() if api in memory]
    lines += [
        f"| {name} | {e['sessions']} | {e['rss_mb_empty']:.0f} | {e['mb_per_session']:.3f} | "
        f"{e['mb_per_client']:.3f} |"
        for name, e in rows
    ]
    lines.append("")
    burst = memory.get("burst")
    if burst:
        mib = burst["burst_bytes"] / 2**20
        chunk_kib = burst["chunk_bytes"] // 1024
        bound_mib = memory["event_log_mb"] * 1e6 / 2**20
        lines += [
            f"A burst: the kernel prints {mib:g} MiB to stdout in {chunk_kib} KiB flushes (one",
            "stream message each) to a Kallichore channels client that stops reading at the",
            "first of it (no queue of its own) and reads everything once the kernel has printed",
            f"it all; the session's event log is bounded at {bound_mib:g} MiB. *Peak* is the",
            "daemon's VmHWM (no sample missed), *when printed* its RSS once the kernel is done",
            "and before the client reads again, *after* once the client has read everything;",
            "*delivered* and *dropped* are what the client read and was told.",
            "",
            "| RSS MB before | peak | when printed | after | printing s | delivered MiB | "
            "events dropped | target |",
            "|---|---|---|---|---|---|---|---|",
            f"| {burst['rss_mb_before']:.0f} | {burst['rss_mb_peak']:.0f} | "
            f"{burst['rss_mb_when_printed']:.0f} | {burst['rss_mb_after']:.0f} | "
            f"{burst['printing_seconds']:.1f} | {burst['stream_bytes_delivered'] / 2**20:.1f} | "
            f"{burst['events_dropped']:,} | {_verdicts(found, 'memory', 'ws-tcp')} |",
            "",
        ]
    return lines


def client_stacks(summary: dict[str, Any]) -> list[str]:
    """Our daemon's channels through each client stack, side by side: the latency and
    throughput tables' figures for them, with the server's CPU and the failed executions."""
    latency = summary.get("latency", {})
    throughput = summary.get("throughput", {})
    failures = summary.get("failures", {})
    keys = [k for k in ["ws-tcp", "ws-unix", *CLIENT_STACKS] if k in latency or k in throughput]
    if not any(k in CLIENT_STACKS for k in keys):
        return []
    lines = [
        "### Client stacks",
        "",
        "Our daemon through each client (`ws-*`: ours), the figures of the tables above: the",
        "round trip's p50 and its ratio to the floor, the daemon's CPU per round trip, small",
        "messages and stream against the floor, the daemon's CPU per MB streamed, and the",
        "executions that failed (see Failures).",
        "",
        "| configuration | p50 ms | p50 vs floor | CPU ms / round trip | small msg/s vs floor "
        "| stream MB/s vs floor | CPU ms / MB | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        entry = latency.get(key)
        small = throughput.get("small_messages", {}).get(key, {})
        stream = throughput.get("stream", {}).get(key, {})
        round_trip = (
            f"{entry['p50_ms']:.2f} | {_ratio(entry.get('ratio_p50'))} | "
            f"{_server_cpu_per_round_trip(entry)}"
            if entry
            else "- | - | -"
        )
        lines.append(
            f"| `{key}` | {round_trip} | {_ratio(small.get('ratio_msg_per_s'))} | "
            f"{_ratio(stream.get('ratio_mb_per_s'))} | {_cpu(stream.get('server_cpu'), 1)} | "
            f"{failures.get(key, {}).get('count', 0)} |"
        )
    lines.append("")
    return lines


# -- charts -----------------------------------------------------------------------------------

COLOURS = {
    "floor": "#555555",
    "floor-2": "#aaaaaa",
    "embedded": "#08519c",
    "ws-tcp": "#3182bd",
    "ws-unix": "#6baed6",
    "kg": "#e6550d",
    "kg-quickack": "#e6550d",
    "server": "#756bb1",
    "server-quickack": "#756bb1",
    "jupyter-v1": "#31a354",
    "kg-v1": "#fd8d3c",
    "server-v1": "#9e9ac8",
    "execute-tcp": "#74c476",
    "websockets-sync-tcp": "#de2d26",
    "websockets-asyncio-tcp": "#fb6a4a",
    "node-ws-tcp": "#54278f",
    "websockets-sync-unix": "#fc9272",
    "websockets-asyncio-unix": "#fcbba1",
    "node-ws-unix": "#9e9ac8",
}
# The gateways as they come: dashed; with the client's TCP_QUICKACK: solid.
STYLES = {"kg": "--", "server": "--"}


def charts(document: dict[str, Any], directory: Path, prefix: str) -> dict[str, str]:
    """PNG charts next to the Markdown; returns their file names (empty without matplotlib)."""
    try:  # optional: only the charts need it
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return {}
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    raw, summary = document["raw"], document["summary"]
    if "latency" in raw:
        figure, axes = plt.subplots(figsize=(10, 5))
        for key, rounds in raw["latency"].items():
            samples = sorted(x * 1e3 for b in rounds for x in b)
            fractions = [(i + 1) / len(samples) for i in range(len(samples))]
            axes.step(
                samples,
                fractions,
                where="post",
                label=key,
                color=COLOURS.get(key),
                linestyle=STYLES.get(key, "-"),
            )
        axes.set_xscale("log")
        ticker = importlib.import_module("matplotlib.ticker")
        axes.xaxis.set_major_locator(ticker.FixedLocator([1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 100]))
        axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axes.xaxis.set_minor_formatter(ticker.NullFormatter())
        axes.set_xlabel("round trip of execute('1') until reply and idle (ms, log scale)")
        axes.set_ylabel("fraction of round trips")
        axes.set_title("Latency distributions (same run, alternating configurations)")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        figure.tight_layout()
        name = f"{prefix}latency.png"
        figure.savefig(directory / name, dpi=110)
        plt.close(figure)
        written["latency"] = name
    if "throughput" in summary:
        workloads = [
            ("small_messages", "msg_per_s", "small display_data messages: msg/s"),
            ("stream", "mb_per_s", "stream output: MB/s"),
        ]
        figure, all_axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for axes, (workload, measure, title) in zip(all_axes, workloads, strict=True):
            entries = summary["throughput"].get(workload, {})
            keys = list(entries)
            medians = [entries[k][measure]["median"] for k in keys]
            low = [entries[k][measure]["median"] - entries[k][measure]["p25"] for k in keys]
            high = [entries[k][measure]["p75"] - entries[k][measure]["median"] for k in keys]
            positions = list(range(len(keys)))
            bars = axes.barh(
                positions,
                medians,
                xerr=[low, high],
                color=[COLOURS.get(k, "#999999") for k in keys],
                capsize=3,
            )
            for bar, key in zip(bars, keys, strict=True):
                if key in STYLES:
                    bar.set_hatch("//")
                    bar.set_alpha(0.6)
            axes.set_yticks(positions, keys)
            axes.invert_yaxis()
            axes.set_title(title)
            axes.grid(True, axis="x", alpha=0.3)
        figure.suptitle("Throughput (median, IQR whiskers)")
        figure.tight_layout()
        name = f"{prefix}throughput.png"
        figure.savefig(directory / name, dpi=110)
        plt.close(figure)
        written["throughput"] = name
    return written
