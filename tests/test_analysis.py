"""analyze_spectrum against RMT.md §9: signal rank, z-scores, edges, left outliers, energy rank and the summary."""
import math

import numpy as np
import pytest
import torch

from spectral.analysis import (
    Settings,
    Spectrum,
    analyze_spectrum,
    factorised_params,
    summarize,
)
from spectral.spectra import singular_values
from tests.rmt_oracles import spiked


def spectrum_of(W, name="w", role="other"):
    return Spectrum(name, W.shape, role, (), singular_values(torch.from_numpy(np.asarray(W))))


@pytest.fixture(scope="module")
def t5_spiked():
    return spectrum_of(spiked(1000, 4000, [0.5, 1.0, 1.5, 2.0, 3.0], seed=2))


def test_pure_noise_has_no_signal_and_sigma_one():
    report = analyze_spectrum(spectrum_of(spiked(1000, 4000, seed=2)))
    assert report.n_signal == 0
    assert abs(report.sigma - 1) < 0.005
    assert report.ks_distance < 0.01
    assert report.n_below == 0


@pytest.mark.parametrize("confidence", [0.90, 0.95, 0.99])
def test_t5_spiked_matrix_has_signal_rank_four(t5_spiked, confidence):
    report = analyze_spectrum(t5_spiked, Settings(confidence=confidence))
    assert report.n_signal == 4
    assert abs(report.sigma - 1.00165) < 0.005


def test_t5_top_z_scores_match_rmt_md(t5_spiked):
    report = analyze_spectrum(t5_spiked, Settings(confidence=0.9))
    # RMT.md T5: canonical z with BEMA σ̂² = 1.003299 → [921.53, 347.79, 158.23, 26.50, −1.37, ...]
    np.testing.assert_allclose(report.z_scores[:4], [921.53, 347.79, 158.23, 26.50], rtol=0.01)
    assert report.z_max == pytest.approx(report.z_scores[0])
    assert -3 < report.z_scores[4] < 0


def test_edge_upper_is_the_tw_threshold_in_singular_value_units(t5_spiked):
    report = analyze_spectrum(t5_spiked, Settings(confidence=0.9))
    N = 4000
    # RMT.md T2: γ₊(0.90) = 2.253865 σ̂² at 1000×4000 (σ = 1)
    expected = math.sqrt(N * 2.253865 * report.sigma**2)
    assert report.edge_upper == pytest.approx(expected, rel=1e-5)
    s = t5_spiked.singular_values
    assert report.n_signal == int(np.sum(s > report.edge_upper))


def test_transposed_matrix_gives_the_same_report(t5_spiked):
    W = spiked(1000, 4000, [0.5, 1.0, 1.5, 2.0, 3.0], seed=2)
    a = analyze_spectrum(t5_spiked)
    b = analyze_spectrum(spectrum_of(W.T))
    assert b.n_signal == a.n_signal and b.sigma == pytest.approx(a.sigma, rel=1e-9)


def test_left_outliers_of_a_short_side_covariance_spike_are_counted():
    # RMT.md T9: 4000×1000, W = Z·diag(√ℓ) with ℓ₁..₃ = 0.05, 0.1, 0.3 → 3 left outliers
    rng = np.random.default_rng(7)
    ell = np.ones(1000)
    ell[:3] = [0.05, 0.1, 0.3]
    W = rng.standard_normal((4000, 1000)) * np.sqrt(ell)
    report = analyze_spectrum(spectrum_of(W))
    assert report.n_below == 3
    assert report.edge_lower is not None and report.edge_lower < np.sort(singular_values(torch.from_numpy(W)))[3]


def test_additive_spikes_create_no_left_outliers():
    # RMT.md T14: noise plus a rank-1 θ = 10 spike, 4000×1000
    report = analyze_spectrum(spectrum_of(spiked(4000, 1000, [10.0], seed=7)))
    assert report.n_below == 0
    assert report.n_signal == 1


def test_square_matrices_have_no_lower_edge():
    report = analyze_spectrum(spectrum_of(spiked(300, 300, [2.0, 3.0], seed=4)))
    assert report.edge_lower is None and report.n_below == 0
    assert report.n_signal == 2


def test_energy_rank_and_norms_follow_the_t10_oracle():
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    V = np.linalg.qr(rng.standard_normal((8, 5)))[0]
    W = (U * [4, 3, 2, 1, 0.5]) @ V.T
    report = analyze_spectrum(spectrum_of(W), Settings(energy=0.99))
    assert report.energy_rank == 4 and report.utilization == pytest.approx(4 / 5)
    assert report.spectral_norm == pytest.approx(4) and report.frobenius_norm == pytest.approx(5.5)
    assert report.participation_ratio == pytest.approx(2.584466, abs=1e-6)
    assert report.stable_rank == pytest.approx(1.890625)
    assert report.effective_rank == pytest.approx(4.097401, abs=1e-6)
    assert any("low confidence" in w for w in report.warnings)


def test_summary_counts_factorised_parameters_capped_at_dense():
    assert factorised_params((100, 400), 10) == 10 * 500
    assert factorised_params((100, 400), 90) == 100 * 400  # 90·500 > 40,000: dense is cheaper
    r = analyze_spectrum(spectrum_of(spiked(200, 800, [3.0, 4.0], seed=1)))
    summary = summarize([r, r], 1.0, [])
    assert summary["matrix_params"] == 2 * 200 * 800
    assert summary["params_kept_mp"] == 2 * factorised_params((200, 800), r.n_signal)
    assert summary["params_kept_energy"] == 2 * factorised_params((200, 800), r.energy_rank)


def test_settings_reject_nonsense():
    with pytest.raises(ValueError, match="estimator"):
        Settings(estimator="magic")
    with pytest.raises(ValueError, match="confidence"):
        Settings(confidence=1.0)


def test_rows_carry_the_null_and_its_diagnostics():
    report = analyze_spectrum(spectrum_of(spiked(1000, 4000, seed=2)))
    d = report.to_dict()
    assert d["null"] == "mp" and d["null_ok"] is True
    assert "z_scores" not in d and "p_values" not in d
    # pure noise: at most a TW fluctuation outside the fitted bulk, and the whole spectrum fits as well as the bulk
    assert d["frac_above"] <= 0.002 and d["frac_below"] <= 0.002
    assert d["ks_whole"] < 0.01
    assert d["row_spread"] is None  # no entry statistics without W (Spectrum built from singular values only)


def test_other_nulls_need_their_spectra():
    spectrum = spectrum_of(spiked(100, 300, seed=1))
    with pytest.raises(ValueError, match="biwhitened_spectrum"):
        analyze_spectrum(spectrum, Settings(null="biwhitened"))
    with pytest.raises(ValueError, match="permutation_null"):
        analyze_spectrum(spectrum, Settings(null="permutation"))
    with pytest.raises(ValueError, match="null"):
        Settings(null="bootstrap")


def test_role_table_names_the_null_and_counts_matrices_it_does_not_fit():
    from spectral.analysis import Analysis, role_table
    from spectral.matrices import MatrixInfo
    from spectral.workspace import matrix_spectrum

    rng = np.random.default_rng(3)
    heavy = torch.from_numpy(rng.standard_t(3, (200, 400)))
    clean = torch.from_numpy(spiked(200, 400, seed=3))
    rows = [analyze_spectrum(matrix_spectrum(w, MatrixInfo(name, (200, 400), "mlp_up")))
            for name, w in (("a", heavy), ("b", clean))]
    [row] = role_table(Analysis({}, Settings(), rows, {}))
    assert row["null"] == "mp" and row["null_failed"] == 1 and row["matrices"] == 2


def test_broadening_is_flagged_when_it_disagrees_with_bema_and_the_median():
    # the demo's tied embedding (2048×128): the trimmed broadening fit lands far below BEMA and the median
    from spectral.workspace import Workspace

    spectrum = Workspace.open("demo").spectra()["tok_emb.weight"]
    report = analyze_spectrum(spectrum, Settings(estimator="broadening"))
    assert any(w.startswith("broadening disagrees") for w in report.warnings)
    assert not any(w.startswith("broadening disagrees") for w in analyze_spectrum(spectrum).warnings)
    noise = analyze_spectrum(spectrum_of(spiked(300, 900, [3.0], seed=4)), Settings(estimator="broadening"))
    assert not any(w.startswith("broadening disagrees") for w in noise.warnings)
