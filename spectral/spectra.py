"""Singular values of a weight matrix, computed once in float64 by the fastest route that is accurate enough.

Route (RMT.md §8): the eigenvalues of the M×M Gram matrix (M = the short side) in float64, then s = sqrt(λ_Gram).
The Gram route costs about M²N + M³ flops against about 4M²N for a bidiagonal SVD, and its absolute error on each
s_i² is about M·ε·s_1² (ε = 2.2e-16), so s_i is accurate to a relative 1e-6 while s_i/s_1 > 1e-5. When the smallest
singular value falls below that ratio (near-singular matrices, the left tail), the exact SVD is used instead.

Memory: the Gram matrix is summed from slices of W converted to float64 one at a time (GRAM_BLOCK_BYTES each), so
W is never copied whole: the peak beside W itself is the M×M Gram matrix, one slice, and (above
TRIDIAGONAL_MAX_SIDE, torch's eigensolver) its copy of the Gram matrix; the tridiagonal route reduces it in place.
Products of exact float64 conversions, summed in float64: the same arithmetic as one W·Wᵀ, in another order.

Eigenvalues (2026-12-01): up to TRIDIAGONAL_MAX_SIDE by LAPACK's dsytrd + dsterf from scipy's OpenBLAS
(spectral/tridiagonal.py), the two steps dsyevd takes without vectors, which on this machine ran 1.2-1.8x faster than
torch's MKL `eigvalsh`; the reduction can be kept for the top singular vectors a comparison needs.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from spectral import syrk, tridiagonal
from spectral.tridiagonal import Tridiagonal
from spectral.threads import run_single_threaded, threads_in_this_thread

GRAM_SAFE_RATIO = 1e-5  # below this s_min/s_max the Gram route loses digits: fall back to the SVD
GRAM_BLOCK_BYTES = 32 << 20  # float64 bytes of W converted at a time while the Gram matrix is summed
SYRK_SPLIT_BYTES = 256 << 20  # partial sums and slices a Gram split over threads may add (M ≤ 5,500 on two)
PROGRESS_SECONDS = 1.0  # on big matrices, `progress` is called at least this often (when the work allows)
EIG_WORK = 4.0  # the eigensolver's cost in units of one Gram multiply-add per M³ (measured: dsyevd ≈ 3.7 M³)
EIG_BESIDE_MIN = 1024  # from this short side up, the eigensolver runs in its own thread (progress keeps moving);
# below, one thread solves it in under ~0.2 s
# OpenMP and MKL threads of the eigensolver. LAPACK's tridiagonal reduction is memory-bound and synchronises its
# threads at every step: on the 2-core machine one thread took 2.2 s for M = 4096 where torch's two took 9.2 s, and
# 16 ms for M = 512 where two took 6.8 s (other work running: a waiting thread spins through the other's time slices).
EIG_THREADS = 1
# Up to this side, eigenvalues by scipy's dsytrd + dsterf (spectral/tridiagonal.py), above it by torch's eigvalsh:
# measured on the 2-core AMD EPYC machine on one thread (two at once alike), 27 against 47 ms at M = 768, 60 against
# 103 ms at 1024, 0.46 against 0.54 s at 2048, even at 2560, 1.9 against 1.6 s at 3072 (torch's MKL wins only there)
TRIDIAGONAL_MAX_SIDE = 2048

T = TypeVar("T")

Progress = Callable[[float], None]  # the fraction of this matrix's work done, 0 to 1


def singular_values(matrix: torch.Tensor, method: str = "auto", progress: Progress | None = None, *,
                    minus: torch.Tensor | None = None) -> np.ndarray:
    """Singular values of a 2-D tensor (of `matrix − minus` when given), descending, float64. method: "auto"
    (Gram, SVD fallback), "gram" or "svd".

    `progress(fraction)` is called as the work advances: after Gram slices, and while the eigensolver runs (its
    fraction then estimated from how long the Gram product took, capped below the end), then with 1.0.
    A difference is formed a slice at a time in float64 (the difference of two stored 16- or 32-bit floats is exact
    there unless their exponents are ~30 binades apart): the same element-wise arithmetic as subtracting whole
    float64 copies, without them."""
    return _singular_values(matrix, method, progress, minus, keep=False)[0]


def singular_values_and_reduction(matrix: torch.Tensor, progress: Progress | None = None
                                  ) -> tuple[np.ndarray, Tridiagonal | None]:
    """`singular_values(matrix)` and, where the eigenvalues come from the tridiagonal route (short side up to
    TRIDIAGONAL_MAX_SIDE), the Gram matrix's reduction (spectral/tridiagonal.py), so the short side's top singular
    vectors cost O(M²k) more: `reduction.top_eigenvectors(k)`. The values are bitwise those of `singular_values`;
    where they come from its SVD fallback (a near-singular matrix) the reduction is still returned, its top
    eigenvectors being accurate either way. None in place of the reduction on the other routes."""
    return _singular_values(matrix, "auto", progress, None, keep=True)


def _singular_values(matrix: torch.Tensor, method: str, progress: Progress | None, minus: torch.Tensor | None, *,
                     keep: bool) -> tuple[np.ndarray, Tridiagonal | None]:
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    if method not in ("auto", "gram", "svd"):
        raise ValueError(f"unknown method {method!r}; use auto, gram or svd")
    if minus is not None and minus.shape != matrix.shape:
        raise ValueError(f"cannot subtract shape {tuple(minus.shape)} from {tuple(matrix.shape)}")
    w = matrix.detach()
    if w.device.type != "cpu":
        w = w.cpu()
    if minus is not None:
        minus = minus.detach().cpu()
    if method == "svd":
        s = torch.linalg.svdvals(_float64(w, minus)).numpy()
        if progress:
            progress(1.0)
        return s, None
    m, n = w.shape
    short, long = min(m, n), max(m, n)
    gram_work, eig_work = float(short) * short * long, EIG_WORK * float(short) ** 3
    total = gram_work + eig_work or 1.0
    report = _Reporter(progress)
    start = time.perf_counter()
    gram = _gram(w, lambda done: report(done * gram_work / total), minus)
    gram_seconds = time.perf_counter() - start
    expected = gram_seconds * eig_work / max(gram_work, 1.0)  # the eigensolver's time, predicted from the Gram's
    eig, reduction = _eigvalsh(gram, report if progress else None,
                               lambda elapsed: (gram_work + eig_work * _eased(elapsed / max(expected, 1e-9))) / total,
                               keep=keep)
    del gram
    s = np.sqrt(np.clip(eig[::-1], 0.0, None))
    if method == "auto" and s.size and s[0] > 0 and s[-1] < GRAM_SAFE_RATIO * s[0]:
        s = torch.linalg.svdvals(_float64(w, minus)).numpy()
    if progress:
        progress(1.0)
    return np.ascontiguousarray(s), reduction


def _eased(ratio: float) -> float:
    """The eigensolver's share done after `ratio` of its predicted time: linear to 0.8, then creeping towards 0.95
    (hyperbolically, so it still moves when the run is a hundred times slower than predicted): never the end."""
    if ratio <= 0.8:
        return ratio
    return 0.95 - 0.15 / (1.0 + (ratio - 0.8))


def _float64(w: torch.Tensor, minus: torch.Tensor | None) -> torch.Tensor:
    """W (or W − minus) as one float64 matrix, for the SVD route."""
    w64 = w.to(torch.float64)
    if minus is not None:
        w64 = (w64 - minus) if w64 is w else w64.sub_(minus)  # never write into the caller's float64 tensor
    return w64


def _gram(w: torch.Tensor, done: Callable[[float], None], minus: torch.Tensor | None = None) -> torch.Tensor:
    """W·Wᵀ (rows ≤ cols) or Wᵀ·W in float64 (of W − minus when given), summed over slices along the long side
    converted one at a time."""
    m, n = w.shape
    short, long = min(m, n), max(m, n)
    workers = _syrk_workers(short)
    slices = -(-long // max(1, GRAM_BLOCK_BYTES // (8 * short)))
    if workers and (workers == 1 or slices >= workers):  # fewer slices than threads: torch's product uses them all
        return _gram_syrk(w, done, minus, workers)
    if minus is None and (w.dtype == torch.float64 or short * long * 8 <= GRAM_BLOCK_BYTES):  # whole: no copy, or
        w64 = w.to(torch.float64)  # a small one
        gram = w64 @ w64.T if m <= n else w64.T @ w64
        done(1.0)
        return gram
    step = max(1, GRAM_BLOCK_BYTES // (8 * short))
    gram = torch.zeros(short, short, dtype=torch.float64)
    for begin in range(0, long, step):
        block = _slice64(w, minus, begin, step)
        if m <= n:
            gram.addmm_(block, block.T)  # block (M, b)
        else:
            gram.addmm_(block.T, block)  # block (b, M)
        done(min(begin + step, long) / long)
    return gram


def _slice64(w: torch.Tensor, minus: torch.Tensor | None, begin: int, step: int) -> torch.Tensor:
    """Columns (rows ≤ cols) or rows [begin, begin + step) of W (minus `minus`) in float64: one Gram slice."""
    wide = w.shape[0] <= w.shape[1]
    part = w[:, begin:begin + step] if wide else w[begin:begin + step]
    block = part.to(torch.float64, copy=minus is not None)
    if minus is not None:
        block.sub_(minus[:, begin:begin + step] if wide else minus[begin:begin + step])
    return block


def _syrk_workers(short: int) -> int:
    """How many threads sum a Gram matrix of side `short` by BLAS dsyrk (spectral/syrk.py; half the multiply-adds
    of a general product, one thread per call): this thread's torch thread count, each extra one holding an M × M
    partial sum, within SYRK_SPLIT_BYTES; 0 where scipy's dsyrk is missing or the partial sums would not fit (then
    torch's multi-threaded product)."""
    threads = torch.get_num_threads()
    extra = (threads - 1) * (short * short * 8 + GRAM_BLOCK_BYTES)  # a partial sum and a slice per extra thread
    if not syrk.available() or (threads > 1 and extra > SYRK_SPLIT_BYTES):
        return 0
    return threads


def _gram_syrk(w: torch.Tensor, done: Callable[[float], None], minus: torch.Tensor | None, workers: int
               ) -> torch.Tensor:
    """`_gram` by BLAS dsyrk: the same slices, each added in place to a lower triangle; with several workers, worker
    j sums slices j, j + workers, ... into its own partial sum, and the partial sums are added in order (the result
    does not depend on which thread finished first). The upper triangle is mirrored from the lower one."""
    m, n = w.shape
    short, long = min(m, n), max(m, n)
    step = max(1, GRAM_BLOCK_BYTES // (8 * short))
    starts = list(range(0, long, step))
    workers = max(1, min(workers, len(starts)))
    grams = [np.zeros((short, short)) for _ in range(workers)]
    finished = [0] * workers  # slices summed by each worker (each written by its worker only)

    def add(j: int) -> None:
        for begin in starts[j::workers]:
            syrk.add_gram(grams[j], _slice64(w, minus, begin, step).numpy(), rows=m <= n)
            finished[j] += 1
            if workers == 1:
                done(min(begin + step, long) / long)

    if workers == 1:
        add(0)
    else:
        run_single_threaded([lambda j=j: add(j) for j in range(workers)],
                            lambda: sum(finished) and done(sum(finished) / len(starts)), PROGRESS_SECONDS / 2)
        done(1.0)
    gram = grams[0]
    for partial in grams[1:]:
        gram += partial
    syrk.mirror_lower(gram)
    return torch.from_numpy(gram)


def gram_eigh(matrix: torch.Tensor, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ascending eigenvalues, eigenvectors as columns) of the M×M Gram matrix of a 2-D tensor (M the short side),
    float64, by the same sliced Gram and the same eigensolver thread policy as `singular_values`: the short side's
    singular vectors of W (spectral/factors.py)."""
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    w = matrix.detach().cpu()
    m, n = w.shape
    short, long = min(m, n), max(m, n)
    gram_work, eig_work = float(short) * short * long, 2 * EIG_WORK * float(short) ** 3
    total = gram_work + eig_work or 1.0
    report = _Reporter(progress)
    start = time.perf_counter()
    gram = _gram(w, lambda done: report(done * gram_work / total))
    expected = (time.perf_counter() - start) * eig_work / max(gram_work, 1.0)
    values, vectors = _eigh(gram, report if progress else None,
                            lambda elapsed: (gram_work + eig_work * _eased(elapsed / max(expected, 1e-9))) / total,
                            vectors=True)
    if progress:
        progress(1.0)
    return values, vectors


def _eigvalsh(gram: torch.Tensor, report: Callable[[float], None] | None, fraction: Callable[[float], float], *,
              keep: bool = False) -> tuple[np.ndarray, Tridiagonal | None]:
    """Ascending eigenvalues of the symmetric Gram matrix, which may be overwritten: up to TRIDIAGONAL_MAX_SIDE by
    the tridiagonal route (spectral/tridiagonal.py; with `keep`, the reduction is returned too), above it by torch's
    `eigvalsh` (see `_eigh`)."""
    if gram.shape[0] <= TRIDIAGONAL_MAX_SIDE and tridiagonal.available():
        def solve() -> tuple[np.ndarray, Tridiagonal]:
            reduction = tridiagonal.tridiagonalize(gram.numpy())
            return reduction.eigenvalues, reduction

        values, reduction = _beside(solve, gram.shape[0], "tridiagonal", report, fraction)
        return values, (reduction if keep else None)
    return _eigh(gram, report, fraction, vectors=False)[0].numpy(), None


def _eigh(gram: torch.Tensor, report: Callable[[float], None] | None, fraction: Callable[[float], float], *,
          vectors: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ascending eigenvalues (and eigenvectors when asked) of the symmetric Gram matrix, which may be overwritten,
    beside the calling thread when large (`_beside`): with vectors and up to TRIDIAGONAL_MAX_SIDE by LAPACK's dsyevd
    from scipy's OpenBLAS (spectral/tridiagonal.py; 20-26% faster than torch's up to 1,536 on this machine), else by
    torch with EIG_THREADS OpenMP and MKL threads (limits set in a thread bind that thread only)."""
    def solve() -> tuple[torch.Tensor, torch.Tensor | None]:
        if vectors and gram.shape[0] <= TRIDIAGONAL_MAX_SIDE and tridiagonal.available():
            values, found = tridiagonal.eigh(gram.numpy())
            return torch.from_numpy(values), torch.from_numpy(found)
        with threads_in_this_thread(EIG_THREADS):
            return tuple(torch.linalg.eigh(gram)) if vectors else (torch.linalg.eigvalsh(gram), None)

    return _beside(solve, gram.shape[0], "eigh" if vectors else "eigvalsh", report, fraction)


def _beside(solve: Callable[[], T], side: int, name: str, report: Callable[[float], None] | None,
            fraction: Callable[[float], float]) -> T:
    """`solve()`; from EIG_BESIDE_MIN up, in a thread of its own (LAPACK runs without the GIL) while this thread
    keeps `report` moving with `fraction(elapsed)`, since LAPACK reports nothing while it works; below it the solver
    takes well under a second and runs here."""
    if side < EIG_BESIDE_MIN:
        return solve()
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["values"] = solve()
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread, raised there
            result["error"] = error

    # a fresh thread each time: measured, long-lived solver threads left this process's later forward passes ~10%
    # slower (bench/bench_whatif.py), and a thread's start-up (~20 ms) is small beside a solver this size
    worker = threading.Thread(target=work, name=name, daemon=True)
    start = time.perf_counter()
    worker.start()
    while worker.is_alive():
        worker.join(PROGRESS_SECONDS)
        if worker.is_alive() and report is not None:
            report(fraction(time.perf_counter() - start), force=True)
    if "error" in result:
        raise result["error"]
    return result["values"]


class _Reporter:
    """Calls `progress` with a fraction, at most every PROGRESS_SECONDS / 2 unless forced, never going backwards."""

    def __init__(self, progress: Progress | None):
        self.progress, self.last_call, self.last_value = progress, 0.0, -1.0

    def __call__(self, fraction: float, force: bool = False) -> None:
        if self.progress is None or fraction <= self.last_value:
            return
        now = time.perf_counter()
        if force or now - self.last_call >= PROGRESS_SECONDS / 2:
            self.progress(min(fraction, 1.0))
            self.last_call, self.last_value = now, fraction
