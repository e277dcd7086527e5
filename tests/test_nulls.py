"""Honest nulls (issue 13, RMT.md §11): the diagnostics behind `null_ok`, biwhitening, the permutation null, and the
issue's targets on seeded simulated matrices (the big shapes are `slow`; bench/bench_nulls.py measures the rates
over many more seeds)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from spectral.analysis import Settings, analyze_spectrum
from spectral.diagnostics import (
    entry_statistics,
    kurtosis_limit,
    left_outlier_limit,
    null_failures,
    shape_ks_limit,
    spectrum_fit,
    spread_limit,
)
from spectral.matrices import MatrixInfo
from spectral.mp import mp_quantiles, upper_edge_location_scale
from spectral.nulls import (
    NULLS,
    PermutationNull,
    biwhitened_spectrum,
    permutation_null,
    shrink_scaling,
    sinkhorn_scaling,
)
from spectral.tracy_widom import tw1_mean, tw1_ppf, tw1_std
from spectral.workspace import matrix_spectrum, null_spectrum
from tests.rmt_oracles import simulate, spiked

T99 = float(tw1_ppf(0.99))


def reports(W, nulls=NULLS, seed=0):
    """The analysis row of W under each null, through the engine's per-matrix functions."""
    w = torch.from_numpy(np.asarray(W, dtype=np.float64))
    spectrum = matrix_spectrum(w, MatrixInfo("w", tuple(w.shape), "other"))
    return {null: analyze_spectrum(null_spectrum(spectrum, w, null, seed=seed), Settings(null=null))
            for null in nulls}


# ------------------------------------------------------------------------------------------------- diagnostics

def test_entry_statistics_match_a_direct_computation():
    rng = np.random.default_rng(0)
    W = rng.standard_t(6, (37, 53)) * rng.gamma(2.0, 0.5, 53)[None, :] + 0.3
    e = entry_statistics(torch.from_numpy(W), chunk_elements=100)  # 2 rows per chunk: chunking is exact
    x2 = W**2
    rows, cols = x2.mean(axis=1), x2.mean(axis=0)
    assert e.mean_square == pytest.approx(x2.mean())
    assert e.row_cv == pytest.approx(rows.std() / rows.mean())
    assert e.col_cv == pytest.approx(cols.std() / cols.mean())
    # one-way ANOVA of the squared entries by row: between-row variance of the means against Var(x²)/cols
    assert e.row_spread == pytest.approx(math.sqrt(rows.var() / (x2.var() / 53)))
    assert e.col_spread == pytest.approx(math.sqrt(cols.var() / (x2.var() / 37)))
    assert e.excess_kurtosis == pytest.approx(stats.kurtosis(W.ravel(), fisher=True, bias=True))
    assert entry_statistics(torch.from_numpy(W).float()).excess_kurtosis == pytest.approx(e.excess_kurtosis, rel=1e-5)


def test_spread_is_about_one_for_exchangeable_entries_whatever_their_tails():
    # shuffling the entries of a profiled matrix makes them exchangeable: the spread drops to the i.i.d. value
    W = simulate("colprof", 300, 600, 1)
    profiled = entry_statistics(torch.from_numpy(W))
    shuffled = entry_statistics(torch.from_numpy(np.random.default_rng(2).permutation(W.ravel()).reshape(W.shape)))
    heavy = entry_statistics(torch.from_numpy(simulate("t3", 300, 600, 3)))
    # Gamma(4, 1/4) column variances: CV² of the column mean squares ≈ 1/4 + (κ+2)/rows, κ = 3·1.25 − 3 = 0.75
    assert profiled.col_cv == pytest.approx(math.sqrt(0.25 + 2.75 / 300), rel=0.15)
    # spread² = n·Var(c_j)/Var(x²) ≈ 1 + (1/4)·rows/(κ+2): the profile's variance over the sampling variance
    assert profiled.col_spread == pytest.approx(math.sqrt(1 + 0.25 * 300 / 2.75), rel=0.15)
    assert profiled.col_spread > 3 * spread_limit(600)
    assert profiled.excess_kurtosis == pytest.approx(0.75, abs=0.15)
    for e in (shuffled, heavy):
        assert 0.8 < e.row_spread < 1.2 and 0.8 < e.col_spread < 1.2
    assert heavy.excess_kurtosis > 10 * kurtosis_limit(300, 600)


def test_spectrum_fit_counts_both_sides_and_measures_the_whole_spectrum():
    # 100 eigenvalues at the unit-MP midpoint quantiles (q = 0.25: bulk [0.25, 2.25]) with 3 moved above λ₊ and
    # 5 below λ₋: the whole-spectrum KS distance is at least the 5% moved below
    M, N = 100, 400
    lam = mp_quantiles(0.25, (np.arange(M) + 0.5) / M)
    lam[-3:] = [2.5, 3.0, 4.0]
    lam[:5] = [0.05, 0.1, 0.12, 0.15, 0.2]
    fit = spectrum_fit(lam, N, M, 1.0)
    assert fit.frac_above == pytest.approx(0.03) and fit.n_below == 5 and fit.frac_below == pytest.approx(0.05)
    assert fit.ks_whole == pytest.approx(0.05, abs=1e-9)  # F = 0 up to λ₋ while 5 of 100 lie there
    clean = spectrum_fit(mp_quantiles(0.25, (np.arange(M) + 0.5) / M), N, M, 1.0)
    assert clean.ks_whole == pytest.approx(0.5 / M, abs=1e-9) and clean.n_below == 0
    assert spectrum_fit(lam, 100, 100, 1.0).n_below == 0  # square: no soft lower edge (RMT.md §2.6)


def test_null_failures_name_the_diagnostic_and_its_size():
    heavy = entry_statistics(torch.from_numpy(simulate("t3", 200, 400, 0)))
    profiled = entry_statistics(torch.from_numpy(simulate("rowprof", 200, 400, 0)))
    clean = entry_statistics(torch.from_numpy(simulate("gauss", 200, 400, 0)))
    [tails] = null_failures(heavy, None, 200)
    assert tails.startswith("heavy-tailed entries: excess kurtosis") and f"> {kurtosis_limit(200, 400):.3g}" in tails
    [profile] = null_failures(profiled, None, 200)
    assert profile.startswith("row variance profile") and f"{profiled.row_spread:.3g}x" in profile
    assert null_failures(clean, None, 200) == []
    assert null_failures(heavy, None, 200, tails=False) == []
    fit = spectrum_fit(mp_quantiles(0.5, (np.arange(200) + 0.5) / 200) * np.r_[np.full(10, 0.5), np.ones(190)],
                       400, 200, 1.0)
    assert any(f.startswith("left outliers: 10 eigenvalues") for f in null_failures(None, fit, 200))
    assert null_failures(None, fit, 200, shape=False) == []


def test_limits_are_floors_or_multiples_of_the_iid_spread():
    assert kurtosis_limit(10, 10) == pytest.approx(8 * math.sqrt(24 / 100))
    assert kurtosis_limit(1000, 1000) == 2.0
    assert spread_limit(10) == pytest.approx(1 + 6 / math.sqrt(18)) and spread_limit(5000) == 1.5
    assert left_outlier_limit(100) == 4 and left_outlier_limit(4000) == 20
    assert shape_ks_limit(100) == pytest.approx(0.06) and shape_ks_limit(1000) == 0.02


# ----------------------------------------------------------------------------------------------------- biwhitening

def test_sinkhorn_equalises_row_and_column_mean_squares():
    W = simulate("colprof", 60, 90, 4) * np.sqrt(np.random.default_rng(5).gamma(2.0, 0.5, 60))[:, None]
    d1, d2, iterations, converged = sinkhorn_scaling(torch.from_numpy(W))
    scaled = (W * d1.numpy()[:, None] * d2.numpy()[None, :]) ** 2
    assert converged and iterations < 100
    np.testing.assert_allclose(scaled.mean(axis=1), (W**2).mean(), rtol=1e-5)
    np.testing.assert_allclose(scaled.mean(axis=0), (W**2).mean(), rtol=1e-5)
    assert (d1 > 0).all() and (d2 > 0).all()


def test_biwhitening_keeps_the_rank_and_leaves_zero_lines_alone():
    rng = np.random.default_rng(6)
    low_rank = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 70))
    low_rank[7] = 0.0
    b = biwhitened_spectrum(torch.from_numpy(low_rank))
    assert b.zero_lines == 1
    assert b.singular_values[2] > 1e-3 * b.singular_values[0]
    assert np.all(b.singular_values[3:] < 1e-9 * b.singular_values[0])  # rank 3 survives diagonal scaling


def test_scalings_shrink_by_the_share_of_spread_that_sampling_explains():
    d = torch.tensor([0.5, 1.0, 2.0, 0.0])
    np.testing.assert_allclose(shrink_scaling(d, 2.0).numpy(), [0.5**0.75, 1.0, 2.0**0.75, 0.0])  # F = 4: weight 3/4
    np.testing.assert_allclose(shrink_scaling(d, 0.9).numpy(), [1.0, 1.0, 1.0, 0.0])  # no excess spread: no scaling
    # i.i.d. noise keeps its spectrum (the row norms' own sampling spread is not "corrected" away)
    W = simulate("gauss", 200, 600, 12)
    b = biwhitened_spectrum(torch.from_numpy(W))
    ratio = b.singular_values / np.linalg.svd(W, compute_uv=False)
    assert np.max(np.abs(ratio - 1)) < 0.01


def test_biwhitening_leaves_the_spread_that_detected_signal_explains():
    # two strong spikes in a small matrix spread the row norms (F ≈ 1 + 2Σθ⁴N/((κ+2)·n·m²)); given W's singular
    # values the scaling knows that share and leaves the spikes as they are, without it it shrinks them
    W = simulate("gauss", 100, 400, 13) + spiked(100, 400, [4.0, 6.0], seed=14) - spiked(100, 400, seed=14)
    s = np.linalg.svd(W, compute_uv=False)
    informed = biwhitened_spectrum(torch.from_numpy(W), s)
    blind = biwhitened_spectrum(torch.from_numpy(W))
    assert abs(informed.singular_values[1] / s[1] - 1) < 0.01
    assert abs(blind.singular_values[1] / s[1] - 1) > abs(informed.singular_values[1] / s[1] - 1)


def test_an_exact_rank_one_variance_profile_is_undone():
    # W = diag(a) Z diag(b): biwhitening recovers Z up to a scalar, so its spectrum is Z's, while the profiled
    # spectrum reports false signal under MP
    rng = np.random.default_rng(7)
    Z = rng.standard_normal((200, 600))
    W = np.sqrt(rng.gamma(4, 0.25, 200))[:, None] * Z * np.sqrt(rng.gamma(4, 0.25, 600))[None, :]
    b = biwhitened_spectrum(torch.from_numpy(W))
    s_z = np.linalg.svd(Z, compute_uv=False)
    ratio = b.singular_values / s_z
    assert ratio.std() / ratio.mean() < 0.02
    rows = reports(W, ("mp", "biwhitened"))
    assert rows["mp"].n_signal > 0 and not rows["mp"].null_ok
    assert rows["biwhitened"].n_signal == 0 and rows["biwhitened"].null_ok


# ----------------------------------------------------------------------------------------------------- permutation

def test_permutation_null_fits_tracy_widom_by_its_first_two_moments():
    top = np.array([2.30, 2.31, 2.29, 2.33, 2.28])
    null = PermutationNull(5, 0, top, top - 2.0, np.ones(5))
    mu, scale = null.upper()
    assert scale == pytest.approx(top.std(ddof=1) / tw1_std())
    assert mu + tw1_mean() * scale == pytest.approx(top.mean())  # the fitted TW1 law has the shuffles' mean
    lo_mu, lo_scale = null.lower()
    assert lo_mu - tw1_mean() * lo_scale == pytest.approx((top - 2.0).mean())
    np.testing.assert_allclose(null.p_values([2.5, 2.30, 2.0]), [1 / 6, 4 / 6, 1.0])


def test_permutation_null_is_seeded_and_pure():
    W = torch.from_numpy(simulate("t5", 64, 160, 8))
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    a = permutation_null(W, s, shuffles=4, seed=1)
    b = permutation_null(W.clone(), s, shuffles=4, seed=1)
    c = permutation_null(W, s, shuffles=4, seed=2)
    np.testing.assert_array_equal(a.top, b.top)
    assert not np.array_equal(a.top, c.top)
    with pytest.raises(ValueError, match="at least 2"):
        permutation_null(W, s, shuffles=1)


def test_permutation_edge_on_gaussian_noise_is_the_tracy_widom_edge():
    W = simulate("gauss", 200, 800, 9)
    s = np.linalg.svd(W, compute_uv=False)
    null = permutation_null(torch.from_numpy(W), s, shuffles=32, seed=9)
    mu, scale = null.upper()
    mu_mp, scale_mp = upper_edge_location_scale(800, 200, 1.0)
    assert abs(mu - mu_mp) < 2 * scale_mp  # RMT.md T4: canonical centring is within ~0.15 TW scales at this size
    assert 0.6 < scale / scale_mp < 1.6
    assert np.all(np.abs(null.scale - 1.0) < 0.01)  # a shuffle of pure noise has W's bulk


def test_z_scores_keep_the_99_percent_rule_under_every_null():
    W = simulate("spikes", 300, 1200, 11)
    for null, r in reports(W).items():
        assert r.n_signal == int(np.count_nonzero(r.z_scores > T99)), null
        assert r.null == null and r.edge_upper > 0
    perm = reports(W, ("permutation",))["permutation"]
    assert perm.shuffles == 32 and perm.p_values is not None
    assert np.all(perm.p_values[:2] == 1 / 33)  # the two strong spikes lie above every shuffle's largest


# ------------------------------------------------------------------------------------------ the issue's targets

def rate(kind, rows, cols, seeds, null, offset=0):
    return [reports(simulate(kind, rows, cols, offset + seed), (null,), seed=seed)[null] for seed in range(seeds)]


@pytest.mark.parametrize("kind", ["colprof", "rowprof"])
def test_biwhitened_null_removes_variance_profile_false_positives(kind):
    mp = rate(kind, 200, 400, 30, "mp")
    biwhitened = rate(kind, 200, 400, 30, "biwhitened")
    assert all(not r.null_ok for r in mp) and np.mean([r.n_signal > 0 for r in mp]) > 0.5
    assert sum(r.n_signal > 0 for r in biwhitened) <= 1  # ≤ 3% of 30
    assert all(r.null_ok for r in biwhitened)


@pytest.mark.parametrize("kind", ["t3", "t5"])
def test_permutation_null_removes_heavy_tail_false_positives(kind):
    mp = rate(kind, 128, 512, 30, "mp", offset=100)
    permutation = rate(kind, 128, 512, 30, "permutation", offset=100)
    assert all(not r.null_ok for r in mp)
    assert sum(r.n_signal > 0 for r in permutation) <= 1  # ≤ 3% of 30
    assert all(r.null_ok for r in permutation)


def test_mp_null_flags_none_of_ten_iid_matrices_with_or_without_spikes():
    for seed in range(10):
        for kind in ("gauss", "spikes"):
            r = reports(simulate(kind, 300, 1200, 200 + seed), ("mp",))["mp"]
            assert r.null_ok, (kind, seed, r.warnings)


@pytest.mark.slow
def test_issue_shapes_mp_flags_every_failing_case_and_no_iid_one():
    for seed in range(3):
        for kind, rows, cols in [("colprof", 1000, 2000), ("rowprof", 1000, 2000), ("t3", 512, 2048),
                                 ("t5", 512, 2048)]:
            r = reports(simulate(kind, rows, cols, 300 + seed), ("mp",))["mp"]
            assert not r.null_ok, (kind, seed)
    for seed in range(10):
        assert reports(simulate("gauss", 1000, 2000, 400 + seed), ("mp",))["mp"].null_ok


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["colprof", "rowprof"])
def test_issue_shapes_biwhitened_false_positives(kind):
    # the issue's shape: at most one of 20 seeds with any false signal (the rate over many seeds: bench_nulls.py)
    rows = rate(kind, 1000, 2000, 20, "biwhitened", offset=500)
    assert sum(r.n_signal > 0 for r in rows) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["t3", "t5"])
def test_issue_shapes_permutation_false_positives(kind):
    # the issue's shape, 10 seeds of 32 shuffles each (the rate over many seeds: bench_nulls.py)
    rows = rate(kind, 512, 2048, 10, "permutation", offset=600)
    assert sum(r.n_signal > 0 for r in rows) <= 1


@pytest.mark.slow
def test_issue_shapes_all_three_nulls_find_three_planted_spikes():
    # 10 seeds under mp and biwhitened, the first 5 of them under permutation (32 shuffles of 1000×2000 each)
    found, tried = {null: 0 for null in NULLS}, {null: 0 for null in NULLS}
    for seed in range(10):
        nulls = NULLS if seed < 5 else ("mp", "biwhitened")
        for null, r in reports(simulate("spikes", 1000, 2000, 700 + seed), nulls, seed=seed).items():
            found[null] += r.n_signal >= 3
            tried[null] += 1
    assert all(found[null] >= 0.9 * tried[null] for null in NULLS), (found, tried)
