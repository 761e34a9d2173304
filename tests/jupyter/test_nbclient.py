"""nbclient, unchanged, executing a notebook on the server through jupyter_server's
GatewayKernelManager (tests/jupyter/run_notebook.py). Its kernel client opens the channels
WebSocket without a token, so the server runs with auth off."""

from __future__ import annotations

import base64
import json
import os
import random
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.jupyter.servers import Server, gateway_bin, kernel_server

pytestmark = pytest.mark.usefixtures("needs_channels")

RUN_NOTEBOOK = Path(__file__).resolve().parent / "run_notebook.py"
# A hang guard: the run takes a few seconds.
RUN_SECONDS = 180


@pytest.fixture(scope="module")
def server(server_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with kernel_server(server_kind, tmp_path_factory.mktemp("nbclient"), token=None) as running:
        yield running


def noise_png(width: int, height: int) -> bytes:
    """A valid RGB PNG of random pixels (so that it does not compress: about 3 bytes a pixel)."""
    noise = random.Random(11)
    rows = b"".join(b"\0" + noise.randbytes(3 * width) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def code_cell(source: str) -> dict[str, Any]:
    return {
        "cell_type": "code",
        "metadata": {},
        "source": source,
        "outputs": [],
        "execution_count": None,
    }


def joined(text: str | list[str]) -> str:
    """A multiline string as nbformat stores it (a list of lines) or as sent (one string)."""
    return "".join(text)


def test_nbclient_runs_a_notebook(server: Server, tmp_path: Path) -> None:
    png = noise_png(160, 120)
    (tmp_path / "noise.png").write_bytes(png)
    cells = [
        code_cell("print('hello from nbclient')"),
        code_cell(
            "from IPython.display import Image, display\n"
            f"display(Image(filename={str(tmp_path / 'noise.png')!r}))"
        ),
        code_cell("1 / 0"),
    ]
    notebook = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    source, target = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    source.write_text(json.dumps(notebook))
    done = subprocess.run(
        [str(gateway_bin() / "python"), str(RUN_NOTEBOOK), str(source), str(target)],
        env=dict(os.environ, JUPYTER_GATEWAY_URL=server.url),
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{server.log_text()}"
    stream, image, error = (cell["outputs"] for cell in json.loads(target.read_text())["cells"])
    assert [(o["output_type"], o["name"], joined(o["text"])) for o in stream] == [
        ("stream", "stdout", "hello from nbclient\n")
    ]
    assert [output["output_type"] for output in image] == ["display_data"]
    # Intact: the very bytes of the file, base64 as the kernel sent it.
    assert joined(image[0]["data"]["image/png"]) == base64.b64encode(png).decode()
    assert [(output["output_type"], output["ename"]) for output in error] == [
        ("error", "ZeroDivisionError")
    ]
    assert server.kernel_processes() == []
