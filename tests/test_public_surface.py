"""`kallichore` exports exactly what the README documents, and the layers import downwards."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import kallichore

ROOT = Path(__file__).parent.parent


def test_the_package_exports_exactly_what_the_readme_names() -> None:
    embedding = (ROOT / "README.md").read_text().split("## Embedding", 1)[1].split("\n## ", 1)[0]
    exports = embedding.split("which exports exactly these names:", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`(\w+)`", exports))
    assert named == set(kallichore.__all__)
    for name in named:
        assert getattr(kallichore, name) is not None


def imports_of(package: str) -> dict[str, set[str]]:
    """The modules each file of `package` imports, by file name."""
    found: dict[str, set[str]] = {}
    for source in sorted((ROOT / package.replace(".", "/")).glob("*.py")):
        names = found.setdefault(source.name, set())
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(node.module or "")
    return found


@pytest.mark.parametrize("module", ["state.py", "record.py"])
def test_the_session_state_machine_and_records_do_no_io(module: str) -> None:
    [imported] = [
        names for name, names in imports_of("kallichore.session").items() if name == module
    ]
    assert not {m for m in imported if m.split(".")[0] in ("trio", "zmq", "psutil", "os")}
    assert not {m for m in imported if m.startswith(("kallichore.api", "kallichore.server"))}


def test_the_channels_know_neither_routes_nor_the_daemon() -> None:
    for name, imported in imports_of("kallichore.channels").items():
        assert not {m for m in imported if m.startswith(("kallichore.api", "kallichore.server"))}, (
            name
        )


def test_the_api_layer_imports_neither_the_daemon_nor_zeromq() -> None:
    """The daemon gives the API what it needs (`ServerControl`); the API never reaches back."""
    forbidden = ("kallichore.server", "kallichore.cli", "zmq")
    imported = imports_of("kallichore.api")
    assert "app.py" in imported
    assert {
        name: sorted(m for m in modules if m.startswith(forbidden))
        for name, modules in imported.items()
        if any(m.startswith(forbidden) for m in modules)
    } == {}


def test_the_client_knows_only_the_api() -> None:
    """kallichore.client speaks HTTP and WebSocket to a server; it may use the protocol layer."""
    imported = imports_of("kallichore.client")
    assert "client.py" in imported
    ours = {m for names in imported.values() for m in names if m.startswith("kallichore.")}
    assert {m for m in ours if not m.startswith(("kallichore.client", "kallichore.jupyter"))} == (
        set()
    )
