"""@jupyterlab/services, the library JupyterLab talks to kernels with, unchanged in Node against
the server: with the v1 subprotocol and without it (tests/js/services.test.mjs says what it
checks). Its packages come from `npm ci --prefix tests/js` (CI runs it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.jupyter.servers import Server, kernel_server

pytestmark = pytest.mark.usefixtures("needs_channels")

JS_DIR = Path(__file__).resolve().parent.parent / "js"
TOKEN = "services-token-0123456789"
# A hang guard: the whole script takes about ten seconds.
NODE_SECONDS = 300


@pytest.fixture(scope="module")
def server(server_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with kernel_server(server_kind, tmp_path_factory.mktemp("services"), TOKEN) as running:
        yield running


def node_or_skip() -> str:
    """Node, once `npm ci` has installed the script's packages; in CI their absence fails."""
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (JS_DIR / "node_modules" / "@jupyterlab" / "services").is_dir():
        missing = "tests/js/node_modules is missing: run `npm ci --prefix tests/js`"
    if missing is None:
        return str(node)
    if os.environ.get("CI"):
        pytest.fail(f"{missing} (CI must install it)")
    pytest.skip(missing)


def test_jupyterlab_services_drives_a_kernel(server: Server) -> None:
    node = node_or_skip()
    env = dict(os.environ, JUPYTER_SERVER_URL=server.url, JUPYTER_TOKEN=TOKEN)
    done = subprocess.run(
        [node, "--test", "--test-force-exit", "--test-reporter=spec", "services.test.mjs"],
        cwd=JS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_SECONDS,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    # The reporter's summary: every scenario of both protocols ran, none failed.
    assert re.search(r"^\S* ?pass 16$", done.stdout, re.MULTILINE), done.stdout
    assert server.kernel_processes() == []
