"""Execute a notebook with nbclient through jupyter_server's GatewayKernelManager, the way
nbclient-based tools run notebooks on a kernel gateway (its URL from JUPYTER_GATEWAY_URL).

Run by test_nbclient.py with the servers' virtualenv's Python (nbclient and jupyter_server are
not in ours, hence no types for mypy): `python run_notebook.py IN OUT`.
"""

from __future__ import annotations

import sys

import nbformat  # type: ignore[import-not-found]
from jupyter_server.gateway.managers import GatewayKernelManager  # type: ignore[import-not-found]
from nbclient import NotebookClient  # type: ignore[import-not-found]


def main(source: str, target: str) -> None:
    notebook = nbformat.read(source, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        kernel_manager_class=GatewayKernelManager,
        # The error cell is part of the test: record it and go on.
        allow_errors=True,
        timeout=60,
    )
    client.execute()
    nbformat.write(notebook, target)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
