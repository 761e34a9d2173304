"""Give the memory a burst of kernel output used back to the system once the burst is over.

glibc keeps what is freed for reuse: after a kernel printed a few hundred MiB faster than a
client read it, the daemon's RSS stayed hundreds of MiB above what it holds (the event log's
bound), long after the output was dropped or delivered. Its dynamic mmap threshold is why:
once a large block has been freed, blocks of that size come from the heap and are kept.
`malloc_trim` returns the free pages of every arena; elsewhere (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

# After this much output has been published, a session coming to rest trims (a trim costs
# about a millisecond, and the pages it returns must be faulted in again when reused).
TRIM_AFTER_BYTES = 64 * 2**20


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Return the allocator's free pages to the system (blocking: run it in a thread; ctypes
    releases the GIL for the call)."""
    if _TRIM is not None:
        _TRIM(0)
