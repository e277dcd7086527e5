"""spectral/factors.py and spectral/cache.py: truncations from the short side's singular vectors (against a float64
SVD), and the disk cache that lets a reopened checkpoint skip them."""
from __future__ import annotations

import pytest
import torch

import spectral.factors
from spectral.cache import DiskCache, default_cache
from spectral.factors import TRIM_RATIO, Factors, HeldComponents, truncation_factors


def exact_truncation(w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (U[:, lo:hi] * S[lo:hi]) @ Vh[lo:hi]


@pytest.mark.parametrize("shape", [(60, 60), (90, 40), (40, 90)])
def test_components_from_the_short_side_equal_the_svd_truncation(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(0, -2, shape[1]))
    f = truncation_factors(w)
    assert f.left == (shape[0] <= shape[1]) and f.Q.shape == (min(shape), min(shape))
    torch.testing.assert_close(f.S.double(), torch.linalg.svdvals(w.double()), rtol=1e-6, atol=1e-7)
    for lo, hi in ((0, 5), (0, min(shape) // 2), (10, 20)):
        a, b = f.components(w, lo, hi)
        assert a.shape == (shape[0], hi - lo) and b.shape == (hi - lo, shape[1])
        exact = exact_truncation(w, lo, hi)
        assert float((a.double() @ b.double() - exact).norm() / exact.norm()) < 1e-5


def random_held(shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, Factors, HeldComponents]:
    """A Gaussian matrix, its factors, and components held over them (nothing held yet)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    f = truncation_factors(w)
    return w, f, HeldComponents(f, w)


def counting(held: HeldComponents) -> list[int]:
    """The widths of the products `held` computes from here on (appended as they happen)."""
    computed = []
    product = held._product
    held._product = lambda lo, hi: computed.append(hi - lo) or product(lo, hi)
    return computed


@pytest.mark.parametrize("shape", [(120, 40), (40, 120)])
def test_held_components_equal_fresh_ones_and_compute_only_what_is_new(shape):
    """A run of slider-like ranges: every answer equals `Factors.components` (one fresh product), only components
    not held before are multiplied out, and the range held stays within the limit (or the range asked for)."""
    w, f, held = random_held(shape, seed=2)
    computed = counting(held)
    limit = 30
    steps = [((0, 20), 20), ((0, 25), 5), ((0, 12), 0), ((0, 30), 5), ((5, 30), 0),  # grow, shrink: views
             ((28, 40), 10),  # the union [0, 40) is over the limit: [28, 40) is held, [28, 30) kept
             ((20, 40), 8), ((25, 35), 0),
             ((0, 40), 20)]  # over the limit but asked for: held, [20, 40) kept
    for (lo, hi), new in steps:
        computed.clear()
        a, b = held.components(lo, hi, limit)
        fa, fb = f.components(w, lo, hi)
        assert sum(computed) == new, (lo, hi, computed)
        torch.testing.assert_close(a, fa, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, fb, rtol=1e-6, atol=1e-6)
        assert held.hi - held.lo <= max(limit, hi - lo) and held.lo <= lo and hi <= held.hi
    assert held.nbytes == 40 * max(shape) * 4


def test_held_components_never_change_a_view_handed_out():
    """A view returned earlier keeps its values when the held range moves (a new tensor is made, never written in
    place): a cut held by the model from the previous move stays what it was."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(90, 30, generator=g)
    f = truncation_factors(w)
    held = HeldComponents(f, w)
    first, _ = held.components(0, 10, 30)
    before = first.clone()
    held.components(0, 25, 30)
    held.components(20, 30, 5)
    assert torch.equal(first, before)


@pytest.mark.parametrize("shape", [(2000, 40), (40, 2000)])
def test_a_much_smaller_request_trims_what_is_held_without_recomputing(shape, monkeypatch):
    """With the floor at 100 kB (12.5 components of 8 kB here): 40 components held, then 5 asked for, trims to 5
    by copying them (nothing computed), equal to a fresh product; views handed out before keep their values. Under
    the floor (12 components, 96 kB) or within TRIM_RATIO of the request (40 for 11) nothing is trimmed."""
    monkeypatch.setattr(spectral.factors, "TRIM_BYTES", 100_000)
    w, f, held = random_held(shape, seed=4)
    computed = counting(held)
    limit = 40
    component = max(shape) * 4

    def fresh(lo, hi):
        q = f.Q[:, lo:hi]
        return q.T @ w if f.left else w @ q

    def long_side(pair):
        return pair[1] if f.left else pair[0]

    big = long_side(held.components(0, 40, limit))
    before = big.clone()
    computed.clear()
    small = long_side(held.components(0, 5, limit))  # 40 > 4 · 5 and 320 kB > 100 kB: trimmed
    assert computed == [] and (held.lo, held.hi) == (0, 5) and held.nbytes == 5 * component
    torch.testing.assert_close(small, fresh(0, 5), rtol=1e-5, atol=1e-5)
    assert torch.equal(big, before)

    held.components(0, 12, limit)  # grows: only [5, 12) computed
    assert computed == [7] and held.nbytes == 12 * component
    ptr = held.values.data_ptr()
    held.components(0, 2, limit)  # 12 > 4 · 2 but 96 kB is under the floor: a view
    assert computed == [7] and held.values.data_ptr() == ptr and (held.lo, held.hi) == (0, 12)

    held.components(0, 40, limit)
    computed.clear()
    held.components(0, 11, limit)  # 40 ≤ 4 · 11: a view
    assert computed == [] and (held.lo, held.hi) == (0, 40)
    held.components(0, 8, limit)  # 40 > 4 · 8: trimmed
    held.components(0, 30, limit)  # grows: [8, 30) computed
    assert computed == [22] and (held.lo, held.hi) == (0, 30)
    moved = long_side(held.components(28, 34, limit))  # the union [0, 34) is over 4 · 6: [28, 34), [28, 30) kept
    assert computed == [22, 4] and (held.lo, held.hi) == (28, 34) and held.nbytes == 6 * component
    torch.testing.assert_close(moved, fresh(28, 34), rtol=1e-5, atol=1e-5)
    assert TRIM_RATIO == 4  # the ratios above are written for it


@pytest.mark.parametrize("shape", [(2000, 40), (40, 2000)])
def test_small_moves_around_a_held_cut_are_views_even_above_the_trim_floor(shape, monkeypatch):
    """Rank 30 -> 29 -> 31 -> 28 -> 30 -> 31 (as 100 -> 98 -> 102 on a real model), with the trim floor at 0: one new
    component computed (the 31st) and one reallocation (to hold it), every other move a view of the same tensor,
    and every answer a fresh product's."""
    monkeypatch.setattr(spectral.factors, "TRIM_BYTES", 0)
    w, f, held = random_held(shape, seed=5)
    held.components(0, 30, 40)
    computed = counting(held)
    tensors = set()
    for k in (29, 31, 28, 30, 31):
        a, b = held.components(0, k, 40)
        tensors.add(held.values.data_ptr())
        fa, fb = f.components(w, 0, k)
        torch.testing.assert_close(a, fa, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, fb, rtol=1e-6, atol=1e-6)
    assert computed == [1] and len(tensors) == 2 and (held.lo, held.hi) == (0, 31)


def test_ill_conditioned_matrices_take_the_svd_route():
    """s_min/s_max = 1e-6: the Gram's eigenvalues lose the tail (1e-12 relative), the SVD keeps it; the kept head
    is exact either way, to float32's resolution of W."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    w = ((q * torch.logspace(0, -6, 50, dtype=torch.float64)) @ q.T).float()
    f = truncation_factors(w)
    exact = torch.linalg.svdvals(w.double())
    torch.testing.assert_close(f.S.double()[-5:], exact[-5:], rtol=1e-4, atol=0)
    a, b = f.components(w, 0, 10)
    error = float((a.double() @ b.double() - exact_truncation(w, 0, 10)).norm() / w.double().norm())
    assert error < 1e-6


def test_disk_cache_round_trip_clear_and_a_corrupt_entry(tmp_path):
    cache = DiskCache(tmp_path / "cache")
    sha = "ab" * 32
    assert cache.load(sha, "blocks.0.w", "factors") is None
    tensors = {"S": torch.arange(3.0), "Q": torch.eye(3)}
    cache.save(sha, "blocks.0.w", "factors", tensors)
    back = cache.load(sha, "blocks.0.w", "factors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert cache.load(sha, "blocks.0.w", "spectrum") is None  # kinds do not collide
    cache.path(sha, "x", "factors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    assert cache.load(sha, "x", "factors") is None and not cache.path(sha, "x", "factors").exists()
    assert cache.size(sha) > 0 and cache.clear(sha) > 0 and cache.size() == 0
    with pytest.raises(ValueError):
        cache.path("../../etc", "x", "factors")


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "c"))
    assert default_cache().folder == tmp_path / "c"
    monkeypatch.setenv("SPECTRA_CACHE", "off")
    assert default_cache() is None
