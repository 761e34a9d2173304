"""Developer and CI tasks: `nox` runs the test suite, the linter and the type checker."""

import nox

# The benchmark runs in its quick mode with the rest, so that it cannot rot; `nox -s bench`
# is the full run.
nox.options.sessions = ["tests", "lint", "typecheck", "bench_smoke"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, against real ipykernel processes."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


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
