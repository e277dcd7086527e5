"""spectral/tridiagonal.py against numpy's and scipy's own eigensolvers (independent LAPACK drivers)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.linalg

from spectral import tridiagonal
from spectral.tridiagonal import tridiagonalize

pytestmark = pytest.mark.skipif(not tridiagonal.available(), reason="scipy's LAPACK table lacks dsytrd/dsterf/dormtr")


def gram(rows: int, cols: int, seed: int = 0, spikes: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols))
    if spikes:  # well-separated top eigenvalues, as a trained matrix's signal
        u = np.linalg.qr(rng.standard_normal((rows, spikes)))[0]
        v = np.linalg.qr(rng.standard_normal((cols, spikes)))[0]
        w += u @ np.diag(np.linspace(3.0, 8.0, spikes) * np.sqrt(cols)) @ v.T
    return w @ w.T


@pytest.mark.parametrize("n", [1, 2, 3, 17, 200])
@pytest.mark.parametrize("order", ["C", "F"])
def test_eigenvalues_equal_numpys(n, order):
    a = gram(n, 2 * n + 1, seed=n)
    expected = np.linalg.eigvalsh(a)
    reduction = tridiagonalize(np.array(a, order=order))
    got = reduction.eigenvalues
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * expected[-1])
    assert np.all(np.diff(got) >= 0) and not got.flags.writeable


@pytest.mark.parametrize("k", [0, 1, 5, 30])
def test_top_eigenvectors_span_the_top_eigenspace(k):
    n = 120
    a = gram(n, 300, spikes=30)
    _, exact = scipy.linalg.eigh(a)  # ascending
    v = tridiagonalize(a.copy()).top_eigenvectors(k)
    assert v.shape == (n, k)
    if k == 0:
        return
    assert all(stride > 0 for stride in v.strides)  # torch.from_numpy takes it
    np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-12)
    # each column is the eigenvector of the matching eigenvalue, largest first (up to sign)
    np.testing.assert_allclose(np.abs(np.sum(v * exact[:, ::-1][:, :k], axis=0)), 1.0, atol=1e-10)
    np.testing.assert_allclose(a @ v, v * np.linalg.eigvalsh(a)[::-1][:k], atol=1e-9 * np.abs(a).max())


def test_a_split_tridiagonal_takes_the_mrrr_route():
    """A block-diagonal matrix reduces to a T that splits; the vectors are still the eigenvectors (dstemr)."""
    block = gram(20, 50, spikes=3)
    a = scipy.linalg.block_diag(block, 0.5 * block)
    reduction = tridiagonalize(a.copy())
    assert tridiagonal._splits(reduction.diagonal, reduction.off_diagonal)
    v = reduction.top_eigenvectors(4)
    values = np.linalg.eigvalsh(a)[::-1][:4]
    np.testing.assert_allclose(a @ v, v * values, atol=1e-9 * np.abs(a).max())


def test_the_reduction_is_in_place_and_refuses_what_it_cannot_reduce():
    a = gram(30, 60)
    before = a.copy()
    reduction = tridiagonalize(a)
    assert np.shares_memory(reduction.reflectors, a) and not np.array_equal(a, before)
    with pytest.raises(ValueError, match="square float64"):
        tridiagonalize(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="square float64"):
        tridiagonalize(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        tridiagonalize(np.zeros((6, 6))[::2, ::2])


def test_two_threads_reduce_at_once_and_agree():
    """The LAPACK calls hold no Python state: two threads reducing two matrices get what one thread gets."""
    mats = [gram(150, 300, seed=s) for s in (1, 2)]
    alone = [tridiagonalize(m.copy()).eigenvalues for m in mats]
    found: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        found[i] = tridiagonalize(mats[i].copy()).eigenvalues

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        np.testing.assert_array_equal(found[i], alone[i])


@pytest.mark.parametrize("n", [1, 2, 40, 300])
def test_eigh_is_numpys_decomposition(n):
    """dsyevd through ctypes: numpy's eigenvalues, orthonormal eigenvectors that diagonalise the matrix."""
    a = gram(n, 2 * n + 3, seed=n, spikes=min(n, 5))
    values, vectors = tridiagonal.eigh(np.array(a, order="C"))
    expected = np.linalg.eigvalsh(a)
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12 * expected[-1])
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(a @ vectors, vectors * values, atol=1e-10 * expected[-1])
