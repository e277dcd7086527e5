"""One deliberate thread setting for the process: torch gets the cores, numpy's BLAS gets one thread.

Two BLAS pools on two cores were seen 10-200x slower than one (DESIGN.md, "Threads"); bench/bench_analyze.py
measures the choice.
"""
from __future__ import annotations

import os

import torch

_configured = False


def configure_threads(n_threads: int | None = None) -> int:
    """Set torch's intra-op pool to the usable cores (once) and its inter-op pool to 1; returns the thread count."""
    global _configured
    if n_threads is None:
        n_threads = int(os.environ.get("SPECTRA_THREADS", 0)) or len(os.sched_getaffinity(0))
    if not _configured or torch.get_num_threads() != n_threads:
        torch.set_num_threads(n_threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or parallel work has started: harmless
            pass
        _configured = True
    return n_threads
