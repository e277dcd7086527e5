"""Freed memory handed back to the operating system, so a long-lived server's resident size follows what it holds.

glibc keeps freed blocks for reuse: in the arena of the thread that freed them (worker threads have their own), and
in the middle of a heap where brk cannot shrink. After a batch of big temporary arrays (Gram matrices, float64
slices, a forward pass's activations) that memory stays resident although nothing uses it, and the next batch,
often in another thread, takes new memory beside it. `malloc_trim(0)` returns every arena's free pages (madvise),
at a cost of milliseconds. Elsewhere (musl, macOS) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the system (glibc's malloc_trim); False where there is no such call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
