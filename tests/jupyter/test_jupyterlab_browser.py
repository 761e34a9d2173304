"""JupyterLab itself, in headless Chromium, with its kernels on the server: `jupyter lab
--gateway-url` at the server, driven through its menus by tests/jupyter/drive_lab.py (Selenium
from the servers' virtualenv, Debian's chromium and chromedriver). One browser session, one
JupyterLab: open a notebook, Run All (a print, a Markdown display, a long sleep), interrupt
from the Kernel menu, restart from the Kernel menu, run a cell again, shut the kernel down.

Needs `chromium` and `chromium-driver` (Debian packages; .ci/run installs them): without them
the test skips locally and fails in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.jupyter.servers import (
    KERNEL_NAME,
    Server,
    gateway_bin,
    jupyter_server,
    kernel_server,
)

DRIVE_LAB = Path(__file__).resolve().parent / "drive_lab.py"
BROWSER_FILES = ["/usr/bin/chromium", "/usr/bin/chromedriver"]
GATEWAY_TOKEN = "gateway-token-0123456789"
LAB_TOKEN = "lab-token-0123456789"
NOTEBOOK = "browser.ipynb"
# A hang guard: the whole drive takes seconds.
DRIVE_SECONDS = 240
CELLS = [
    "x = 6 * 7\nprint(x)",
    "from IPython.display import Markdown, display\n"
    "display(Markdown(f'**{x}** from *the kernel*'))",
    "import time\nprint('sleeping', flush=True)\ntime.sleep(600)",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(DRIVE_SECONDS + 120),
    pytest.mark.skipif(
        not all(Path(name).exists() for name in BROWSER_FILES) and not os.environ.get("CI"),
        reason="chromium and chromium-driver are not installed (apt-get install them)",
    ),
]


@pytest.fixture(scope="module")
def server_kind() -> str:
    """Our daemon: one browser session in all. (Kernel Gateway 3 was the reference while our
    channels were being written; behind JupyterLab its restart now and then never answers.)"""
    return "ours"


@pytest.fixture(scope="module")
def servers(
    server_kind: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    """The server under test and JupyterLab as its gateway client, started side by side, with
    the notebook in JupyterLab's root."""
    root = tmp_path_factory.mktemp("browser")
    write_notebook(root / NOTEBOOK)
    with (
        kernel_server(server_kind, root / "gateway", GATEWAY_TOKEN, wait=False) as gateway,
        jupyter_server(gateway, root, LAB_TOKEN, wait=False, lab=True) as lab,
    ):
        gateway.wait_ready()
        lab.wait_ready()
        yield gateway, lab


def write_notebook(path: Path) -> None:
    cells: list[dict[str, Any]] = [
        {
            "cell_type": "code",
            "metadata": {},
            "source": source,
            "outputs": [],
            "execution_count": None,
        }
        for source in CELLS
    ]
    metadata = {
        "kernelspec": {"name": KERNEL_NAME, "display_name": "Python 3", "language": "python"}
    }
    notebook = {"cells": cells, "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(notebook))


@pytest.fixture(scope="module")
def seen(servers: tuple[Server, Server]) -> dict[str, Any]:
    """What the user saw in the browser, step by step (drive_lab.py's account)."""
    _, lab = servers
    done = subprocess.run(
        [str(gateway_bin() / "python"), str(DRIVE_LAB), lab.url, LAB_TOKEN, NOTEBOOK],
        capture_output=True,
        text=True,
        timeout=DRIVE_SECONDS,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{lab.log_text()}"
    account: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    print(f"JupyterLab in the browser: {account}")
    return account


def test_run_all_renders_the_print_and_the_markdown(seen: dict[str, Any]) -> None:
    assert seen["print"] == "42"
    assert seen["markdown_html"].count("<strong>42</strong> from <em>the kernel</em>") == 1


def test_the_kernel_menu_interrupts_the_running_cell(seen: dict[str, Any]) -> None:
    assert seen["status_while_sleeping"] == "busy"
    assert "sleeping" in seen["interrupted"]
    assert "KeyboardInterrupt" in seen["interrupted"]


def test_the_kernel_menu_restarts_the_kernel(seen: dict[str, Any]) -> None:
    """The cell that read `x` fails after the restart: the new kernel never ran the first."""
    assert seen["back_after_restart"], seen.get("kernel_line_after_restart")
    assert "NameError" in seen["after_restart"]
    assert "name 'x' is not defined" in seen["after_restart"]


def test_no_kernel_is_left(seen: dict[str, Any], servers: tuple[Server, Server]) -> None:
    gateway, _ = servers
    assert seen["kernel_after_shutdown"].startswith("No Kernel")
    kernels = httpx.get(f"{gateway.url}/api/kernels", headers=gateway.headers, timeout=30)
    assert kernels.json() == []
    assert gateway.kernel_processes() == []
