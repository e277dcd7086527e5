"""Marchenko-Pastur law and edge helpers against RMT.md §1, §2 and §9 (T2, T3, T4, T9)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad
from scipy.optimize import brentq

from spectral.mp import (
    MarchenkoPastur,
    MarchenkoPasturSingular,
    has_lower_edge,
    lower_edge_location_scale,
    lower_threshold,
    mp_median,
    upper_edge_location_scale,
    upper_threshold,
)
from spectral.tracy_widom import tw1_ppf


def canonical_eigenvalues(W):
    """lambda = s^2/N, ascending, from the M x M Gram (RMT.md §0, §8)."""
    m, n = W.shape
    gram = W @ W.T if m <= n else W.T @ W
    return np.clip(np.linalg.eigvalsh(gram), 0.0, None) / max(m, n)


def ks_distance(sorted_sample, cdf):
    m = sorted_sample.size
    f = cdf(sorted_sample)
    return max(np.max(np.arange(1, m + 1) / m - f), np.max(f - np.arange(m) / m))


def quarter_circle_eigenvalue_cdf(lam):
    """Closed form for q = 1, sigma = 1: F(lambda) = (2/pi)(phi + sin phi cos phi), phi = arcsin(sqrt(lambda)/2).

    Obtained from rho(lambda) = sqrt(4 - lambda)/(2 pi sqrt(lambda)) with lambda = 4 sin^2 phi (RMT.md §1.3).
    """
    phi = np.arcsin(np.sqrt(lam) / 2.0)
    return 2.0 / np.pi * (phi + np.sin(phi) * np.cos(phi))


# ---------------------------------------------------------------------------------------------------------------
# §1.6 CDF / quantile oracles
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "q, lam, expected",
    [
        (0.25, 0.5, 0.186378), (0.25, 1.0, 0.553390), (0.25, 2.0, 0.965630), (0.25, 3.0, 1.0),
        (1.0, 0.5, 0.440596), (1.0, 1.0, 0.608998), (1.0, 2.0, 0.818310), (1.0, 3.0, 0.942331),
    ],
)  # fmt: skip
def test_cdf_matches_rmt_table(q, lam, expected):
    assert abs(MarchenkoPastur(q).cdf(lam) - expected) < 1e-5


@pytest.mark.parametrize("p, expected", [(0.5, 0.916004), (0.2, 0.516215), (0.8, 1.478860)])
def test_quarter_aspect_quantiles_match_rmt_table(p, expected):
    assert abs(MarchenkoPastur(0.25).ppf(p) - expected) < 1e-5


@pytest.mark.parametrize("p", [0.5, 0.2, 0.8])
def test_square_quantiles_match_closed_form(p):
    # RMT.md §1.6 lists 0.652845 / 0.099563 / 1.888204 for q = 1; those are off by 4e-5..7e-5: the closed form
    # above gives 0.652776 / 0.099523 / 1.888144, and the same table's F(1) etc. agree with the closed form.
    expected = brentq(lambda x: quarter_circle_eigenvalue_cdf(x) - p, 0.0, 4.0, xtol=1e-14)
    assert abs(MarchenkoPastur(1.0).ppf(p) - expected) < 1e-9


def test_square_cdf_matches_closed_form_everywhere():
    lam = np.linspace(0.0, 4.0, 2001)
    assert np.max(np.abs(MarchenkoPastur(1.0).cdf(lam) - quarter_circle_eigenvalue_cdf(lam))) < 1e-10


def test_median_of_llama_aspect_ratio():
    # RMT.md §1.6 check value, q = 4096/11008
    assert abs(mp_median(0.372093) - 0.874445) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# densities, normalisation, moments (RMT.md §1.1-§1.5, §9 T2 density values)
# ---------------------------------------------------------------------------------------------------------------
def test_density_values_match_rmt():
    assert MarchenkoPastur(0.25).pdf(1.0) == pytest.approx(0.616404, abs=1e-6)
    assert MarchenkoPasturSingular(0.25).pdf(1.0) == pytest.approx(1.232809, abs=1e-6)
    assert MarchenkoPastur(1.0).pdf(1.0) == pytest.approx(0.275664, abs=1e-6)
    assert MarchenkoPasturSingular(1.0).pdf(1.0) == pytest.approx(math.sqrt(3) / math.pi, abs=1e-12)


def test_quarter_circle_is_finite_at_the_hard_edge():
    law = MarchenkoPasturSingular(1.0, sigma=0.5)
    assert law.pdf(0.0) == pytest.approx(math.sqrt(4 * 0.25) / (math.pi * 0.25))
    assert MarchenkoPastur(1.0).pdf(0.0) == math.inf


@pytest.mark.parametrize("q", [0.25, 0.6])
def test_normalisation_and_moments(q):
    law = MarchenkoPastur(q)
    lo, hi = law.support()
    moment = [quad(lambda x, k=k: x**k * law.pdf(x), lo, hi, limit=200)[0] for k in range(3)]
    assert moment[0] == pytest.approx(1.0, abs=1e-8)
    assert moment[1] == pytest.approx(1.0, abs=1e-8)  # sigma^2
    assert moment[2] == pytest.approx(1.0 + q, abs=1e-8)  # sigma^4 (1 + q); 1.25 at q = 0.25
    assert law.mean() == 1.0 and law.var() == pytest.approx(q)


def test_singular_law_moments():
    law = MarchenkoPasturSingular(0.25, sigma=2.0)
    lo, hi = law.support()
    assert (lo, hi) == pytest.approx((1.0, 3.0))
    assert quad(law.pdf, lo, hi)[0] == pytest.approx(1.0, abs=1e-8)
    mean = quad(lambda x: x * law.pdf(x), lo, hi)[0]
    assert law.mean() == pytest.approx(mean, rel=1e-9)
    assert law.var() + law.mean() ** 2 == pytest.approx(4.0)  # E x^2 = sigma^2


@pytest.mark.parametrize("q", [0.01, 0.25, 0.7, 1.0])
def test_cdf_agrees_with_direct_quadrature_of_the_density(q):
    law = MarchenkoPastur(q, sigma=1.3)
    lo, hi = law.support()
    for a, b in [(lo, lo + 0.3 * (hi - lo)), (lo + 0.2 * (hi - lo), lo + 0.9 * (hi - lo))]:
        assert law.cdf(b) - law.cdf(a) == pytest.approx(quad(law.pdf, a, b, limit=200)[0], abs=1e-9)


def test_support_and_tails():
    law = MarchenkoPastur(0.25, sigma=2.0)
    assert law.support() == pytest.approx((1.0, 9.0))
    assert law.cdf([0.0, 1.0, 9.0, 20.0]).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert law.ppf([0.0, 1.0]).tolist() == pytest.approx([1.0, 9.0])
    assert np.isnan(law.ppf(1.5))
    assert law.pdf([0.5, 10.0]).tolist() == [0.0, 0.0]


def test_singular_law_is_the_square_root_of_the_eigenvalue_law():
    law, sv_law = MarchenkoPastur(0.4, 0.7), MarchenkoPasturSingular(0.4, 0.7)
    x = np.linspace(0.0, 1.5, 50)
    np.testing.assert_allclose(sv_law.cdf(x), law.cdf(x * x), atol=1e-15)
    np.testing.assert_allclose(sv_law.ppf([0.1, 0.5, 0.9]), np.sqrt(law.ppf([0.1, 0.5, 0.9])), rtol=1e-14)


def test_rvs_follows_the_law():
    draws = MarchenkoPastur(0.25).rvs(size=20000, random_state=1)
    assert ks_distance(np.sort(draws), MarchenkoPastur(0.25).cdf) < 0.015


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, float("nan")])
def test_invalid_aspect_ratio_raises(q):
    with pytest.raises(ValueError):
        MarchenkoPastur(q)


def test_invalid_sigma_raises():
    with pytest.raises(ValueError):
        MarchenkoPastur(0.5, sigma=0.0)


@settings(max_examples=25, deadline=None)
@given(
    st.floats(min_value=1e-3, max_value=1.0),
    st.floats(min_value=1e-3, max_value=1e3),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_ppf_inverts_cdf_and_scales_with_sigma(q, sigma, p):
    law, unit = MarchenkoPastur(q, sigma), MarchenkoPastur(q)
    lam = law.ppf(p)
    assert law.cdf(lam) == pytest.approx(p, abs=1e-10)
    assert lam == pytest.approx(sigma**2 * unit.ppf(p), rel=1e-12, abs=1e-300)


# ---------------------------------------------------------------------------------------------------------------
# §9 T2 constants (exact to print precision)
# ---------------------------------------------------------------------------------------------------------------
T2_ROWS = [
    # shape, lambda_-, lambda_+, s_+, s_-, gamma_+(0.90), gamma_+(0.95), gamma_+(0.99)
    ((1000, 4000), "0.25", "2.25", "0.0085854", "0.0019843", "2.253865", "2.258408", "2.267372"),
    ((768, 3072), "0.25", "2.25", "0.0102373", None, "2.254608", "2.260026", "2.270715"),
    ((4096, 11008), "0.152104", "2.592082", "0.0044963", None, "2.594106", "2.596485", "2.601180"),
    ((1000, 1000), "0", "4", "0.0251984", None, "4.011343", "4.024677", "4.050988"),
    ((512, 512), None, "4", "0.0393725", None, "4.017723", "4.038558", "4.079668"),
]


def assert_printed(value, printed):
    """value agrees with the printed decimal to its last printed digit."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    assert abs(value - float(printed)) <= 0.5 * 10.0**-decimals + 1e-12, (value, printed)


@pytest.mark.parametrize("row", T2_ROWS, ids=lambda r: "x".join(map(str, r[0])))
def test_edge_constants_match_t2(row):
    (m, n), lam_minus, lam_plus, s_plus, s_minus, g90, g95, g99 = row
    N, M = max(m, n), min(m, n)
    law = MarchenkoPastur(M / N)
    mu_plus, scale_plus = upper_edge_location_scale(N, M)
    assert_printed(mu_plus, lam_plus)
    assert_printed(law.support()[1], lam_plus)
    if lam_minus is not None:
        assert_printed(law.support()[0], lam_minus)
    assert_printed(scale_plus, s_plus)
    if s_minus is not None:
        assert_printed(lower_edge_location_scale(N, M)[1], s_minus)
    for confidence, printed in [(0.90, g90), (0.95, g95), (0.99, g99)]:
        assert_printed(upper_threshold(N, M, 1.0, confidence), printed)


def test_threshold_scales_with_sigma2_and_ignores_dimension_order():
    assert upper_threshold(4000, 1000, 0.25, 0.99) == pytest.approx(0.25 * 2.267372, abs=1e-6)
    assert upper_threshold(1000, 4000, 1.0, 0.9) == upper_threshold(4000, 1000, 1.0, 0.9)
    assert lower_threshold(4000, 1000, 1.0, 0.99) == pytest.approx(0.25 - tw1_ppf(0.99) * 0.0019843, abs=1e-7)


def test_canonical_scale_has_the_closed_form_of_bema_reference_code():
    # RMT.md §2.2: s_+ = N^(-2/3) q^(-1/6) (1 + sqrt q)^(4/3)   (CHuanSite/SJD R/BEMA.R)
    N, M = 11008, 4096
    q = M / N
    expected = N ** (-2 / 3) * q ** (-1 / 6) * (1 + math.sqrt(q)) ** (4 / 3)
    assert upper_edge_location_scale(N, M)[1] == pytest.approx(expected, rel=1e-12)
    expected_lower = N ** (-2 / 3) * q ** (-1 / 6) * (1 - math.sqrt(q)) ** (4 / 3)
    assert lower_edge_location_scale(N, M)[1] == pytest.approx(expected_lower, rel=1e-12)


def test_johnstone_variant_is_the_finite_size_formula():
    N, M = 800, 200
    mu, scale = upper_edge_location_scale(N, M, variant="johnstone")
    root = math.sqrt(N - 1) + math.sqrt(M)
    assert mu == pytest.approx(root**2 / N)
    assert scale == pytest.approx(root * (1 / math.sqrt(N - 1) + 1 / math.sqrt(M)) ** (1 / 3) / N)


def test_lower_edge_rules():
    assert has_lower_edge(4000, 1000) and has_lower_edge(1000, 4000)
    assert has_lower_edge(1020, 1000) and not has_lower_edge(1019, 1000)
    assert not has_lower_edge(768, 768)
    with pytest.raises(ValueError):
        lower_edge_location_scale(768, 768)
    with pytest.raises(ValueError):
        upper_edge_location_scale(800, 200, variant="exact")
    with pytest.raises(ValueError):
        upper_threshold(800, 200, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# §9 T3: the bulk of a simulated noise matrix
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def noise_1000x4000():
    rng = np.random.default_rng(0)
    return canonical_eigenvalues(rng.standard_normal((1000, 4000)))


def test_t3_rectangular_bulk_follows_mp(noise_1000x4000):
    lam = noise_1000x4000
    N, M = 4000, 1000
    law = MarchenkoPastur(M / N)
    mu_plus, scale_plus = upper_edge_location_scale(N, M)
    assert ks_distance(lam, law.cdf) < 0.01
    assert abs(ks_distance(lam, law.cdf) - 0.0031) < 1e-4  # RMT.md regression value
    assert abs(lam.mean() - 1.0) < 0.005
    assert abs(lam[-1] - mu_plus) < 8 * scale_plus
    assert lam[0] == pytest.approx(0.252099, abs=1e-5) and lam[-1] == pytest.approx(2.243730, abs=1e-5)


def test_t3_edge_z_scores_with_finite_size_centring(noise_1000x4000):
    lam = noise_1000x4000
    mu, scale = upper_edge_location_scale(4000, 1000, variant="johnstone")
    assert (lam[-1] - mu) / scale == pytest.approx(-0.686, abs=1e-3)
    mu, scale = lower_edge_location_scale(4000, 1000, variant="ma")
    assert (mu - lam[0]) / scale == pytest.approx(-1.026, abs=1e-3)


def test_t3_square_bulk_follows_quarter_circle():
    lam = canonical_eigenvalues(np.random.default_rng(0).standard_normal((1000, 1000)))
    law = MarchenkoPastur(1.0)
    assert ks_distance(lam, law.cdf) < 0.01
    assert lam[-1] == pytest.approx(3.9926, abs=1e-4)
    sv_law = MarchenkoPasturSingular(1.0)
    assert ks_distance(np.sqrt(lam), sv_law.cdf) == pytest.approx(ks_distance(lam, law.cdf), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# §9 T9: left outliers from a structured (covariance) spike, canonical threshold and Ma z-scores
# ---------------------------------------------------------------------------------------------------------------
def test_t9_left_outliers():
    ell = np.ones(1000)
    ell[:3] = [0.05, 0.1, 0.3]
    W = np.random.default_rng(7).standard_normal((4000, 1000)) * np.sqrt(ell)
    lam = canonical_eigenvalues(W)
    np.testing.assert_allclose(lam[:4], [0.0360, 0.0700, 0.1942, 0.2510], atol=5e-5)
    mu, scale = lower_edge_location_scale(4000, 1000, variant="ma")
    np.testing.assert_allclose((mu - lam[:4]) / scale, [107.86, 90.70, 28.17, -0.45], atol=0.006)
    assert np.count_nonzero(lam < lower_threshold(4000, 1000, 1.0, 0.99)) == 3


# ---------------------------------------------------------------------------------------------------------------
# §9 T4: Tracy-Widom fluctuations of the extreme eigenvalues (Monte Carlo)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_t4_extreme_eigenvalues_follow_tw1():
    m, n, reps = 200, 800, 1000
    rng = np.random.default_rng(2024)
    upper, lower = np.empty(reps), np.empty(reps)
    for rep in range(reps):
        Z = rng.standard_normal((m, n))  # RMT.md §9 generator, pure noise
        lam = np.linalg.eigvalsh(Z @ Z.T) / n
        upper[rep], lower[rep] = lam[-1], lam[0]
    t95 = tw1_ppf(0.95)
    mu, scale = upper_edge_location_scale(n, m, variant="johnstone")
    z = (upper - mu) / scale
    mu, scale = lower_edge_location_scale(n, m, variant="ma")
    z_lower = (mu - lower) / scale
    for sample in (z, z_lower):
        assert abs(sample.mean() + 1.21) < 0.2
        assert abs(sample.std() - 1.27) < 0.15
        assert 0.02 <= np.mean(sample > t95) <= 0.08
