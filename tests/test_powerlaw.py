"""Power-law fit (spectral/powerlaw.py) against RMT.md §9 T11 and a brute-force CSN reference loop."""
import math

import numpy as np
import pytest

from spectral.powerlaw import PowerLawFit, fit_power_law


def t11_data() -> np.ndarray:
    """RMT.md §9 T11: 1000 Pareto(pdf ∝ x^−2.5, x ≥ 1) by inversion, then 3000 U(0.2, 1), seed 13."""
    rng = np.random.default_rng(13)
    pareto = (1.0 - rng.random(1000)) ** (-1.0 / 1.5)
    uniform = rng.uniform(0.2, 1.0, 3000)
    return np.concatenate([pareto, uniform])


def reference_fit(data, xmin_range=(None, None)):
    """Clauset–Shalizi–Newman 2009 written as the definition reads: one candidate x_min at a time."""
    x = np.sort(np.asarray(data, dtype=float))
    x = x[x > 0]
    lo, hi = xmin_range
    best = None
    for xmin in np.unique(x)[:-1]:
        if (lo is not None and xmin < lo) or (hi is not None and xmin > hi):
            continue
        tail = x[x >= xmin]
        k = tail.size
        alpha = 1.0 + k / np.sum(np.log(tail / xmin))
        points = np.unique(tail)
        empirical = np.searchsorted(tail, points, side="left") / k  # fraction of the tail strictly below
        fitted = 1.0 - (points / xmin) ** (1.0 - alpha)
        distance = np.max(np.abs(fitted - empirical))
        if best is None or distance < best[2]:
            best = (alpha, xmin, distance, (alpha - 1.0) / math.sqrt(k), k)
    return best


def test_t11_oracle():
    fit = fit_power_law(t11_data())
    assert isinstance(fit, PowerLawFit)
    assert fit.alpha == pytest.approx(2.6470, abs=5e-5)
    assert fit.xmin == pytest.approx(1.3678, abs=5e-5)
    assert fit.ks_distance == pytest.approx(0.0146, abs=5e-5)
    assert fit.D == fit.ks_distance
    assert fit.sigma_alpha == pytest.approx(0.0656, abs=5e-5)
    assert fit.n_tail == 630


def test_t11_tail_starts_inside_the_pareto_part():
    fit = fit_power_law(t11_data())
    assert fit.xmin > 1.0  # above every uniform point
    assert abs(fit.alpha - 2.5) < 3 * fit.sigma_alpha


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    data = np.concatenate([(1 - rng.random(150)) ** (-1 / rng.uniform(0.8, 3.0)), rng.uniform(0.05, 1.0, 250)])
    if seed % 2:
        data = np.round(data, 1)  # ties, as a quantised spectrum has
    alpha, xmin, distance, sigma, k = reference_fit(data)
    fit = fit_power_law(data)
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.xmin == xmin
    assert fit.ks_distance == pytest.approx(distance, abs=1e-12)
    assert fit.sigma_alpha == pytest.approx(sigma, rel=1e-10)
    assert fit.n_tail == k


def test_matches_brute_force_reference_over_a_wide_dynamic_range():
    data = np.exp(np.random.default_rng(7).normal(0.0, 8.0, 300))  # ~1e-10 .. 1e10
    alpha, xmin, distance, _sigma, k = reference_fit(data)
    fit = fit_power_law(data)
    assert (fit.xmin, fit.n_tail) == (xmin, k)
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.ks_distance == pytest.approx(distance, abs=1e-12)


def test_xmin_range_restricts_candidates():
    data = t11_data()
    for window in [(0.5, 0.9), (2.0, None), (None, 1.2)]:
        alpha, xmin, distance, _, k = reference_fit(data, window)
        fit = fit_power_law(data, xmin_range=window)
        assert fit.xmin == xmin and fit.n_tail == k
        assert fit.alpha == pytest.approx(alpha, rel=1e-10)
        assert fit.ks_distance == pytest.approx(distance, abs=1e-12)


def test_alpha_is_scale_free():
    data = t11_data()
    base = fit_power_law(data)
    for c in (1e-4, 37.0):
        fit = fit_power_law(c * data)
        assert fit.alpha == pytest.approx(base.alpha, rel=1e-9)
        assert fit.xmin == pytest.approx(c * base.xmin, rel=1e-12)
        assert fit.n_tail == base.n_tail


def test_pure_pareto_recovers_its_exponent():
    rng = np.random.default_rng(1)
    fit = fit_power_law(3.0 * (1.0 - rng.random(4000)) ** (-1.0 / 2.0))  # pdf ∝ x^−3, x ≥ 3
    assert abs(fit.alpha - 3.0) < 3 * fit.sigma_alpha + 0.05


@pytest.mark.slow
def test_pure_gaussian_esd_has_a_large_meaningless_alpha():
    # RMT.md §7/§9 T11: a 1000×4000 MP bulk gives α ≈ 19.79 (seed 2, the T5 pure-noise matrix, reproduces it).
    # `powerlaw` 2.0.0 with its default α range (0, 3) would report ≈ 3.0 here; CSN/WeightWatcher do not cap α.
    z = np.random.default_rng(2).standard_normal((1000, 4000))
    esd = np.linalg.eigvalsh(z @ z.T)  # s_i²
    fit = fit_power_law(esd)
    assert fit.alpha > 10
    assert fit.alpha == pytest.approx(19.79, abs=0.01)


def test_nonpositive_and_nonfinite_values_are_dropped():
    data = t11_data()
    polluted = np.concatenate([data, np.zeros(50), -np.ones(5), [np.nan, np.inf]])
    assert fit_power_law(polluted) == fit_power_law(data)


@pytest.mark.parametrize("data", [[], [1.0], [2.0, 2.0, 2.0], [0.0, -1.0, 3.0]])
def test_too_little_data_gives_an_empty_fit(data):
    fit = fit_power_law(data)
    assert math.isnan(fit.alpha) and math.isnan(fit.xmin) and math.isnan(fit.ks_distance)
    assert fit.n_tail == 0


def test_empty_xmin_window_gives_an_empty_fit():
    fit = fit_power_law(t11_data(), xmin_range=(1e6, None))
    assert math.isnan(fit.alpha) and fit.n_tail == 0


def test_two_distinct_values_fit():
    fit = fit_power_law([1.0, 2.0])  # one candidate, tail {1, 2}: α = 1 + 2/ln 2
    assert fit.alpha == pytest.approx(1 + 2 / math.log(2))
    assert fit.n_tail == 2
