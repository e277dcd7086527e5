"""Singular values by the Gram route agree with LAPACK's SVD, and the SVD fallback guards near-singular matrices."""
import itertools
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spectral import spectra, syrk
from spectral.threads import openmp_pools
from spectral.spectra import singular_values


@pytest.fixture(params=["syrk", "syrk on 3 threads", "torch"])
def route(request, monkeypatch):
    """The Gram matrix summed by BLAS dsyrk on one thread or split over three, or by torch's general product."""
    workers = {"syrk": 1, "syrk on 3 threads": 3, "torch": 0}[request.param]
    monkeypatch.setattr(spectra, "_syrk_workers", lambda short: workers)
    return request.param


@pytest.mark.parametrize("shape", [(300, 1200), (1200, 300), (400, 400)])
def test_gram_route_matches_svd_on_noise(shape, route):
    w = torch.from_numpy(np.random.default_rng(0).standard_normal(shape) * 0.02)
    exact = np.linalg.svd(w.numpy(), compute_uv=False)
    ours = singular_values(w, method="gram")
    assert ours.shape == (min(shape),)
    assert np.all(np.diff(ours) <= 0), "descending order"
    np.testing.assert_allclose(ours, exact, rtol=1e-9)


def test_float16_and_bfloat16_are_analysed_in_float64():
    w = torch.randn(64, 128, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        low = w.to(dtype)
        exact = np.linalg.svd(low.double().numpy(), compute_uv=False)
        np.testing.assert_allclose(singular_values(low), exact, rtol=1e-9)


def test_near_singular_matrix_falls_back_to_the_exact_svd():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((200, 100)))
    v, _ = np.linalg.qr(rng.standard_normal((100, 100)))
    s_true = np.logspace(0, -9, 100)  # s_min / s_max = 1e-9: the Gram route would lose these digits
    w = torch.from_numpy((u * s_true) @ v.T)
    np.testing.assert_allclose(singular_values(w), s_true, rtol=1e-5)
    gram = singular_values(w, method="gram")
    assert abs(gram[-1] - s_true[-1]) / s_true[-1] > 1e-3, "the Gram route is indeed inaccurate here"


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.ones(5))


@pytest.mark.parametrize("shape", [(96, 700), (700, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gram_summed_over_slices_matches_lapack(monkeypatch, shape, dtype, route):
    """The Gram matrix built slice by slice (here 10 columns or rows at a time) is the same arithmetic as W·Wᵀ."""
    monkeypatch.setattr(spectra, "GRAM_BLOCK_BYTES", 8 * 96 * 10)
    w = (torch.from_numpy(np.random.default_rng(2).standard_normal(shape)) * 0.02).to(dtype)
    exact = np.linalg.svd(w.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(singular_values(w, method="gram"), exact, rtol=1e-9)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_progress_rises_to_one_and_never_goes_back(monkeypatch, workers):
    """Every slice reported on one thread (torch's product or dsyrk); split over two, as the slices finish."""
    monkeypatch.setattr(spectra, "_syrk_workers", lambda short: workers)
    monkeypatch.setattr(spectra, "GRAM_BLOCK_BYTES", 8 * 64 * 16)
    monkeypatch.setattr(spectra, "PROGRESS_SECONDS", 0.0)  # report every slice
    seen = []
    singular_values(torch.randn(64, 1024), progress=seen.append)
    assert seen[-1] == 1.0 and len(seen) >= (64 if workers < 2 else 2)
    assert all(b > a for a, b in itertools.pairwise(seen)) and 0 < seen[0] < 1


@pytest.mark.parametrize("route", ["torch", "tridiagonal"])
def test_progress_keeps_moving_while_the_eigensolver_runs(monkeypatch, route):
    """LAPACK says nothing while it works: a big matrix's eigensolver runs beside a thread that keeps reporting."""
    monkeypatch.setattr(spectra, "EIG_BESIDE_MIN", 64)
    monkeypatch.setattr(spectra, "PROGRESS_SECONDS", 0.001)
    calls = []
    module, name = (torch.linalg, "eigvalsh") if route == "torch" else (spectra.tridiagonal, "tridiagonalize")
    real = getattr(module, name)
    if route == "torch":
        monkeypatch.setattr(spectra, "TRIDIAGONAL_MAX_SIDE", 0)

    def slow(gram):
        time.sleep(0.2)
        return real(gram)

    monkeypatch.setattr(module, name, slow)
    w = torch.randn(128, 256, dtype=torch.float64)
    s = singular_values(w, progress=lambda f: calls.append((time.perf_counter(), f)))
    np.testing.assert_allclose(s, np.linalg.svd(w.numpy(), compute_uv=False), rtol=1e-9)
    during = [f for _, f in calls if f < 1.0]
    assert len(during) >= 10, "reports kept coming while the eigensolver ran"
    assert all(b > a for a, b in itertools.pairwise(during)) and max(during) < 1.0 and calls[-1][1] == 1.0


@pytest.mark.parametrize("route", ["torch", "tridiagonal"])
def test_an_error_in_the_eigensolver_thread_reaches_the_caller(monkeypatch, route):
    monkeypatch.setattr(spectra, "EIG_BESIDE_MIN", 8)

    def broken(gram):
        raise RuntimeError("LAPACK failed")

    if route == "torch":
        monkeypatch.setattr(spectra, "TRIDIAGONAL_MAX_SIDE", 0)
        monkeypatch.setattr(torch.linalg, "eigvalsh", broken)
    else:
        monkeypatch.setattr(spectra.tridiagonal, "tridiagonalize", broken)
    with pytest.raises(RuntimeError, match="LAPACK failed"):
        singular_values(torch.randn(16, 32), progress=lambda f: None)


PEAK = """
import json, sys, torch
from spectral.spectra import singular_values
rows, cols = int(sys.argv[1]), int(sys.argv[2])
w = torch.empty(rows, cols).normal_(0, 0.02)  # float32
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
base = hwm()
s = singular_values(w, method="gram")
print(json.dumps({"base": base, "peak": hwm(), "top": float(s[0])}))
"""


@pytest.mark.slow
def test_peak_memory_is_the_gram_matrix_not_a_float64_copy_of_w():
    """A 1024 x 32768 float32 matrix (128 MiB): a float64 copy of W would add 256 MiB; summed slice by slice the
    Gram route adds its 8 MiB Gram matrix, the eigensolver's copy and one 32 MiB slice."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-c", PEAK, "1024", "32768"], capture_output=True, text=True, env=env,
                          check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = report["peak"] - report["base"]
    assert extra < 100 * 2 ** 20, f"{extra / 2 ** 20:.0f} MiB beyond W"


def test_the_eigensolver_runs_with_its_own_openmp_thread_count(monkeypatch):
    """torch's LAPACK (sides above TRIDIAGONAL_MAX_SIDE) runs limited to EIG_THREADS OpenMP threads; the caller's
    pool is left as it was."""
    monkeypatch.setattr(spectra, "TRIDIAGONAL_MAX_SIDE", 0)
    seen = []
    real = torch.linalg.eigvalsh

    def spy(gram):
        seen.append([lib["num_threads"] for lib in openmp_pools().info() if lib["user_api"] == "openmp"])
        return real(gram)

    monkeypatch.setattr(torch.linalg, "eigvalsh", spy)
    before = [lib["num_threads"] for lib in openmp_pools().info() if lib["user_api"] == "openmp"]
    singular_values(torch.randn(256, 512))
    assert seen and seen[0] and all(n == spectra.EIG_THREADS for n in seen[0])
    assert [lib["num_threads"] for lib in openmp_pools().info() if lib["user_api"] == "openmp"] == before


@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
def test_singular_values_of_a_difference_equal_the_svd_of_the_float64_difference(shape, monkeypatch, route):
    """`minus`: the difference formed a slice at a time (slices forced small here) is exact, so the spectrum is the
    float64 SVD's; an exactly low-rank difference takes the SVD fallback; the caller's tensors are untouched."""
    monkeypatch.setattr(spectra, "GRAM_BLOCK_BYTES", 8 * 40 * 7)  # 7 columns (or rows) a slice
    g = torch.Generator().manual_seed(3)
    a = torch.randn(*shape, generator=g)
    b = a + 1e-3 * torch.randn(*shape, generator=g)
    before_a, before_b = a.clone(), b.clone()
    expected = np.linalg.svd((b.double() - a.double()).numpy(), compute_uv=False)
    np.testing.assert_allclose(singular_values(b, minus=a), expected, rtol=1e-9, atol=1e-12 * expected[0])
    low = a + torch.outer(torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g))  # rank one
    exact = np.linalg.svd((low.double() - a.double()).numpy(), compute_uv=False)
    found = singular_values(low, minus=a)
    assert found[0] == pytest.approx(exact[0], rel=1e-12) and np.all(found[1:] < 1e-5 * exact[0])
    assert torch.equal(a, before_a) and torch.equal(b, before_b)
    a64 = a.double()
    singular_values(b.double(), minus=a64, method="svd")
    assert torch.equal(a64, before_a.double())
    with pytest.raises(ValueError, match="cannot subtract"):
        singular_values(b, minus=a.T)


@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_syrk_adds_each_slice_in_place_and_the_mirror_makes_it_symmetric(rows, dtype, monkeypatch):
    """spectral/syrk.py against numpy's products: two slices (one not C-contiguous) summed into the lower triangle,
    the upper one untouched until mirrored (in bands smaller than the matrix), then equal to A·Aᵀ."""
    monkeypatch.setattr(syrk, "MIRROR_BLOCK", 7)
    rng = np.random.default_rng(4)
    a = rng.standard_normal((30, 50) if rows else (50, 30)).astype(dtype)
    first, second = (a[:, :20], a[:, 20:]) if rows else (a[:20], a[20:])
    c = np.zeros((30, 30), dtype=dtype)
    syrk.add_gram(c, first, rows=rows)
    syrk.add_gram(c, np.asfortranarray(second), rows=rows)
    a64 = a.astype(np.float64)
    expected = a64 @ a64.T if rows else a64.T @ a64
    tol = 1e-13 if dtype == np.float64 else 1e-5
    assert np.all(np.triu(c, 1) == 0)
    np.testing.assert_allclose(np.tril(c), np.tril(expected), rtol=tol, atol=tol * 10)
    syrk.mirror_lower(c)
    np.testing.assert_allclose(c, expected, rtol=tol, atol=tol * 10)
    assert np.array_equal(c, c.T)
    with pytest.raises(ValueError):
        syrk.add_gram(c, a.T, rows=rows)  # the wrong side of the Gram matrix


def test_the_gram_matrix_is_split_over_the_threads_while_the_partial_sums_fit(monkeypatch):
    """dsyrk on one thread, split over two workers (each with its own partial sum, same result to rounding, the same
    bits on every run), and torch's product once the extra partial sum and slice would exceed SYRK_SPLIT_BYTES or
    there are fewer slices than threads."""
    monkeypatch.setattr(spectra, "GRAM_BLOCK_BYTES", 8 * 64 * 20)  # 20 columns a slice: 13 slices
    threads_seen = []
    real = syrk.add_gram
    monkeypatch.setattr(syrk, "add_gram", lambda *a, **k: threads_seen.append(threading.get_ident()) or real(*a, **k))
    w = torch.randn(64, 256, dtype=torch.float64)
    exact = np.linalg.svd(w.numpy(), compute_uv=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = singular_values(w)
        assert len(threads_seen) == 13 and len(set(threads_seen)) == 1
        threads_seen.clear()
        torch.set_num_threads(2)
        two = singular_values(w)
        assert len(threads_seen) == 13 and threading.get_ident() not in threads_seen  # in workers
        assert np.array_equal(two, singular_values(w))
        threads_seen.clear()
        singular_values(w[:, :20])  # one slice: torch's product on both threads
        assert not threads_seen
        monkeypatch.setattr(spectra, "SYRK_SPLIT_BYTES", 64 * 64 * 8 + 8 * 64 * 20 - 1)
        plain = singular_values(w)
        assert not threads_seen
    finally:
        torch.set_num_threads(threads)
    for found in (one, two, plain):
        np.testing.assert_allclose(found, exact, rtol=1e-10)


@pytest.mark.parametrize("route", ["torch", "tridiagonal"])
@pytest.mark.parametrize("shape", [(60, 150), (150, 60)])
def test_gram_eigh_is_the_short_sides_eigendecomposition(monkeypatch, route, shape):
    """The truncation factors' eigendecomposition, by LAPACK's dsyevd through ctypes or by torch (above
    TRIDIAGONAL_MAX_SIDE), beside the caller with progress: numpy's eigenvalues of the short side's Gram matrix,
    orthonormal eigenvectors that diagonalise it, and progress ending at 1.0."""
    if route == "torch":
        monkeypatch.setattr(spectra, "TRIDIAGONAL_MAX_SIDE", 0)
    monkeypatch.setattr(spectra, "EIG_BESIDE_MIN", 8)
    called = []
    real = spectra.tridiagonal.eigh
    monkeypatch.setattr(spectra.tridiagonal, "eigh", lambda a: called.append(a.shape) or real(a))
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = (w @ w.T if shape[0] <= shape[1] else w.T @ w).numpy()
    seen = []
    values, vectors = spectra.gram_eigh(w, progress=seen.append)
    np.testing.assert_allclose(values.numpy(), np.linalg.eigvalsh(g), rtol=0, atol=1e-11 * np.abs(g).max())
    v = vectors.numpy()
    np.testing.assert_allclose(v.T @ v, np.eye(60), atol=1e-12)
    np.testing.assert_allclose(g @ v, v * values.numpy(), atol=1e-10 * np.abs(g).max())
    assert bool(called) == (route == "tridiagonal") and seen[-1] == 1.0
