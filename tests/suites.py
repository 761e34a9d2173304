"""What the fuzz, fault and load suites share: their budget and their pass criteria.

Each suite has a quick mode, run with the rest of the tests (and so in CI), and a full mode
(`nox -s fuzz`, `nox -s faults`, `nox -s load`), chosen by `KALLICHORE_SUITE=full`. The quick
mode tries every case with a few examples; the full one tries many.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, settings

FULL = os.environ.get("KALLICHORE_SUITE") == "full"


def budget(quick: int, full: int) -> int:
    """`full` under `KALLICHORE_SUITE=full`, else `quick`."""
    return full if FULL else quick


# Each example starts a server (and for some a kernel): the examples are few but not cheap,
# and the function-scoped fixtures they use are trio fixtures, set up anew for each example.
fuzz_settings = settings(
    max_examples=budget(12, 200),
    deadline=None,
    derandomize=not FULL,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


def tracebacks(log: str) -> list[str]:
    """The tracebacks in a daemon's log, each from its first line."""
    return log.split("Traceback (most recent call last)")[1:]


def assert_no_traceback(log: Path) -> None:
    found = tracebacks(log.read_text(errors="replace"))
    assert not found, f"{len(found)} traceback(s) in the log; the first:\n{found[0][:3000]}"


def assert_no_logged_exception(records: Iterable[Any]) -> None:
    """No log record carries an exception: what the in-process server logs for a crash."""
    crashed = [r for r in records if r.exc_info]
    assert not crashed, f"logged with a traceback: {crashed[0].getMessage()}"


def is_server_crash(status: int, body: Any) -> bool:
    """A 5xx other than the 500 with a `KS-` error object that Kallichore's API documents
    for a failed start, restart or adopt (which a client can act on, unlike an HTML page), and
    the 503 of `/health` for a kernel that is not alive."""
    if status < 500:
        return False
    if status == 503 and isinstance(body, dict) and body.get("status") == "unhealthy":
        return False
    # Start and restart wrap the error object (`{"error": {...}}`); adopt sends it bare.
    error = body.get("error", body) if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return not (status == 500 and isinstance(code, str) and code.startswith("KS-"))


# -- what /proc says of a process (the daemon's own view of itself could be wrong) -----------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return int(_status_field(pid, "Threads"))


def rss_mib(pid: int) -> float:
    """Resident set size, from /proc/<pid>/status (VmRSS, in KiB)."""
    return int(_status_field(pid, "VmRSS").split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise KeyError(name)


async def refusal_status(http: httpx.AsyncClient, method: str, path: str, body: bytes) -> int:
    """Send `body` as JSON, whatever it holds; its status, once checked not to be a crash."""
    response = await http.request(
        method, path, content=body, headers={"Content-Type": "application/json"}
    )
    try:
        answer = response.json()
    except ValueError:
        answer = None
    assert not is_server_crash(response.status_code, answer), (
        f"{response.status_code} {response.text[:300]}"
    )
    return response.status_code
