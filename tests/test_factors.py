"""spectral/factors.py and spectral/cache.py: truncations from the short side's singular vectors (against a float64
SVD), and the disk cache that lets a reopened checkpoint skip them."""
from __future__ import annotations

import pytest
import torch

from spectral.cache import DiskCache, default_cache
from spectral.factors import HeldComponents, truncation_factors


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


@pytest.mark.parametrize("shape", [(120, 40), (40, 120)])
def test_held_components_equal_fresh_ones_and_compute_only_what_is_new(shape):
    """A run of slider-like ranges: every answer equals `Factors.components` (one fresh product), only components
    not held before are multiplied out, and the range held stays within the limit (or the range asked for)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(*shape, generator=g)
    f = truncation_factors(w)
    held = HeldComponents(f, w)
    computed = []
    product = held._product
    held._product = lambda lo, hi: computed.append(hi - lo) or product(lo, hi)
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
