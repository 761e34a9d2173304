"""Schemathesis hooks for the fuzz suite (`SCHEMATHESIS_HOOKS=tests.schemathesis_hooks`).

The check: a 5xx is a failure unless it is one of the error objects the API documents for it
(Kallichore answers a failed start, restart or adopt with a 500 and a `KS-` code; Positron
reads those). An HTML page, an empty body or an undocumented code is a crash.

The request hook keeps generated requests from doing what a token holder may legitimately do to
end the run early: turn idle shutdown on (the daemon then leaves 30 s later), or make the
daemon wait minutes for a kernel that will never connect. Absurd values (past any range) are
kept, since those must get a 400.
"""

from __future__ import annotations

from typing import Any

import schemathesis

from tests.suites import is_server_crash

# A connection timeout longer than this is cut to 1 s, unless it is absurd.
LONGEST_WAIT = 5
ABSURD = 10**9


@schemathesis.check
def no_undocumented_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    try:
        body = response.json()
    except ValueError:
        body = None
    if is_server_crash(response.status_code, body):
        raise AssertionError(f"{response.status_code} without a documented error object")
    return None


@schemathesis.hook
def before_call(ctx: Any, case: Any, kwargs: dict[str, Any]) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    body = dict(body)
    body.pop("idle_shutdown_hours", None)
    timeout = body.get("connection_timeout")
    if isinstance(timeout, int | float) and LONGEST_WAIT < timeout < ABSURD:
        body["connection_timeout"] = 1
    case.body = body
