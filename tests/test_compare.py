"""Two checkpoints compared (spectral/compare.py): exact zero change for identical weights, ΔW's spectrum against
an independent SVD, planted low-rank updates found over seeds, principal angles against known rotations and
scipy, name matching, the JSON contract, the CLI's exit codes, the what-if across a pair, and the Compare page."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save, save_file
from streamlit.testing.v1 import AppTest

from models.gpt import GPTConfig
from spectral import cli
from spectral.analysis import Settings
from spectral.checkpoint import load_checkpoint, load_checkpoint_bytes
from spectral.compare import (
    CompareError,
    PairComparer,
    compare,
    comparer,
    delta_report,
    evaluate_pair,
    match_matrices,
    pair_runtimes,
    principal_angles_deg,
    top_singular_vectors,
)
from spectral.compare_figures import angle_curves, delta_bars, delta_histogram, overlay_histogram
from spectral.evaluation import position_metrics
from spectral.matrices import find_matrices
from spectral.runtime import BatchSpec
from spectral.workspace import Workspace
from tests.tiny_models import save_tiny_gpt

ROOT = Path(__file__).resolve().parent.parent
registered = pytest.mark.skipif(not any(m.__name__ == "spectral.commands.compare" for m in cli.COMMANDS),
                                reason="`compare` is not registered in spectral/cli.py yet")


# ---------------------------------------------------------------------------------------------------- inputs

def nanogpt_state(seed: int, d: int = 128, vocab: int = 512, block: int = 256, n_layer: int = 3) -> dict:
    """A nanoGPT-style state dict (names transformer.*, Linear out × in): 3 blocks × 4 matrices + wte + wpe = 14
    weight matrices, lm_head tied to wte."""
    g = torch.Generator().manual_seed(seed)
    sd = {"transformer.wte.weight": torch.randn(vocab, d, generator=g) * 0.02,
          "transformer.wpe.weight": torch.randn(block, d, generator=g) * 0.02}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd[p + "attn.c_attn.weight"] = torch.randn(3 * d, d, generator=g) * 0.02
        sd[p + "attn.c_proj.weight"] = torch.randn(d, d, generator=g) * 0.02
        sd[p + "mlp.c_fc.weight"] = torch.randn(4 * d, d, generator=g) * 0.02
        sd[p + "mlp.c_proj.weight"] = torch.randn(d, 4 * d, generator=g) * 0.02
        sd[p + "ln_1.weight"] = torch.ones(d)
    return sd


def planted_update(state: dict, seed: int, planted: set[str], *, rank: int = 4, noise: float = 0.002,
                   strength: float = 6.0) -> dict:
    """A fine-tune-like B: i.i.d. noise of std `noise` added to every matrix, and a rank-`rank` update with singular
    values `strength`..2·`strength` times the noise's MP edge σ(√m + √n) (RMT.md §2) on the `planted` ones."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for name, w in state.items():
        if w.ndim != 2:
            out[name] = w.clone()
            continue
        m, n = w.shape
        b = w + noise * torch.randn(m, n, generator=g)
        if name in planted:
            u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g))
            v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
            theta = noise * (m ** 0.5 + n ** 0.5) * strength * torch.linspace(1.0, 2.0, rank)
            b = b + u @ torch.diag(theta) @ v.T
        out[name] = b
    return out


def as_checkpoint(state: dict, name: str):
    return load_checkpoint_bytes(save({k: v.contiguous() for k, v in state.items()}), name)


def matrix_names(state: dict) -> list[str]:
    return [k for k, v in state.items() if v.ndim == 2]


# ------------------------------------------------------------------------------------------- exact zero change

def test_identical_checkpoints_compare_to_exactly_zero_change(tmp_path):
    a = save_tiny_gpt(tmp_path / "a.safetensors", seed=0)
    b = tmp_path / "b.safetensors"
    b.write_bytes(a.read_bytes())
    for other in (a, b):
        result = compare(Workspace.open(a), Workspace.open(other))
        assert result.matrices and result.identical
        for m in result.matrices:
            assert (m.delta.n_signal, m.delta.sigma, m.delta.relative_norm, m.delta.edge_upper) == (0, 0.0, 0.0, 0.0)
            assert all(v == 0 for v in m.change.values() if v is not None)
            assert m.subspace.angles_deg == (0.0,) * m.a.n_signal == m.subspace.angles_left_deg
            assert m.a.to_dict() == m.b.to_dict()


def test_one_unchanged_matrix_is_exactly_zero_among_changed_ones():
    a = nanogpt_state(0)
    b = dict(a)
    b["transformer.h.0.mlp.c_fc.weight"] = a["transformer.h.0.mlp.c_fc.weight"] + 0.01
    result = compare(as_checkpoint(a, "a.safetensors"), as_checkpoint(b, "b.safetensors"))
    changed = {m.name: m.delta.relative_norm for m in result.matrices if m.delta.relative_norm > 0}
    assert list(changed) == ["transformer.h.0.mlp.c_fc.weight"]
    # ‖ΔW‖_F / ‖W_A‖_F by hand: ΔW is 0.01 everywhere
    w = a["transformer.h.0.mlp.c_fc.weight"].double()
    assert changed["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(0.01 * w.numel() ** 0.5 / float(w.norm()),
                                                                       rel=1e-6)


# ------------------------------------------------------------------------------------------ the update's spectrum

def test_delta_spectrum_is_the_svd_of_the_difference_and_changes_are_b_minus_a():
    a, seed = nanogpt_state(1), 1
    b = planted_update(a, seed, {"transformer.h.1.attn.c_attn.weight"})
    result = compare(as_checkpoint(a, "a.safetensors"), as_checkpoint(b, "b.safetensors"))
    m = result.row("transformer.h.1.attn.c_attn.weight")
    expected = np.linalg.svd((b[m.name].double() - a[m.name].double()).numpy(), compute_uv=False)
    np.testing.assert_allclose(m.delta_spectrum.singular_values, expected, rtol=1e-7, atol=1e-12 * expected[0])
    for key, value in m.change.items():
        assert value == pytest.approx(getattr(m.b, key) - getattr(m.a, key))
    assert m.delta.n_signal == 4


@pytest.mark.slow
def test_a_planted_rank_4_update_on_6_of_14_matrices_is_found_over_seeds():
    """The issue's target: ΔW signal rank exactly 4 on the 6 planted matrices and 0 on the other 8 (which get the
    same noise). At the default c = 0.99 a pure-noise ΔW exceeds its TW edge with probability 1% by construction, so
    all 14 exact in one seed happens in 0.99⁸ ≈ 92% of seeds; per seed the target holds at c = 0.999, and per matrix
    at c = 0.99."""
    seeds = range(20)
    strict, lenient = Settings(confidence=0.999), Settings()
    exact_seeds, decisions, right = 0, 0, 0
    for seed in seeds:
        a = nanogpt_state(seed)
        names = matrix_names(a)
        assert len(names) == 14
        planted = set(np.random.default_rng(seed).choice(names, 6, replace=False))
        pair = comparer(as_checkpoint(a, "a.safetensors"), as_checkpoint(planted_update(a, seed, planted),
                                                                         "b.safetensors"))
        found = {name: d.n_signal for name, d in pair.deltas(strict).items()}
        exact_seeds += found == {n: 4 if n in planted else 0 for n in names}
        for name, d in pair.deltas(lenient).items():
            decisions += 1
            right += d.n_signal == (4 if name in planted else 0)
    assert exact_seeds >= 0.95 * len(seeds)
    assert right >= 0.95 * decisions


def test_an_exactly_low_rank_update_has_its_numerical_rank():
    """No bulk at all (ΔW = rank 3 exactly, no noise): σ̂ is 0 and the signal rank is ΔW's numerical rank."""
    a = nanogpt_state(2)
    g = torch.Generator().manual_seed(2)
    b = dict(a)
    name = "transformer.h.2.mlp.c_fc.weight"
    b[name] = a[name] + torch.randn(512, 3, generator=g) @ torch.randn(3, 128, generator=g) * 0.01
    m = compare(as_checkpoint(a, "a.safetensors"), as_checkpoint(b, "b.safetensors")).row(name)
    assert m.delta.n_signal == 3 and m.delta.sigma == 0.0


# ---------------------------------------------------------------------------------------------- principal angles

def test_principal_angles_of_planted_rotations_and_against_scipy():
    n, k = 40, 5
    theta = np.radians([0.0, 1e-4, 3.0, 45.0, 89.0])
    x = np.eye(n)[:, :k]
    y = np.cos(theta) * np.eye(n)[:, :k] + np.sin(theta) * np.eye(n)[:, k:2 * k]
    np.testing.assert_allclose(principal_angles_deg(x, y), np.degrees(theta), atol=1e-9)
    rng = np.random.default_rng(0)
    p, _ = np.linalg.qr(rng.standard_normal((n, 6)))
    q, _ = np.linalg.qr(p[:, :6] + 0.3 * rng.standard_normal((n, 6)))
    np.testing.assert_allclose(principal_angles_deg(p, q), np.sort(np.degrees(scipy.linalg.subspace_angles(p, q))),
                               atol=1e-9)


@pytest.mark.parametrize("syrk_route", [True, False])
def test_top_singular_vectors_span_the_svds_subspaces(syrk_route, monkeypatch):
    """Both ways of forming the float32 Gram matrix (BLAS ssyrk on a one-thread thread, torch's product else)."""
    from spectral import syrk

    monkeypatch.setattr(syrk, "on_this_thread", lambda: syrk_route)
    g = torch.Generator().manual_seed(3)
    for shape in ((300, 80), (80, 300)):
        w = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.02
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        w = w + 0.5 * u[:, :6] @ torch.diag(torch.linspace(1, 3, 6, dtype=torch.float64)) @ vh[:6]  # clear gap
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        for k in (1, 6):
            left, right = top_singular_vectors(w, k)
            assert max(principal_angles_deg(left, u[:, :k].numpy())) < 1e-3
            assert max(principal_angles_deg(right, vh[:k].T.numpy())) < 1e-3


def test_top_singular_vectors_from_a_kept_reduction_equal_the_svds():
    """The vectors a comparison takes from the Gram matrix's kept tridiagonal form are the SVD's: the short side's
    in float64 (to 1e-6 degrees), the other side by a float32 product."""
    from spectral.spectra import singular_values_and_reduction

    g = torch.Generator().manual_seed(4)
    for shape in ((300, 80), (80, 300)):
        w = torch.randn(*shape, generator=g) * 0.02
        u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
        w = (w.double() + 0.5 * u[:, :6] @ torch.diag(torch.linspace(1, 3, 6, dtype=torch.float64)) @ vh[:6]).float()
        u, s_exact, vh = torch.linalg.svd(w.double(), full_matrices=False)
        s, reduction = singular_values_and_reduction(w)
        assert reduction is not None
        np.testing.assert_allclose(s, s_exact.numpy(), rtol=1e-9)
        for k in (1, 6):
            left, right = top_singular_vectors(w, k, reduction)
            short, long = (left, right) if shape[0] <= shape[1] else (right, left)
            exact_short, exact_long = ((u[:, :k], vh[:k].T) if shape[0] <= shape[1] else (vh[:k].T, u[:, :k]))
            assert max(principal_angles_deg(short, exact_short.numpy())) < 1e-6
            assert max(principal_angles_deg(long, exact_long.numpy())) < 1e-3


def _counting(monkeypatch):
    """Count the one-pass route's pair readings and the vectors taken from a kept reduction."""
    import spectral.compare as module

    counts = {"pairs": 0, "from_reduction": 0}
    read, vectors = module.PairComparer._read_pair, module.top_singular_vectors

    def counted_read(self, *args, **kwargs):
        counts["pairs"] += 1
        return read(self, *args, **kwargs)

    def counted_vectors(w, k, reduction=None):
        counts["from_reduction"] += reduction is not None
        return vectors(w, k, reduction)

    monkeypatch.setattr(module.PairComparer, "_read_pair", counted_read)
    monkeypatch.setattr(module, "top_singular_vectors", counted_vectors)
    return counts


def _same_comparison(one, other) -> None:
    assert [m.name for m in one.matrices] == [m.name for m in other.matrices] and one.notes == other.notes
    for x, y in zip(one.matrices, other.matrices):
        assert x.a.to_dict() == y.a.to_dict() and x.b.to_dict() == y.b.to_dict()
        assert x.delta == y.delta and x.subspace.k == y.subspace.k
        np.testing.assert_allclose(x.subspace.angles_deg, y.subspace.angles_deg, atol=2e-3)
        np.testing.assert_allclose(x.subspace.angles_left_deg, y.subspace.angles_left_deg, atol=2e-3)


def test_one_reading_of_the_pair_equals_the_separate_routes(monkeypatch, tmp_path):
    """Fresh workspaces take the one-pass route (spectra, vectors from the kept reductions, fits in the workers);
    workspaces analysed beforehand take the separate one (analyses, then float32 vectors); A's spectra on disk and
    B's fresh mix the two. Same rows, same update, the same angles to the vectors' float32 accuracy; a NaN matrix
    is skipped with a note, and an unchanged matrix's B spectrum is A's, every way."""
    from spectral.cache import DiskCache

    base = nanogpt_state(8, n_layer=2)
    a = planted_update(base, 80, set(matrix_names(base)), rank=3, noise=0.02, strength=3.0)  # A has signal: k = 3
    b = planted_update(a, 8, {"transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight"})
    b["transformer.h.1.mlp.c_proj.weight"][3, 5] = float("nan")
    b["transformer.h.0.attn.c_proj.weight"] = a["transformer.h.0.attn.c_proj.weight"].clone()  # unchanged
    ca, cb = as_checkpoint(a, "a.safetensors"), as_checkpoint(b, "b.safetensors")
    counts = _counting(monkeypatch)

    wa, wb = Workspace(ca, cache=None), Workspace(cb, cache=None)
    one = PairComparer(wa, wb).compare()  # a new comparer each time: `compare` would reuse the first by content
    matched = len(match_matrices(wa.matrices, wb.matrices).pairs)
    assert counts["pairs"] == matched and counts["from_reduction"] >= 2 * (matched - 2)  # not the NaN, unchanged

    counts.update(pairs=0, from_reduction=0)
    sa, sb = Workspace(ca, cache=None), Workspace(cb, cache=None)
    sa.analyze(), sb.analyze()
    separate = PairComparer(sa, sb).compare()
    assert counts == {"pairs": 0, "from_reduction": 0}

    disk = DiskCache(tmp_path / "cache")
    Workspace(ca, cache=disk).spectra()
    counts.update(pairs=0, from_reduction=0)
    mixed = PairComparer(Workspace(ca, cache=disk), Workspace(cb, cache=None)).compare()
    assert counts["pairs"] == matched and 0 < counts["from_reduction"] < 2 * matched  # B's side only

    for other in (separate, mixed):
        _same_comparison(one, other)
    assert all(m.subspace.k == 3 for m in one.matrices)
    assert any("transformer.h.1.mlp.c_proj.weight" in n and "NaN" in n for n in one.notes)
    assert {m.delta.n_signal for m in one.matrices if "h.0.mlp.c_fc" in m.name or "h.1.attn.c_attn" in m.name} == {4}
    assert one.row("transformer.h.0.attn.c_proj.weight").delta.relative_norm == 0.0
    # the spectra the one-pass route adopted are bitwise what each workspace's own `spectra()` computes
    for workspace in (wa, wb):
        fresh = Workspace(workspace.checkpoint, cache=None).spectra()
        for name, spectrum in workspace.spectra().items():
            np.testing.assert_array_equal(spectrum.singular_values, fresh[name].singular_values)
            assert spectrum.entries == fresh[name].entries


def test_angles_of_a_rotated_signal_subspace():
    """B's top singular vectors turned by a known angle inside a plane: the largest principal angle is that angle."""
    m, n, k = 200, 300, 4
    rng = np.random.default_rng(5)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k + 1)))
    angle = np.radians(20.0)
    v_b = v[:, :k].copy()
    v_b[:, 0] = np.cos(angle) * v[:, 0] + np.sin(angle) * v[:, k]
    s = np.diag([40.0, 30.0, 20.0, 10.0])
    noise = 0.02 * rng.standard_normal((m, n))
    wa, wb = u @ s @ v[:, :k].T + noise, u @ s @ v_b.T + noise
    a = as_checkpoint({"layer.weight": torch.from_numpy(wa).float()}, "a.safetensors")
    b = as_checkpoint({"layer.weight": torch.from_numpy(wb).float()}, "b.safetensors")
    row = compare(a, b).row("layer.weight")
    assert row.subspace.k == k
    assert max(row.subspace.angles_deg) == pytest.approx(20.0, abs=0.2)
    assert max(row.subspace.angles_left_deg) < 1.0  # the left vectors did not move


# --------------------------------------------------------------------------------------------------- matching

def test_matching_aligns_prefixes_and_tied_names_and_lists_the_unmatched():
    a = nanogpt_state(0, n_layer=1)
    a["lm_head.weight"] = a["transformer.wte.weight"].clone()  # tied by equal values
    b = {k.removeprefix("transformer."): v.clone() for k, v in a.items() if k != "lm_head.weight"}  # GPT2Model-style
    b["h.0.attn.c_proj.weight"] = torch.randn(64, 64)  # shape differs: not compared
    b["extra.weight"] = torch.randn(10, 20)
    ca, cb = as_checkpoint(a, "a.safetensors"), as_checkpoint(b, "b.safetensors")
    matching = match_matrices(find_matrices(ca), find_matrices(cb))
    pairs = {m.a.name: m.b.name for m in matching.pairs}
    assert pairs["transformer.wte.weight"] == "wte.weight"
    assert pairs["transformer.h.0.mlp.c_fc.weight"] == "h.0.mlp.c_fc.weight"
    assert "transformer.h.0.attn.c_proj.weight" in matching.unmatched_a
    assert set(matching.unmatched_b) == {"h.0.attn.c_proj.weight", "extra.weight"}
    assert any("128×128 in A but 64×64 in B" in note for note in matching.notes)
    compiled = {"_orig_mod." + k: v for k, v in b.items()}  # torch.compile's prefix is ignored
    again = match_matrices(find_matrices(cb), find_matrices(as_checkpoint(compiled, "c.safetensors")))
    assert not again.unmatched_a and not again.unmatched_b


def test_nothing_in_common_is_a_compare_error():
    a = as_checkpoint({"x.weight": torch.randn(20, 30)}, "a.safetensors")
    b = as_checkpoint({"y.weight": torch.randn(40, 30)}, "b.safetensors")
    with pytest.raises(CompareError, match="no weight matrix"):
        compare(a, b)


# -------------------------------------------------------------------------------------------- JSON, cache, figures

def test_json_has_the_issues_keys_and_a_recompare_comes_from_the_cache():
    a, b = nanogpt_state(4, n_layer=1), None
    b = planted_update(a, 4, {"transformer.h.0.mlp.c_fc.weight"})
    ca, cb = as_checkpoint(a, "a.safetensors"), as_checkpoint(b, "b.safetensors")
    result = compare(ca, cb)
    d = json.loads(result.to_json())
    assert set(d) == {"a", "b", "settings", "matrices", "unmatched"}
    assert set(d["unmatched"]) == {"a", "b"}
    assert {"path", "sha256", "format", "n_tensors", "n_params"} <= set(d["a"])
    for m in d["matrices"]:
        assert {"name", "shape", "role", "a", "b", "delta", "subspace"} <= set(m)
        assert set(m["delta"]) == {"n_signal", "sigma", "relative_norm", "edge_upper"}
        assert {"k", "angles_deg"} <= set(m["subspace"]) and len(m["subspace"]["angles_deg"]) == m["subspace"]["k"]
        assert m["a"]["name"] == m["name"] and "n_signal" in m["b"]
    assert compare(ca, cb) is result  # same pair, same settings: the cached comparison


def test_delta_fit_matches_the_analysis_of_the_update():
    """ΔW's numbers are its own MP fit under the MP null, whatever null the rows use."""
    a = nanogpt_state(6, n_layer=1)
    b = planted_update(a, 6, {"transformer.wpe.weight"})
    pair = comparer(as_checkpoint(a, "a.safetensors"), as_checkpoint(b, "b.safetensors"))
    row = pair.compare().row("transformer.wpe.weight")
    assert (row.delta.n_signal, row.delta.sigma, row.delta.edge_upper) == (
        row.delta_report.n_signal, row.delta_report.sigma, row.delta_report.edge_upper)
    update = pair._updates["transformer.wpe.weight"]
    looser = delta_report(update, Settings(confidence=0.5))[0]
    assert looser.n_signal >= row.delta.n_signal and looser.edge_upper < row.delta.edge_upper


def test_figures_draw_both_spectra_the_update_and_the_angles():
    a = nanogpt_state(7, n_layer=1)
    b = planted_update(a, 7, {"transformer.h.0.mlp.c_fc.weight"})
    wa, wb = Workspace(as_checkpoint(a, "a.safetensors")), Workspace(as_checkpoint(b, "b.safetensors"))
    result = compare(wa, wb)
    row = result.row("transformer.h.0.mlp.c_fc.weight")
    fig = overlay_histogram(row, wa.spectra()[row.name], wb.spectra()[row.name])
    bars = [t for t in fig.data if t.type == "bar"]
    assert [int(sum(t.y)) for t in bars] == [128, 128]  # every singular value of each side in one bar
    assert sum(t.type == "scatter" and "MP fit" in t.name for t in fig.data) == 2
    assert "update" in delta_histogram(row).layout.title.text
    assert list(delta_bars(result).data[0].y) == [m.delta.n_signal for m in result.matrices]
    assert len(angle_curves(result.matrices).data) == sum(bool(m.subspace.angles_deg) for m in result.matrices)


# ------------------------------------------------------------------------------------------------ what-if pair

def test_b_against_a_equals_running_b_directly_on_as_batch(tmp_path):
    a = save_tiny_gpt(tmp_path / "a.safetensors", seed=0)
    b = save_tiny_gpt(tmp_path / "b.safetensors", seed=1)
    ra, rb = pair_runtimes(a, b)
    spec = BatchSpec(positions=256)
    result = evaluate_pair(ra, rb, spec)
    evaluator = ra.evaluator(spec)
    logits = rb.require().forward(evaluator.batch.input_ids).reshape(-1, evaluator.runnable.vocab_size or 64)
    ref = evaluator.reference_outputs
    oracle = position_metrics(ref, torch.logsumexp(ref, -1), ref.argmax(-1), logits.float())
    assert result.metrics.kl == pytest.approx(float(oracle.kl.mean()), rel=1e-5)
    assert result.metrics.agreement == pytest.approx(float(oracle.agree.double().mean()))
    same = evaluate_pair(ra, pair_runtimes(a, a)[1], spec)
    assert same.metrics.kl == 0.0 and same.metrics.agreement == 1.0


def test_b_against_a_refuses_another_architecture(tmp_path):
    a = save_tiny_gpt(tmp_path / "a.safetensors", seed=0)
    wide = save_tiny_gpt(tmp_path / "wide.safetensors", config=GPTConfig(vocab_size=64, n_layer=2, n_embd=48,
                                                                         n_head=2, block_size=32))
    with pytest.raises(CompareError, match="architectures differ|configs differ"):
        evaluate_pair(*pair_runtimes(a, wide))
    heads = save_tiny_gpt(tmp_path / "heads.safetensors", config=GPTConfig(vocab_size=64, n_layer=2, n_embd=32,
                                                                           n_head=4, block_size=32))
    with pytest.raises(CompareError, match="n_head: 2 in A, 4 in B"):  # same shapes, another attention
        evaluate_pair(*pair_runtimes(a, heads))


# --------------------------------------------------------------------------------------------------------- CLI

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "spectral", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.slow
@registered
def test_cli_compare_writes_the_json_and_exit_codes(tmp_path):
    a = save_tiny_gpt(tmp_path / "a.safetensors", seed=0)
    b = save_tiny_gpt(tmp_path / "b.safetensors", seed=1)
    ok = run_cli("compare", a, b)
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(ok.stdout)) == {"a", "b", "settings", "matrices", "unmatched"}
    out = tmp_path / "c.json"
    table = run_cli("compare", a, b, "--json", out, "--confidence", "0.9")
    assert table.returncode == 0 and json.loads(out.read_text())["settings"]["confidence"] == 0.9
    assert "blocks.0.attn.c_attn.weight" in table.stdout
    for args, code in (((a, tmp_path / "missing.safetensors"), 3), ((a, b, "--confidence", "2"), 2), ((a,), 2)):
        bad = run_cli("compare", *args)
        assert bad.returncode == code, bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert sum("error:" in line for line in lines) == 1 and (code == 2 or len(lines) == 1)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    bad = run_cli("compare", a, broken)
    assert bad.returncode == 3 and len(bad.stderr.strip().splitlines()) == 1 and "broken.safetensors" in bad.stderr


# -------------------------------------------------------------------------------------------------------- page

def test_compare_page_on_two_checkpoints_the_test_writes(tmp_path, monkeypatch):
    save_tiny_gpt(tmp_path / "a.safetensors", seed=0)
    save_tiny_gpt(tmp_path / "b.safetensors", seed=1)
    save_file({"w.weight": torch.randn(8, 8)}, str(tmp_path / "other.safetensors"))
    monkeypatch.setenv("SPECTRA_MODELS", str(tmp_path))
    at = AppTest.from_file(str(ROOT / "pages" / "compare.py"), default_timeout=240).run()
    at.segmented_control(key="cmp_A_source").set_value("Server folder").run()
    at.selectbox(key="cmp_A_server").set_value("a.safetensors").run()
    at.segmented_control(key="cmp_B_source").set_value("Server folder").run()
    at.selectbox(key="cmp_B_server").set_value("b.safetensors").run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    expected = compare(load_checkpoint(tmp_path / "a.safetensors"), load_checkpoint(tmp_path / "b.safetensors"))
    assert metrics["Matched matrices"] == str(len(expected.matrices))
    assert metrics["Changed"] == str(len(expected.matrices))
    assert len(at.get("plotly_chart")) == 4  # ΔW bars, both spectra, ΔW's spectrum, the angles
    at.button(key="cmp_evaluate").click().run()
    assert "Top-1 agreement" in {m.label for m in at.metric}
    at.selectbox(key="cmp_B_server").set_value("other.safetensors").run()
    assert at.error and "no weight matrix" in at.error[0].value  # refused in place, the page stays up


def test_a_pair_opens_both_at_once_and_a_missing_file_is_named():
    """`both` runs B's opening in a second thread while A's runs here (two sleeps of 0.3 s take about 0.3 s), opens
    the same source once, and an unreadable A or B raises its own CheckpointError, naming that file."""
    import threading
    import time as clock

    from spectral.checkpoint import CheckpointError
    from spectral.compare import both, open_pair

    def slow(x):
        clock.sleep(0.3)
        return x, threading.current_thread().name

    start = clock.perf_counter()
    (a, thread_a), (b, thread_b) = both(slow, "a", "b")
    assert (a, b) == ("a", "b") and thread_a != thread_b and clock.perf_counter() - start < 0.55
    calls = []
    first, second = both(lambda x: calls.append(x) or object(), "same.safetensors", "same.safetensors")
    assert first is second and calls == ["same.safetensors"]  # the same source is opened once
    with pytest.raises(CheckpointError, match="nope-b"):
        open_pair("demo", "/nonexistent/nope-b.safetensors")
    with pytest.raises(CheckpointError, match="nope-a"):
        open_pair("/nonexistent/nope-a.safetensors", "demo")
