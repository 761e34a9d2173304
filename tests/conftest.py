"""Shared fixtures: an isolated home for kernels, a supervisor, and an ipykernel session spec."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kallichore.session.model import InterruptMode, SessionConfig, SessionSpec
from kallichore.supervisor import Supervisor, SupervisorConfig, open_supervisor

IPYKERNEL_ARGV = (sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}")


@pytest.fixture(autouse=True, scope="session")
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Kernels and Jupyter write history and runtime files under HOME: keep them in a temp dir."""
    home = tmp_path_factory.mktemp("home")
    saved = {
        k: os.environ.get(k)
        for k in ("HOME", "IPYTHONDIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "MPLBACKEND")
    }
    os.environ.update(
        HOME=str(home),
        IPYTHONDIR=str(home / ".ipython"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTER_DATA_DIR=str(home / "data"),
        MPLBACKEND="agg",
    )
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def ipykernel_spec(session_id: str = "python-test", **changes: object) -> SessionSpec:
    fields: dict[str, object] = {
        "session_id": session_id,
        "argv": IPYKERNEL_ARGV,
        "display_name": "Python (test)",
        "language": "python",
        "username": "tester",
        "connection_timeout": 60.0,
        "interrupt_mode": InterruptMode.SIGNAL,
    }
    fields.update(changes)
    return SessionSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[Supervisor]:
    config = SupervisorConfig(
        runtime_dir=tmp_path / "runtime",
        session=SessionConfig(
            heartbeat_interval=0.2,
            unattended_heartbeat_interval=0.2,
            # A hang guard: a loaded machine must not make a kernel look offline. The tests of
            # heartbeat loss stop the kernel and use a short timeout of their own.
            heartbeat_timeout=30.0,
            shutdown_grace=5.0,
        ),
    )
    async with open_supervisor(config) as sup:
        yield sup
