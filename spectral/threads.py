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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from typing import TypeVar

import torch
from threadpoolctl import ThreadpoolController

T = TypeVar("T")
R = TypeVar("R")

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


_CONTROLLER: list[ThreadpoolController] = []
_CONTROLLER_LOCK = threading.Lock()


def openmp_pools() -> ThreadpoolController:
    """threadpoolctl's view of the loaded thread pools, found once (finding them scans the loaded libraries)."""
    with _CONTROLLER_LOCK:
        if not _CONTROLLER:
            _CONTROLLER.append(ThreadpoolController())
        return _CONTROLLER[0]


@contextlib.contextmanager
def threads_in_this_thread(n: int) -> Iterator[None]:
    """OpenMP (torch's element-wise loops, LAPACK) and MKL (torch's matmul) use `n` threads for work started from
    this thread, inside the block; other threads keep theirs (an OpenMP thread count is per thread, and MKL's is
    set with `mkl_threads_in_this_thread`). torch sets a thread's OpenMP and MKL counts to its process-wide count
    the first time that thread asks for its thread count (its lazy per-thread initialisation), which would undo a
    limit set before; asking first makes that happen here, before the limits."""
    torch.get_num_threads()
    with openmp_pools().limit(limits=n, user_api="openmp"), mkl_threads_in_this_thread(n):
        yield


def worker_count() -> int:
    """How many single-threaded workers batch work may run at once: torch's configured thread count."""
    return max(1, configure_threads())


def map_single_threaded(function: Callable[[T], R], items: Iterable[T], workers: int
                        ) -> Iterator[tuple[T, R | None, BaseException | None]]:
    """Apply `function` to every item in `workers` threads of one OpenMP/MKL thread each, yielding (item, result,
    None) or (item, None, the exception raised) in the calling thread as each finishes (the caller reports
    progress: Streamlit's widgets accept calls from the script's thread only). With one worker (or one item) the
    items run in the calling thread, on its own thread settings. A caller that stops early (an exception out of its
    loop) drops results not yet yielded and waits for the items already running; the rest are not started.

    Why: per matrix, half the work (LAPACK's tridiagonal reduction, the O(mn) passes) uses one core however many
    threads it is given; on two cores, two matrices at once, one thread each, took 2.9 s where one at a time on two
    threads took 4.4 s (the spectra of GPT-2 small's 50 matrices)."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            try:
                yield item, function(item), None
            except Exception as error:  # noqa: BLE001 - handed to the caller, like a worker's
                yield item, None, error
        return

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spectral", initializer=_one_thread_from_now
                            ) as pool:
        futures = {pool.submit(function, item): item for item in items}
        try:
            for future in as_completed(futures):  # O(1) a result: `wait` rescans every pending future each time
                error = future.exception()
                yield futures[future], (None if error is not None else future.result()), error
        finally:  # the caller stopped early or raised: drop what has not started
            for future in futures:
                future.cancel()


def run_single_threaded(tasks: list[Callable[[], None]], on_wait: Callable[[], None], wait_seconds: float) -> None:
    """Run each task in its own worker of one OpenMP/MKL thread (as `map_single_threaded`'s), calling `on_wait` in
    the calling thread every `wait_seconds` until all have finished (progress from a long split computation); the
    first error is raised there once all have stopped."""
    if len(tasks) <= 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="spectral", initializer=_one_thread_from_now
                            ) as pool:
        futures = [pool.submit(task) for task in tasks]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=wait_seconds)
            on_wait()
    for future in futures:
        if future.exception() is not None:
            raise future.exception()


_LIMITS = threading.local()


def _one_thread_from_now() -> None:
    """A pool worker's initializer: one OpenMP and one MKL thread for the rest of this thread's life, set once rather
    than around every item. The pool's threads end with it, so nothing is restored; torch's own per-thread
    initialisation runs first (see `threads_in_this_thread`)."""
    torch.get_num_threads()
    _LIMITS.openmp = openmp_pools().limit(limits=1, user_api="openmp")  # kept: the limiter lives with the thread
    function = _mkl_set_local()
    if function is not None:
        function(1)
