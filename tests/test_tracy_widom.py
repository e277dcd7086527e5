"""TW1 law against the oracles of RMT.md §2.1 / §9-T1 and classical asymptotics."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad
from scipy.special import airy

from spectral.tracy_widom import TW1, tw1_cdf, tw1_isf, tw1_mean, tw1_pdf, tw1_ppf, tw1_sf, tw1_std

# RMT.md §2.1 (cross-checked there against the PyPI package TracyWidom 0.4.0)
TW1_QUANTILES = {
    0.01: -3.8954,
    0.05: -3.1804,
    0.10: -2.7824,
    0.50: -1.2686,
    0.90: 0.4501,
    0.95: 0.9793,
    0.975: 1.4538,
    0.99: 2.0234,
    0.995: 2.4223,
    0.999: 3.2722,
}


@pytest.mark.parametrize("confidence, quantile", sorted(TW1_QUANTILES.items()))
def test_quantile_matches_rmt_table(confidence, quantile):
    assert abs(tw1_ppf(confidence) - quantile) < 1e-3


@pytest.mark.parametrize("confidence, quantile", sorted(TW1_QUANTILES.items()))
def test_cdf_at_tabulated_quantile_is_the_confidence(confidence, quantile):
    # the table is rounded to 4 decimals; the density is < 0.33, so F1 is off by at most 2e-5
    assert abs(tw1_cdf(quantile) - confidence) < 1e-4


def test_mean_and_standard_deviation_match_rmt():
    assert abs(tw1_mean() - (-1.2065)) < 1e-4
    assert abs(tw1_std() - 1.2680) < 1e-4


def test_cdf_at_zero_is_the_bbp_confidence_boundary():
    # RMT.md §6.3: F1(0) = 0.8319
    assert abs(tw1_cdf(0.0) - 0.8319) < 1e-4


def test_upper_tail_matches_first_order_fredholm_term():
    # 1 - det(I - K) = tr K + O((tr K)^2), tr K = (1/2) int_s^inf Ai(x) dx  (Ferrari-Spohn kernel)
    for s in (6.0, 9.0, 12.0):
        trace = 0.5 * quad(lambda x: airy(x)[0], s, np.inf, epsabs=0, epsrel=1e-12)[0]
        assert tw1_sf(s) == pytest.approx(trace, rel=1e-5)


def test_lower_tail_matches_baik_buckingham_difranco_asymptotics():
    # F1(s) ~ tau1 |s|^(-1/16) exp(-|s|^3/24 - |s|^(3/2)/(3 sqrt 2)), tau1 = 2^(-11/48) e^(zeta'(-1)/2)
    tau1 = 2.0 ** (-11.0 / 48.0) * math.exp(-0.16542114370045092 / 2.0)
    for s in (-6.0, -7.5):
        a = -s
        asymptotic = tau1 * a ** (-1.0 / 16.0) * math.exp(-(a**3) / 24.0 - a**1.5 / (3.0 * math.sqrt(2.0)))
        assert tw1_cdf(s) == pytest.approx(asymptotic, rel=0.01)


def test_density_integrates_to_cdf_differences():
    assert quad(tw1_pdf, -3.0, 1.0)[0] == pytest.approx(tw1_cdf(1.0) - tw1_cdf(-3.0), abs=1e-9)


def test_limits_and_vectorisation():
    assert tw1_ppf(0.0) == -math.inf and tw1_ppf(1.0) == math.inf
    assert math.isnan(tw1_ppf(1.5))
    out = tw1_cdf(np.array([[-2.0, 0.0], [1.0, 3.0]]))
    assert out.shape == (2, 2) and np.all(np.diff(out.ravel()) > 0)
    assert isinstance(tw1_ppf(0.9), float)


def test_extreme_upper_quantile_uses_the_survival_function():
    p = 1e-20
    t = tw1_isf(p)
    assert tw1_sf(t) == pytest.approx(p, rel=1e-8)
    assert t > tw1_ppf(0.999999)


def test_frozen_law_delegates():
    assert TW1.ppf(0.99) == tw1_ppf(0.99)
    assert TW1.median() == pytest.approx(-1.2686, abs=1e-3)
    assert TW1.std() == pytest.approx(1.2680, abs=1e-3)


@settings(max_examples=25, deadline=None)
@given(st.floats(min_value=1e-9, max_value=1 - 1e-9))
def test_ppf_inverts_cdf(c):
    t = tw1_ppf(c)
    assert tw1_cdf(t) == pytest.approx(c, rel=1e-9, abs=1e-13)
