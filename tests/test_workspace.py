"""Workspace plumbing (issue 13 item 5): the pure per-matrix functions a distributed map calls, null spectra computed
once and cached, quantisation facts copied into rows, sub-matrix progress."""
import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectral.analysis import Settings
from spectral.checkpoint import load_checkpoint
from spectral.matrices import MatrixInfo
from spectral.nulls import DEFAULT_SHUFFLES
from spectral.spectra import singular_values
from spectral.workspace import NonFiniteMatrix, Workspace, matrix_spectrum, null_spectrum
from tests.rmt_oracles import spiked


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ws") / "model.safetensors"
    bad = torch.randn(64, 96)
    bad[0, 0] = float("inf")
    save_file({"tok_emb.weight": torch.from_numpy(spiked(300, 120, [3.0], sigma=0.02, seed=1)).float(),
               "blocks.0.mlp.c_fc.weight": torch.from_numpy(spiked(240, 120, seed=2)).float(),
               "blocks.0.attn.c_proj.weight": bad}, str(path))
    return path


def test_matrix_spectrum_is_what_the_workspace_caches(checkpoint_path):
    ws = Workspace.open(checkpoint_path)
    info = ws.info("tok_emb.weight")
    spectrum = matrix_spectrum(ws.weight(info.name), info)
    cached = ws.spectra()[info.name]
    np.testing.assert_array_equal(spectrum.singular_values, cached.singular_values)
    assert spectrum.entries == cached.entries and spectrum.entries is not None
    np.testing.assert_allclose(spectrum.singular_values, singular_values(ws.weight(info.name)))
    assert ws.skipped == [{"name": "blocks.0.attn.c_proj.weight", "reason": "1 NaN/Inf values: matrix skipped"}]


def test_spectra_with_truncations_match_the_spectra_route_and_leave_the_factors_ready(checkpoint_path):
    """One eigendecomposition gives what-ifs both: the singular values equal the eigenvalues-only route's to
    rounding (and a float64 SVD's), the entry statistics are the same, the NaN matrix is skipped with the same
    reason, and every finite matrix's truncation factors are already in memory."""
    plain = Workspace(load_checkpoint(str(checkpoint_path)), cache=None)  # no disk cache: each computes its own
    both = Workspace(load_checkpoint(str(checkpoint_path)), cache=None)
    expected, found = plain.spectra(), both.spectra_with_truncations()
    assert found.keys() == expected.keys() and len(found) == 2
    for name, spectrum in found.items():
        np.testing.assert_allclose(spectrum.singular_values, expected[name].singular_values, rtol=1e-12, atol=1e-12)
        exact = np.linalg.svd(plain.weight(name).double().numpy(), compute_uv=False)
        np.testing.assert_allclose(spectrum.singular_values, exact, rtol=1e-9)
        # equal to rounding: float64 sums run in another order with another thread count (spectral/threads.py)
        assert dataclasses.asdict(spectrum.entries) == pytest.approx(dataclasses.asdict(expected[name].entries),
                                                                     rel=1e-12, abs=1e-15)
        assert both.has_truncation(name)
    assert both.skipped == plain.skipped
    assert not both.has_truncation("blocks.0.attn.c_proj.weight")


def test_matrix_spectrum_refuses_non_finite_matrices_with_the_skip_reason():
    w = torch.ones(10, 20)
    w[1, 2] = float("nan")
    w[3, 4] = float("-inf")
    with pytest.raises(NonFiniteMatrix, match="2 NaN/Inf values"):
        matrix_spectrum(w, MatrixInfo("w", (10, 20), "other"))


def test_matrix_spectrum_takes_another_devices_singular_values():
    w = torch.from_numpy(spiked(40, 90, seed=3))
    calls = []

    def svd(matrix):
        calls.append(matrix.shape)
        return torch.linalg.svdvals(matrix.double()).numpy()

    spectrum = matrix_spectrum(w, MatrixInfo("w", (40, 90), "other"), svd=svd)
    assert calls == [(40, 90)]
    np.testing.assert_allclose(spectrum.singular_values, singular_values(w), rtol=1e-10)


def test_null_spectrum_adds_to_a_new_object_and_leaves_the_cached_one_alone():
    w = torch.from_numpy(spiked(60, 150, [3.0], seed=4))
    base = matrix_spectrum(w, MatrixInfo("w", (60, 150), "other"))
    biw = null_spectrum(base, w, "biwhitened")
    perm = null_spectrum(base, w, "permutation", shuffles=3, seed=5)
    assert base.biwhitened is None and base.permutation is None
    assert biw.biwhitened is not None and biw.permutation is None
    assert perm.permutation.shuffles == 3 and perm.permutation.seed == 5
    assert null_spectrum(biw, w, "biwhitened") is biw  # already there: nothing recomputed
    with pytest.raises(ValueError, match="unknown null"):
        null_spectrum(base, w, "bootstrap")


def test_default_analysis_computes_no_null_and_other_nulls_are_cached(checkpoint_path):
    ws = Workspace.open(checkpoint_path)
    ws.analyze()
    assert all(sp.biwhitened is None and sp.permutation is None for sp in ws.spectra().values())
    first = ws.analyze(Settings(null="biwhitened"))
    kept = {name: sp.biwhitened for name, sp in ws.spectra().items()}
    assert all(b is not None for b in kept.values())
    again = ws.analyze(Settings(null="biwhitened", confidence=0.9))  # new settings, same null: no new Sinkhorn
    assert all(ws.spectra()[name].biwhitened is b for name, b in kept.items())
    assert {r.null for r in first.matrices + again.matrices} == {"biwhitened"}
    perm = ws.analyze(Settings(null="permutation"))
    assert all(r.shuffles == DEFAULT_SHUFFLES for r in perm.matrices)
    assert ws.analyze(Settings(null="permutation")) is perm


def test_quantisation_facts_are_copied_into_rows(checkpoint_path):
    ck = load_checkpoint(str(checkpoint_path))
    ck.quantization = {"tok_emb.weight": ("Q4_K", 0.0012)}  # the field the GGUF reader fills (coordination.md)
    rows = {r.name: r for r in Workspace(ck).analyze().matrices}
    assert (rows["tok_emb.weight"].quant, rows["tok_emb.weight"].quant_sigma) == ("Q4_K", 0.0012)
    assert rows["blocks.0.mlp.c_fc.weight"].quant is None and rows["blocks.0.mlp.c_fc.weight"].quant_sigma is None
    d = rows["tok_emb.weight"].to_dict()
    assert d["quant"] == "Q4_K" and d["quant_sigma"] == 0.0012


def test_progress_reports_every_matrix_and_finishes(checkpoint_path):
    calls = []
    Workspace.open(checkpoint_path).analyze(Settings(null="biwhitened"),
                                            progress=lambda i, n, label: calls.append((i, n, label)))
    labels = " | ".join(label for *_, label in calls)
    assert "tok_emb.weight" in labels and "biwhitened null: blocks.0.mlp.c_fc.weight" in labels
    assert calls[-1][0] == calls[-1][1]


def test_spectrum_fields_keep_the_positional_constructor():
    # tests and views build Spectrum(name, shape, role, tied_with, s): the new fields are optional
    from spectral.analysis import Spectrum, analyze_spectrum

    s = singular_values(torch.from_numpy(spiked(100, 300, [3.0], seed=6)))
    report = analyze_spectrum(Spectrum("w", (100, 300), "other", (), s))
    assert report.null == "mp" and report.row_spread is None and report.excess_kurtosis is None
    assert report.frac_above is not None and report.n_signal == 1
    assert dataclasses.replace(Spectrum("w", (100, 300), "other", (), s)).entries is None


def test_spectra_run_side_by_side_with_progress_in_the_callers_thread(checkpoint_path, monkeypatch):
    """Small matrices go to single-threaded workers (largest first), a matrix over its share of the memory bound runs
    alone; the spectra equal one-at-a-time's to rounding, the NaN matrix is skipped with its reason, and every
    progress call comes from the calling thread, counting up to the end."""
    import threading

    import spectral.workspace as workspace

    ws = Workspace(load_checkpoint(str(checkpoint_path)), cache=None)
    infos = {m.name: m for m in ws.matrices}
    bound = workspace.working_bytes(infos["blocks.0.mlp.c_fc.weight"])
    assert workspace.working_bytes(infos["tok_emb.weight"]) > bound
    monkeypatch.setattr(workspace, "CONCURRENT_BYTES", 2 * bound)  # two workers: `bound` each
    assert workspace.concurrent_split(ws.matrices, 1) == ([], ws.matrices)  # one worker: all alone, in order
    assert workspace.concurrent_split(ws.matrices, 2) == ([], ws.matrices)  # all under CONCURRENT_MIN_ENTRIES
    monkeypatch.setattr(workspace, "CONCURRENT_MIN_ENTRIES", 0)
    together, alone = workspace.concurrent_split(ws.matrices, 2)
    assert [m.name for m in alone] == ["tok_emb.weight"]
    assert [m.name for m in together] == ["blocks.0.mlp.c_fc.weight", "blocks.0.attn.c_proj.weight"]
    monkeypatch.setattr(workspace, "worker_count", lambda: 2)
    caller, calls = threading.current_thread(), []
    found = ws.spectra(progress=lambda i, n, label: calls.append((i, n, threading.current_thread() is caller)))
    assert all(here for *_, here in calls) and calls[-1][:2] == (3, 3)
    assert [i for i, *_ in calls] == sorted(i for i, *_ in calls)
    assert ws.skipped == [{"name": "blocks.0.attn.c_proj.weight", "reason": "1 NaN/Inf values: matrix skipped"}]
    one_by_one = Workspace(load_checkpoint(str(checkpoint_path)), cache=None)
    monkeypatch.setattr(workspace, "worker_count", lambda: 1)
    for name, spectrum in one_by_one.spectra().items():
        np.testing.assert_allclose(found[name].singular_values, spectrum.singular_values, rtol=1e-12)
