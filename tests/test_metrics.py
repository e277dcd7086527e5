"""Per-matrix metrics (spectral/metrics.py) against RMT.md §9 T10 and hand computations."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from spectral import metrics

# RMT.md §9 T10: W = U diag(4, 3, 2, 1, 0.5) Vᵀ, shape 5×8.
T10_SINGULAR_VALUES = np.array([4.0, 3.0, 2.0, 1.0, 0.5])


@pytest.fixture(scope="module")
def t10_matrix():
    rng = np.random.default_rng(10)
    u = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    v = np.linalg.qr(rng.standard_normal((8, 5)))[0]
    return (u * T10_SINGULAR_VALUES) @ v.T


@pytest.fixture(scope="module")
def t10_s(t10_matrix):
    # Unsorted on purpose: every metric must sort internally.
    s = np.linalg.svd(t10_matrix, compute_uv=False)
    return s[[3, 0, 4, 2, 1]]


def test_t10_spectral_norm_is_largest_singular_value(t10_matrix, t10_s):
    assert metrics.spectral_norm(t10_s) == pytest.approx(4.0, abs=1e-12)
    assert metrics.spectral_norm(t10_s) == pytest.approx(np.linalg.norm(t10_matrix, 2), rel=1e-12)


def test_t10_frobenius_norm(t10_matrix, t10_s):
    assert metrics.frobenius_norm(t10_s) == pytest.approx(5.5, abs=1e-12)
    assert metrics.frobenius_norm(t10_s) == pytest.approx(np.linalg.norm(t10_matrix, "fro"), rel=1e-12)


def test_t10_cumulative_energy(t10_s):
    expected = [0.528926, 0.826446, 0.958678, 0.991736, 1.0]
    np.testing.assert_allclose(metrics.cumulative_energy(t10_s), expected, atol=1e-6)
    assert metrics.cumulative_energy(t10_s)[-1] == 1.0


@pytest.mark.parametrize("p, rank", [(0.5, 1), (0.9, 3), (0.99, 4), (0.999, 5), (1.0, 5)])
def test_t10_energy_rank(t10_s, p, rank):
    # 0.5, 0.9, 0.99 from T10; 0.999 and 1.0 by hand (C_4 = 30/30.25 = 0.9917 < 0.999).
    assert metrics.energy_rank(t10_s, p) == rank


def test_t10_utilization_is_energy_rank_over_short_side(t10_s):
    assert metrics.utilization(t10_s, 0.9) == pytest.approx(3 / 5)
    assert metrics.utilization(t10_s) == pytest.approx(5 / 5)


def test_t10_participation_ratio(t10_s):
    assert metrics.participation_ratio(t10_s) == pytest.approx(2.584466, abs=1e-6)


def test_t10_stable_rank(t10_s):
    assert metrics.stable_rank(t10_s) == pytest.approx(1.890625, abs=1e-9)


def test_t10_roy_vetterli_effective_rank_uses_s_not_s_squared(t10_s):
    erank = metrics.entropy_effective_rank(t10_s)
    assert erank == pytest.approx(4.097401, abs=1e-6)
    assert abs(erank - 3.056983) > 0.5  # the s² variant of T10 is a different number


def test_t10_ww_matrix_entropy(t10_s):
    assert metrics.ww_matrix_entropy(t10_s) == pytest.approx(0.694297, abs=1e-6)
    assert metrics.ww_matrix_entropy(t10_s, n=8) == pytest.approx(0.694297, abs=1e-6)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 7])
def test_t10_truncation_error_matches_truncated_matrix(t10_matrix, t10_s, k):
    # Independent oracle: build W_k from the SVD factors and measure ‖W − W_k‖_F/‖W‖_F directly.
    u, s, vt = np.linalg.svd(t10_matrix, full_matrices=False)
    w_k = (u[:, :k] * s[:k]) @ vt[:k]
    direct = np.linalg.norm(t10_matrix - w_k) / np.linalg.norm(t10_matrix)
    assert metrics.truncation_relative_error(t10_s, k) == pytest.approx(direct, abs=1e-12)


def test_t10_truncation_error_by_hand(t10_s):
    assert metrics.truncation_relative_error(t10_s, 3) == pytest.approx(math.sqrt(1.25 / 30.25), rel=1e-12)


def test_energy_rank_exact_ties_count_as_reached():
    assert metrics.energy_rank([1.0, 1.0], 0.5) == 1
    assert metrics.energy_rank([1.0, 1.0, 1.0], 1 / 3) == 1
    assert metrics.energy_rank([1.0, 1.0, 1.0], 2 / 3) == 2
    assert metrics.energy_rank([0.1] * 10, 0.3) == 3  # 0.1² sums are inexact in binary
    assert metrics.energy_rank([0.1] * 10, 0.7) == 7


def test_energy_rank_at_p_one_is_the_number_of_nonzero_values():
    rng = np.random.default_rng(0)
    s = rng.uniform(0.5, 2.0, 4096)
    assert metrics.energy_rank(s, 1.0) == 4096
    assert metrics.energy_rank(np.concatenate([s, np.zeros(10)]), 1.0) == 4096


def test_energy_rank_rejects_p_outside_unit_interval():
    for p in (0.0, -0.1, 1.0001, float("nan")):
        with pytest.raises(ValueError):
            metrics.energy_rank([1.0, 2.0], p)


def test_zero_spectrum_conventions():
    zeros = np.zeros(4)
    assert metrics.spectral_norm(zeros) == 0.0
    assert metrics.frobenius_norm(zeros) == 0.0
    assert metrics.energy_rank(zeros) == 0
    assert metrics.utilization(zeros) == 0.0
    assert metrics.participation_ratio(zeros) == 0.0
    assert metrics.stable_rank(zeros) == 0.0
    assert metrics.entropy_effective_rank(zeros) == 0.0
    assert np.isnan(metrics.cumulative_energy(zeros)).all() and metrics.cumulative_energy(zeros).shape == (4,)
    assert math.isnan(metrics.ww_matrix_entropy(zeros))
    assert math.isnan(metrics.truncation_relative_error(zeros, 1))


def test_rank_one_spectrum():
    s = [3.0, 0.0, 0.0]
    assert metrics.energy_rank(s, 1.0) == 1
    assert metrics.participation_ratio(s) == pytest.approx(1.0)
    assert metrics.stable_rank(s) == pytest.approx(1.0)
    assert metrics.entropy_effective_rank(s) == pytest.approx(1.0)
    assert metrics.ww_matrix_entropy(s) == 0.0


def test_flat_spectrum_has_full_ranks():
    s = np.full(7, 0.3)
    assert metrics.participation_ratio(s) == pytest.approx(7.0)
    assert metrics.stable_rank(s) == pytest.approx(7.0)
    assert metrics.entropy_effective_rank(s) == pytest.approx(7.0)
    assert metrics.ww_matrix_entropy(s) == pytest.approx(1.0)


def test_tiny_and_huge_weights_do_not_underflow_or_overflow():
    for scale in (1e-200, 1e200):
        s = T10_SINGULAR_VALUES * scale
        assert metrics.participation_ratio(s) == pytest.approx(2.584466, abs=1e-6)
        assert metrics.frobenius_norm(s) == pytest.approx(5.5 * scale, rel=1e-12)
        assert metrics.energy_rank(s, 0.9) == 3


@pytest.mark.parametrize("bad", [[1.0, -0.1], [1.0, float("nan")], [1.0, float("inf")], [[1.0, 2.0]]])
def test_invalid_singular_values_raise(bad):
    with pytest.raises(ValueError):
        metrics.participation_ratio(bad)


spectra = arrays(np.float64, st.integers(1, 40),
                 elements=st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False)).filter(lambda s: s.max() > 1e-3)
scales = st.floats(1e-6, 1e6)

SCALE_FREE = [metrics.participation_ratio, metrics.stable_rank, metrics.entropy_effective_rank,
              metrics.ww_matrix_entropy, lambda s: metrics.energy_rank(s, 0.9),
              lambda s: metrics.truncation_relative_error(s, 2)]


@settings(max_examples=60, deadline=None)
@given(s=spectra, c=scales)
def test_scale_free_metrics_are_invariant_to_scaling(s, c):
    for metric in SCALE_FREE:
        assert metric(c * s) == pytest.approx(metric(s), rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(metrics.cumulative_energy(c * s), metrics.cumulative_energy(s), rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(s=spectra, c=scales)
def test_norms_are_absolutely_homogeneous(s, c):
    assert metrics.spectral_norm(c * s) == pytest.approx(c * metrics.spectral_norm(s), rel=1e-12)
    assert metrics.frobenius_norm(c * s) == pytest.approx(c * metrics.frobenius_norm(s), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(s=spectra, seed=st.integers(0, 2**32 - 1))
def test_metrics_do_not_depend_on_order(s, seed):
    shuffled = np.random.default_rng(seed).permutation(s)
    for metric in SCALE_FREE + [metrics.spectral_norm, metrics.frobenius_norm]:
        assert metric(shuffled) == pytest.approx(metric(s), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(s=spectra, p1=st.floats(1e-6, 1.0), p2=st.floats(1e-6, 1.0))
def test_energy_rank_is_monotone_in_p_and_reaches_p(s, p1, p2):
    lo, hi = min(p1, p2), max(p1, p2)
    r_lo, r_hi = metrics.energy_rank(s, lo), metrics.energy_rank(s, hi)
    assert 1 <= r_lo <= r_hi <= s.size
    # Definition: the r_p largest energies reach p (up to rounding), r_p − 1 of them do not.
    e = np.sort(s)[::-1] ** 2
    assert e[:r_hi].sum() >= hi * e.sum() * (1 - 1e-9)
    assert e[: r_hi - 1].sum() < hi * e.sum()


@settings(max_examples=60, deadline=None)
@given(s=spectra)
def test_rank_inequalities(s):
    rank = np.count_nonzero(s)
    stable, pr, erank = metrics.stable_rank(s), metrics.participation_ratio(s), metrics.entropy_effective_rank(s)
    assert 1 - 1e-12 <= stable <= pr * (1 + 1e-12)
    assert pr <= rank * (1 + 1e-12)
    assert 1 - 1e-12 <= erank <= rank * (1 + 1e-12)
    assert -1e-12 <= metrics.ww_matrix_entropy(s) <= 1 + 1e-12 or rank <= 1


@settings(max_examples=60, deadline=None)
@given(s=spectra, k=st.integers(0, 45))
def test_truncation_error_and_cumulative_energy_agree(s, k):
    c = metrics.cumulative_energy(s)
    expected = 0.0 if k >= s.size else math.sqrt(max(1.0 - (c[k - 1] if k > 0 else 0.0), 0.0))
    assert metrics.truncation_relative_error(s, k) == pytest.approx(expected, abs=1e-7)
