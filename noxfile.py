"""Developer and CI tasks: `nox` runs the test suite, the linter and the type checker."""

import nox

# The benchmark runs in its quick mode with the rest, so that it cannot rot; `nox -s bench`
# is the full run.
nox.options.sessions = ["tests", "lint", "typecheck", "bench_smoke"]
# uv makes each session's virtualenv in seconds where venv + pip take a minute; venv when uv
# is not installed.
nox.options.default_venv_backend = "uv|venv"
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, against real ipykernel processes, in one process per core (a
    module's tests stay together, so the daemons they share are started once).

    tests/jupyter runs real Jupyter clients from the servers' virtualenv (built on first use
    under benchmarks/.cache and shared with bench_smoke) and from tests/js/node_modules (which
    `npm ci --prefix tests/js` installs: .ci/run does; with CI set, its absence fails).
    """
    session.install("-e", ".[test]")
    session.run("pytest", "--numprocesses=auto", "--dist=loadfile", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff's lint rules and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy in strict mode over the package, the tests, the examples and the benchmarks."""
    session.install("-e", ".[test]", "mypy", "nox")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """The full benchmark (about 10 minutes on 2 cores); not run by default or by CI.

    Writes benchmarks/results/<date>.json, docs/benchmarks.md and its charts. Arguments after
    `--` go to `python -m benchmarks` (see `--help`).
    """
    session.install("-e", ".[test]", "matplotlib")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def bench_smoke(session: nox.Session) -> None:
    """The benchmark's quick mode (about a minute): every workload and configuration a few
    times with tiny sizes, written to benchmarks/.cache/quick/ so it cannot rot."""
    session.install("-e", ".[test]", "matplotlib")
    session.run("python", "-m", "benchmarks", "--quick", *session.posargs)


# The suites of issue 10 run in their quick mode with `tests` (so in CI); these sessions run
# them in full. See docs/reliability.md for what each tries and what it found.
FULL_SUITE = {"KALLICHORE_SUITE": "full"}


@nox.session
def fuzz(session: nox.Session) -> None:
    """The fuzz suite in full (30 minutes or more): schemathesis over the daemon's /openapi.json
    with and without the token, hypothesis over JSON bodies, channels frames and a hostile
    kernel's ZeroMQ frames."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "fuzz", *session.posargs, env=FULL_SUITE)


@nox.session
def faults(session: nox.Session) -> None:
    """The fault suite in full (about 3 minutes): kernels killed and stopped, clients dropped
    mid-stream and by the thousand, a full disk under the log, and issue 10's findings."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "faults", *session.posargs, env=FULL_SUITE)


@nox.session
def load(session: nox.Session) -> None:
    """The load test (about 5 minutes; not in CI): 50 sessions executing at once, then 1,000
    API requests a second for 30 s; prints p50/p99, errors and the daemon's RSS and CPU."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "load", "-s", *session.posargs, env=FULL_SUITE)
