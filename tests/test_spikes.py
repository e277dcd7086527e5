"""Signal plus noise (spectral/spikes.py) against RMT.md §9 T6, T7, T8 and the closed forms of §6."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral import spikes

THETAS = np.array([0.5, 1.0, 1.5, 2.0, 3.0])  # RMT.md §9 T5-T7 spike strengths


def spiked(m, n, theta, seed, sigma=1.0):
    """RMT.md §9 generator: W = σZ + U diag(θσ√N) Vᵀ with U, V random orthonormal; returns W, U, V."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((m, n))
    k, big_n = len(theta), max(m, n)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return sigma * z + (u * (np.asarray(theta) * sigma * np.sqrt(big_n))) @ v.T, u, v


def svd_top(w, k):
    """All singular values (descending) and the top-k left/right singular vectors, via the short-side Gram."""
    m, n = w.shape
    gram = w @ w.T if m <= n else w.T @ w
    evals, vecs = np.linalg.eigh(gram)
    s = np.sqrt(np.clip(evals[::-1], 0, None))
    short = vecs[:, ::-1][:, :k]
    long = (w.T @ short if m <= n else w @ short) / s[:k]
    return (s, short, long) if m <= n else (s, long, short)


def planted_cos2(observed, planted, theta):
    """cos² between the i-th observed vector and the planted vector of the i-th largest θ."""
    order = np.argsort(theta)[::-1][: observed.shape[1]]
    return np.array([np.dot(observed[:, i], planted[:, j]) ** 2 for i, j in enumerate(order)])


# --- closed forms (RMT.md §6, §9 T6 "pred" columns) -------------------------------------------------------------

def test_bbp_threshold():
    assert spikes.bbp_threshold(0.25) == pytest.approx(1 / math.sqrt(2))
    assert spikes.bbp_threshold(1.0) == 1.0


@pytest.mark.parametrize("q", [0.0, -0.5, 1.5, float("nan")])
def test_invalid_aspect_ratio_raises(q):
    with pytest.raises(ValueError):
        spikes.bbp_threshold(q)
    with pytest.raises(ValueError):
        spikes.outlier_location(2.0, q)


def test_t6_predicted_columns_q_quarter():
    np.testing.assert_allclose(spikes.outlier_location(THETAS, 0.25), [1.5, 1.5811, 1.9003, 2.3049, 3.2059],
                               atol=5e-5)
    np.testing.assert_allclose(spikes.overlap_short(THETAS, 0.25), [0, 0.6000, 0.8556, 0.9265, 0.9700], atol=5e-5)
    np.testing.assert_allclose(spikes.overlap_long(THETAS, 0.25), [0, 0.3750, 0.6581, 0.7875, 0.8972], atol=5e-5)


def test_t6_predicted_columns_square():
    np.testing.assert_allclose(spikes.outlier_location(THETAS, 1.0), [2, 2, 2.1667, 2.5, 3.3333], atol=5e-5)
    expected = [0, 0, 0.5556, 0.75, 0.8889]
    np.testing.assert_allclose(spikes.overlap_short(THETAS, 1.0), expected, atol=5e-5)
    np.testing.assert_allclose(spikes.overlap_long(THETAS, 1.0), expected, atol=5e-5)


def test_t5_predicted_eigenvalues():
    # RMT.md §9 T5: BGN predictions λ = y² = 10.27778, 5.31250, 3.61111, 2.50000 for θ = 3, 2, 1.5, 1.
    y = spikes.outlier_location([3.0, 2.0, 1.5, 1.0], 0.25)
    np.testing.assert_allclose(y**2, [10.27778, 5.31250, 3.61111, 2.50000], atol=5e-6)


def test_t5_square_predicted_eigenvalues():
    # RMT.md §9 T5 square test: (1+θ²)²/θ² = 11.1111, 6.25, 4.6944 for θ = 3, 2, 1.5 at q = 1.
    np.testing.assert_allclose(spikes.outlier_location([3.0, 2.0, 1.5], 1.0) ** 2, [11.1111, 6.25, 4.6944],
                               atol=5e-5)


def test_scalars_in_floats_out_arrays_keep_shape():
    assert isinstance(spikes.outlier_location(2.0, 0.25), float)
    assert isinstance(spikes.signal_strength(3.0, 0.25), float)
    assert isinstance(spikes.overlap_short(2.0, 0.25), float)
    assert isinstance(spikes.optimal_shrinkage(3.0, 0.25), float)
    grid = np.full((2, 3), 2.0)
    for f in (spikes.outlier_location, spikes.signal_strength, spikes.overlap_short, spikes.overlap_long,
              spikes.optimal_shrinkage):
        assert np.shape(f(grid, 0.25)) == (2, 3)


def test_t6_inverse_map_on_mean_simulated_y():
    # RMT.md §9 T6: θ̂ on the mean simulated y (1000×4000) = [–, 0.9863, 1.4984, 2.0013, 3.0103].
    theta = spikes.signal_strength([1.4957, 1.5747, 1.8991, 2.3060, 3.2155], 0.25)
    assert math.isnan(theta[0])
    np.testing.assert_allclose(theta[1:], [0.9863, 1.4984, 2.0013, 3.0103], atol=2e-4)


def test_inverse_map_is_undefined_at_and_below_the_edge():
    assert math.isnan(spikes.signal_strength(1.5, 0.25))  # y = 1 + √q exactly
    assert math.isnan(spikes.signal_strength(0.3, 0.25))
    assert spikes.overlap_short(spikes.signal_strength(1.4, 0.25), 0.25) == 0.0


def test_outlier_sticks_to_edge_below_threshold():
    q = 0.25
    for theta in (0.0, 0.3, spikes.bbp_threshold(q)):
        assert spikes.outlier_location(theta, q) == pytest.approx(1 + math.sqrt(q))
        assert spikes.overlap_short(theta, q) == 0.0 and spikes.overlap_long(theta, q) == 0.0


def test_t8_shrinker_identity_and_values():
    q = 0.25
    theta = np.array([1.0, 1.5, 2.0, 3.0])
    eta = spikes.optimal_shrinkage(spikes.outlier_location(theta, q), q)
    np.testing.assert_allclose(eta, [0.474342, 1.125558, 1.708327, 2.798662], atol=1e-6)
    identity = theta * np.sqrt(spikes.overlap_short(theta, q) * spikes.overlap_long(theta, q))
    np.testing.assert_allclose(eta, identity, atol=1e-6)


def test_shrinker_is_zero_inside_the_bulk():
    assert spikes.optimal_shrinkage(1.5, 0.25) == 0.0
    assert spikes.optimal_shrinkage(0.2, 0.25) == 0.0


@pytest.mark.parametrize("m_le_n, left, right", [(True, "short", "long"), (False, "long", "short")])
def test_left_and_right_follow_the_orientation(m_le_n, left, right):
    theta = np.array([1.0, 2.0])
    np.testing.assert_array_equal(spikes.overlap(theta, 0.25, "left", m_le_n), spikes.overlap(theta, 0.25, left))
    np.testing.assert_array_equal(spikes.overlap(theta, 0.25, "right", m_le_n), spikes.overlap(theta, 0.25, right))


def test_left_right_without_orientation_or_unknown_side_raise():
    with pytest.raises(ValueError):
        spikes.overlap(2.0, 0.25, "left")
    with pytest.raises(ValueError):
        spikes.ave_w_phi([5.0], 2.0, 1.0, 0.25, side="right")
    with pytest.raises(ValueError):
        spikes.overlap(2.0, 0.25, "both")


thetas = st.floats(0.0, 50.0)
aspects = st.floats(0.01, 1.0)


@settings(max_examples=100, deadline=None)
@given(theta=thetas, q=aspects)
def test_inverse_map_recovers_theta(theta, q):
    y = spikes.outlier_location(theta, q)
    if theta > 1.01 * spikes.bbp_threshold(q):
        assert spikes.signal_strength(y, q) == pytest.approx(theta, rel=1e-8)
    assert y >= 1 + math.sqrt(q) - 1e-12
    assert y >= theta


@settings(max_examples=100, deadline=None)
@given(theta=thetas, q=aspects)
def test_short_side_is_estimated_better_and_overlaps_are_cosines(theta, q):
    phi_s, phi_l = spikes.overlap_short(theta, q), spikes.overlap_long(theta, q)
    assert 0.0 <= phi_l <= phi_s + 1e-15 < 1.0 + 1e-15
    assert spikes.overlap(theta, q) == pytest.approx(phi_s * phi_l)


@settings(max_examples=100, deadline=None)
@given(t1=thetas, t2=thetas, q=aspects)
def test_maps_are_monotone_in_theta(t1, t2, q):
    lo, hi = min(t1, t2), max(t1, t2)
    assert spikes.outlier_location(lo, q) <= spikes.outlier_location(hi, q) + 1e-12
    assert spikes.overlap_short(lo, q) <= spikes.overlap_short(hi, q) + 1e-15
    assert spikes.overlap_long(lo, q) <= spikes.overlap_long(hi, q) + 1e-15


@settings(max_examples=100, deadline=None)
@given(theta=st.floats(0.0, 50.0), q=aspects)
def test_shrinker_identity_everywhere(theta, q):
    eta = spikes.optimal_shrinkage(spikes.outlier_location(theta, q), q)
    expected = theta * math.sqrt(spikes.overlap_short(theta, q) * spikes.overlap_long(theta, q))
    assert eta == pytest.approx(expected, rel=1e-7, abs=1e-7)


# --- Ave_w (RMT.md §6.5) -----------------------------------------------------------------------------------------

def test_ave_w_by_hand():
    # q = 1/4, σ² = 1, γ₊ = 5/2; spikes at θ = 2, 3 sit at λ = (1+θ²)(q+θ²)/θ² = 85/16 and 185/18.
    lam = [0.3, 1.1, 2.2, 185 / 18, 85 / 16]
    w2, w3 = 85 / 16 - 2.5, 185 / 18 - 2.5
    phi_s = {2: 15.75 / 17.0, 3: 80.75 / 83.25}  # (θ⁴ − q)/(θ⁴ + qθ²)
    phi_l = {2: 15.75 / 20.0, 3: 80.75 / 90.0}  # (θ⁴ − q)/(θ⁴ + θ²)
    expect = {
        "short": (phi_s[2] * w2 + phi_s[3] * w3) / (w2 + w3),
        "long": (phi_l[2] * w2 + phi_l[3] * w3) / (w2 + w3),
        "product": (phi_s[2] * phi_l[2] * w2 + phi_s[3] * phi_l[3] * w3) / (w2 + w3),
    }
    for side, value in expect.items():
        assert spikes.ave_w_phi(lam, 2.5, 1.0, 0.25, side=side) == pytest.approx(value, rel=1e-12)
    assert spikes.ave_w_phi(lam, 2.5, 1.0, 0.25) == pytest.approx(expect["product"], rel=1e-12)
    assert spikes.ave_w_phi(lam, 2.5, 1.0, 0.25, "left", m_le_n=True) == pytest.approx(expect["short"], rel=1e-12)
    assert spikes.ave_w_phi(lam, 2.5, 1.0, 0.25, "left", m_le_n=False) == pytest.approx(expect["long"], rel=1e-12)


def test_ave_w_is_scale_equivariant_in_sigma():
    lam = np.array([0.3, 1.1, 2.2, 185 / 18, 85 / 16])
    c = 0.02**2
    assert spikes.ave_w_phi(c * lam, c * 2.5, c * 1.0, 0.25) == pytest.approx(
        spikes.ave_w_phi(lam, 2.5, 1.0, 0.25), rel=1e-12)


def test_ave_w_counts_retained_values_inside_the_bulk_with_zero_overlap():
    # γ₊ = 2 lies below the edge (1+√q)² = 2.25, so λ = 2.2 is retained but has no θ̂: φ = 0, weight 0.2.
    w = 85 / 16 - 2.0
    phi = (15.75 / 17.0) * (15.75 / 20.0)
    assert spikes.ave_w_phi([2.2, 85 / 16], 2.0, 1.0, 0.25) == pytest.approx(phi * w / (w + 0.2), rel=1e-12)


def test_ave_w_is_nan_without_signal():
    assert math.isnan(spikes.ave_w_phi([0.5, 1.0, 2.0], 2.26, 1.0, 0.25))
    assert math.isnan(spikes.ave_w_phi([], 2.26, 1.0, 0.25))


def test_ave_w_rejects_nonpositive_noise_variance_when_there_is_signal():
    with pytest.raises(ValueError):
        spikes.ave_w_phi([5.0], 2.0, 0.0, 0.25)


@pytest.fixture(scope="module")
def t7():
    """RMT.md §9 T7: spiked 1000×4000, σ = 1, θ = [0.5, 1, 1.5, 2, 3], seed 2."""
    w, u, v = spiked(1000, 4000, THETAS, seed=2)
    s, left, right = svd_top(w, 4)
    return {"lam": s**2 / 4000, "short_cos2": planted_cos2(left, u, THETAS)[:4],
            "long_cos2": planted_cos2(right, v, THETAS)[:4]}


T7_SIGMA2 = 1.00165**2  # BEMA σ̂ (RMT.md §9 T5), so this test does not depend on spectral.noise
T7_GAMMA_PLUS = 2.26130  # γ₊(0.90) at that σ̂


def test_t7_spectrum_and_signal_strengths(t7):
    lam = t7["lam"]
    np.testing.assert_allclose(lam[:6], [10.19517, 5.25320, 3.62039, 2.48565, 2.24558, 2.2165], atol=1e-4)
    assert np.count_nonzero(lam > T7_GAMMA_PLUS) == 4
    theta = spikes.signal_strength(np.sqrt(lam[:4] / T7_SIGMA2), 0.25)
    np.testing.assert_allclose(theta, [2.9805, 1.9805, 1.4991, 0.9847], atol=2e-4)


@pytest.mark.parametrize("side, predicted, actual", [("short", 0.9395, 0.9385), ("long", 0.8337, 0.8307),
                                                     ("product", 0.7893, 0.7855)])
def test_t7_ave_w(t7, side, predicted, actual):
    lam = t7["lam"]
    value = spikes.ave_w_phi(lam, T7_GAMMA_PLUS, T7_SIGMA2, 0.25, side=side)
    assert value == pytest.approx(predicted, abs=1e-3)  # RMT.md T7 "Ave_w pred"

    # The same weighted average over the ACTUAL cos² between observed and planted singular vectors.
    cos2 = {"short": t7["short_cos2"], "long": t7["long_cos2"], "product": t7["short_cos2"] * t7["long_cos2"]}[side]
    weights = lam[:4] - T7_GAMMA_PLUS
    measured = float(np.sum(cos2 * weights) / np.sum(weights))
    assert measured == pytest.approx(actual, abs=2e-3)  # RMT.md T7 "Ave_w actual"
    assert abs(value - measured) < 0.01  # T7 tolerance: the prediction describes the simulation


def test_t7_per_component_overlaps(t7):
    theta = spikes.signal_strength(np.sqrt(t7["lam"][:4] / T7_SIGMA2), 0.25)
    np.testing.assert_allclose(spikes.overlap_short(theta, 0.25), [0.9695, 0.9248, 0.8553, 0.5836], atol=2e-4)
    np.testing.assert_allclose(spikes.overlap_long(theta, 0.25), [0.8960, 0.7839, 0.6578, 0.3614], atol=2e-4)
    np.testing.assert_allclose(t7["short_cos2"], [0.9677, 0.9262, 0.8539, 0.5840], atol=2e-3)
    np.testing.assert_allclose(t7["long_cos2"], [0.8938, 0.7801, 0.6506, 0.3641], atol=2e-3)


# --- T6: BBP/BGN against simulation ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("m, n", [(1000, 4000), (4000, 1000)])
def test_t6_bbp_location_and_overlaps_match_simulation(m, n):
    q, big_n = min(m, n) / max(m, n), max(m, n)
    seeds = (100, 101, 102)  # T6 averages seeds 100-109; three keep the test short and within tolerance
    y, short, long = [], [], []
    for seed in seeds:
        w, u, v = spiked(m, n, THETAS, seed)
        s, left, right = svd_top(w, 5)
        y.append(s[:5] / math.sqrt(big_n))
        left_cos2, right_cos2 = planted_cos2(left, u, THETAS), planted_cos2(right, v, THETAS)
        short.append(left_cos2 if m <= n else right_cos2)  # the side, not left/right, decides (RMT.md §6.4)
        long.append(right_cos2 if m <= n else left_cos2)
    y, short, long = (np.mean(a, axis=0) for a in (y, short, long))

    theta_desc = np.sort(THETAS)[::-1]
    np.testing.assert_allclose(y, spikes.outlier_location(theta_desc, q), atol=0.03)
    tolerance = np.where(theta_desc >= 1.5, 0.04, 0.08)  # T6: 0.04 for θ ≥ 1.5, 0.08 at θ = 1 (and subcritical)
    assert np.all(np.abs(short - spikes.overlap_short(theta_desc, q)) < tolerance)
    assert np.all(np.abs(long - spikes.overlap_long(theta_desc, q)) < tolerance)
    # Inverse map on the mean observed y recovers the supercritical θ (T6: 0.9863 ... 3.0103 over 10 seeds).
    np.testing.assert_allclose(spikes.signal_strength(y[:4], q), theta_desc[:4], atol=0.05)
