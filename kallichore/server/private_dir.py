"""The directory of the sockets we name ourselves: fresh, ours alone (0700), removed at exit.

A socket bound directly in a shared directory such as /tmp can be squatted: another user
creates a file at its name first and our bind fails (`Address already in use`), or watches the
directory for names to guess. Inside a directory made fresh by `mkdtemp` (a new random name,
created exclusively, mode 0700) nobody else can create, remove or reach anything.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The longest name we give a socket inside the directory (`kc-<16 hex digits>.sock`).
LONGEST_SOCKET_NAME = len("kc-0123456789abcdef.sock")
# mkdtemp's random part.
RANDOM_CHARS = 8


def socket_base(explicit: Path | None, max_path_bytes: int) -> Path:
    """Where the private directory goes: `explicit`, else $XDG_RUNTIME_DIR (when our socket
    paths fit there in `max_path_bytes`), else the temp dir."""
    if explicit is not None:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        directory = f"kc-{os.getpid()}-" + "x" * RANDOM_CHARS
        longest = len(os.fsencode(Path(runtime, directory, "x" * LONGEST_SOCKET_NAME)))
        if longest <= max_path_bytes:
            return Path(runtime)
    return Path(tempfile.gettempdir())


@contextmanager
def private_socket_dir(base: Path) -> Iterator[Path]:
    """A new directory under `base` that only we can use, removed with all it holds at exit."""
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"kc-{os.getpid()}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
