"""One deliberate thread setting per process: torch gets the cores, numpy/scipy's BLAS gets one thread.

Two BLAS pools on two cores were seen 10-200x slower than one (DESIGN.md, "Threads"), and with another process on
one of two cores, two torch threads made element-wise work 5-10x slower than one (bench/bench_whatif.py). So:
batch work (CLI, benchmarks) takes every core; the dashboard, which shares the machine with its own server and
often a browser, leaves one core free. `SPECTRA_THREADS=N` overrides both.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

import torch

_configured: int | None = None


def default_threads(interactive: bool = False) -> int:
    """SPECTRA_THREADS, else the usable cores (minus one for an interactive server, at least one)."""
    env = int(os.environ.get("SPECTRA_THREADS", "0") or 0)
    if env > 0:
        return env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1) if interactive else cores


def configure_threads(n_threads: int | None = None, *, interactive: bool = False) -> int:
    """Set torch's intra-op pool (inter-op to 1) and cap numpy's BLAS at one thread; the first call decides,
    later calls without an explicit count keep it. Returns torch's thread count."""
    global _configured
    if n_threads is None and _configured is not None:
        return _configured
    n_threads = n_threads or default_threads(interactive)
    torch.set_num_threads(n_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started: harmless
        pass
    try:  # numpy may have been imported before spectral (e.g. by Streamlit), so the env variable came too late
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
    except ImportError:
        pass
    _configured = n_threads
    return n_threads


_MKL_LOCAL: list = []  # [the C function, or None where torch carries no MKL], found once
_MKL_LOCK = threading.Lock()


def _mkl_set_local():
    """MKL's `MKL_Set_Num_Threads_Local` from the libtorch_cpu that torch loaded, or None.

    By hand because nothing else reaches it: torch exposes only the process-wide `set_num_threads`, and threadpoolctl
    cannot see an MKL linked statically into libtorch. (The lower-case `mkl_set_num_threads_local` export is the
    Fortran entry, which takes a pointer.)"""
    with _MKL_LOCK:
        if not _MKL_LOCAL:
            function = None
            try:
                lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
                function = lib.MKL_Set_Num_Threads_Local
                function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                function = None
            _MKL_LOCAL.append(function)
        return _MKL_LOCAL[0]


@contextlib.contextmanager
def mkl_threads_in_this_thread(n: int) -> Iterator[None]:
    """MKL uses `n` threads for calls made from this thread only, inside the block (a no-op without MKL).

    Why: torch's MKL thread count is process-wide, and MKL called from a second Python thread starts a second
    OpenMP team of that size. On the 2-core machine a 576 x 576 float64 `eigh` took 22 ms on the main thread, 70-90 ms
    on a worker thread with torch's two threads and 32 ms there with one (bench/bench_whatif.py measures the effect)."""
    function = _mkl_set_local()
    if function is None:
        yield
        return
    previous = function(n)
    try:
        yield
    finally:
        function(previous)
