"""spectral/evaluation.py and spectral/whatif.py: the fixed batch, reference outputs, agreement / KL / perplexity,
the what-if session and the sensitivity scan."""
import dataclasses
import math
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from models.gpt import GPTConfig
from models.registry import ParamRef, Runnable, runnable_model
from spectral.checkpoint import load_checkpoint
from spectral.evaluation import (
    EvalBatch,
    EvaluationError,
    Evaluator,
    embedding_metrics,
    make_eval_batch,
    phi,
    position_metrics,
    sample_batch,
    token_batch,
    windows,
)
from spectral.runtime import BatchSpec, ModelRuntime
from spectral.whatif import Choice, WhatIfSession, sensitivity_scan
from spectral.workspace import Workspace
from tests.tiny_models import save_tiny_gpt

CONFIG = GPTConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, block_size=32)
DEMO = Path(__file__).resolve().parent.parent / "models" / "demo" / "model.safetensors"


# --------------------------------------------------------------------------------- a hand-built two-layer model

class TwoLayer(torch.nn.Module):
    """logits = W2 relu(W1 onehot(token)): vocabulary 3, hidden 2."""

    def __init__(self, w1, w2):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.tensor(w1, dtype=torch.float32))
        self.w2 = torch.nn.Parameter(torch.tensor(w2, dtype=torch.float32))

    def forward(self, ids):
        x = torch.nn.functional.one_hot(ids, 3).float()  # (B, T, 3)
        return torch.relu(x @ self.w1.T) @ self.w2.T  # (B, T, 3)


W1 = [[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]
W2 = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]


def two_layer_runnable():
    module = TwoLayer(W1, W2).eval().requires_grad_(False)
    return Runnable(module=module, kind="causal_lm", architecture="hand", tokenizer=None, eval_text=None,
                    block_size=4, vocab_size=3,
                    param_names={"w1": [ParamRef("w1")], "w2": [ParamRef("w2")]})


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_hand_built_two_layer_model_gives_the_kl_computed_by_hand():
    runnable = two_layer_runnable()
    # inputs: tokens 0, 1, 2 (one sequence); labels: 2, 0, 1
    batch = EvalBatch(torch.tensor([[0, 1, 2]]), torch.tensor([[2, 0, 1]]), "tokens")
    evaluator = Evaluator(runnable, batch)
    cut_w1 = [[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]  # the second hidden unit removed
    metrics = evaluator.evaluate({"w1": torch.tensor(cut_w1)})

    # By hand. hidden h = relu(W1 e_t): t=0 -> (1, 0); t=1 -> (0, 1); t=2 -> (2, 0) (relu(-1) = 0).
    # logits z = W2 h = (h1, h2, h1 + h2): t=0 -> (1, 0, 1); t=1 -> (0, 1, 1); t=2 -> (2, 0, 2).
    # Cut: h2 = 0 always: t=0 -> (1, 0, 1) (unchanged); t=1 -> (0, 0, 0); t=2 -> (2, 0, 2) (unchanged).
    z_before = [np.array([1.0, 0, 1]), np.array([0.0, 1, 1]), np.array([2.0, 0, 2])]
    z_after = [np.array([1.0, 0, 1]), np.array([0.0, 0, 0]), np.array([2.0, 0, 2])]
    # Position 1: p = (1, e, e)/(1 + 2e), q = (1/3, 1/3, 1/3), KL = Σ p log(3p).
    e = math.e
    p1 = np.array([1, e, e]) / (1 + 2 * e)
    kl1 = float(np.sum(p1 * np.log(3 * p1)))
    assert metrics.kl == pytest.approx(kl1 / 3, rel=1e-6)
    kl_direct = [np.sum(softmax(a) * (np.log(softmax(a)) - np.log(softmax(b)))) for a, b in zip(z_before, z_after)]
    assert metrics.kl == pytest.approx(np.mean(kl_direct), rel=1e-6)
    # Agreement: argmax ties go to the first index (torch and numpy alike): t=0: 0 vs 0; t=1: 1 vs 0; t=2: 0 vs 0.
    assert metrics.agreement == pytest.approx(2 / 3)
    # Perplexity: labels 2, 0, 1.
    nll_before = -np.mean([np.log(softmax(z)[y]) for z, y in zip(z_before, [2, 0, 1])])
    nll_after = -np.mean([np.log(softmax(z)[y]) for z, y in zip(z_after, [2, 0, 1])])
    assert metrics.perplexity_before == pytest.approx(math.exp(nll_before), rel=1e-6)
    assert metrics.perplexity_after == pytest.approx(math.exp(nll_after), rel=1e-6)


def test_no_cut_gives_agreement_exactly_one_and_kl_exactly_zero():
    runnable = two_layer_runnable()
    evaluator = Evaluator(runnable, EvalBatch(torch.tensor([[0, 1, 2, 1]]), torch.tensor([[1, 2, 0, 0]]), "tokens"))
    for overrides in ({}, {"w1": runnable.module.w1.detach().clone()}):  # skipped, then a full forward pass
        m = evaluator.evaluate(overrides)
        assert m.agreement == 1.0 and m.kl == 0.0
        assert m.perplexity_after == m.perplexity_before


def _kl_reference(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax z0 ‖ softmax z) from the float32 logits, in float64 (direct log-softmax difference)."""
    p = torch.log_softmax(z0.double(), -1)
    q = torch.log_softmax(z.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def _kl_mpmath(z0: list[float], z: list[float]) -> float:
    """KL of one row with 50 significant digits (mpmath), for KLs too small for a float64 direct difference."""
    mpmath.mp.dps = 50
    a, b = [mpmath.mpf(float(v)) for v in z0], [mpmath.mpf(float(v)) for v in z]
    la = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in a))
    lb = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in b))
    return float(mpmath.fsum(mpmath.exp(x - la) * ((x - la) - (y - lb)) for x, y in zip(a, b)))


def _metrics(z0: torch.Tensor, z: torch.Tensor, targets=None):
    return position_metrics(z0, torch.logsumexp(z0, -1), z0.argmax(-1), z, targets)


@pytest.mark.parametrize("scale", [1e-3, 1e-2, 0.1, 1.0, 3.0, 30.0])
def test_kl_equals_a_float64_reference_to_1e6_from_small_to_huge_logit_changes(scale):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(64, 2000, generator=g) * 3
    z = z0 + scale * torch.randn(64, 2000, generator=g)
    kl = _metrics(z0, z).kl
    exact = _kl_reference(z0, z)
    assert torch.all((kl - exact).abs() <= 1e-6 * exact)


def test_kl_of_tiny_changes_matches_50_digit_arithmetic():
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(3, 300, generator=g) * 3
    for scale in (1e-5, 1e-4):  # KL ~ 1e-11 .. 1e-9: a float64 log-softmax difference keeps only a few digits
        z = z0 + scale * torch.randn(3, 300, generator=g)
        kl = _metrics(z0, z).kl
        for row in range(3):
            exact = _kl_mpmath(z0[row].tolist(), z[row].tolist())
            assert float(kl[row]) == pytest.approx(exact, rel=1e-6)


def test_catastrophic_cut_gives_a_finite_kl_not_infinity():
    """The SmolLM2 failure: the cut model's log-partition exceeds the original's by more than ~17, so
    Σ q (e^d − 1) = e^{lse0 − lse} − 1 rounds to −1 in float32 and log1p gave −inf (KL = inf)."""
    g = torch.Generator().manual_seed(2)
    V = 49152
    z0 = torch.randn(8, V, generator=g) * 2
    z = torch.randn(8, V, generator=g) * 2
    z[:, :40] += 40.0  # a few tokens the cut model is sure of: lse − lse0 ≈ 37
    assert float((torch.logsumexp(z, -1) - torch.logsumexp(z0, -1)).min()) > 17
    m = _metrics(z0, z, targets=torch.zeros(8, dtype=torch.long))
    exact = _kl_reference(z0, z)
    assert torch.isfinite(m.kl).all()
    assert torch.all((m.kl - exact).abs() <= 1e-6 * exact)
    assert torch.isfinite(m.nll).all()
    assert not m.agree.any()


def test_kl_past_float32_exponent_range_falls_back_to_the_direct_difference():
    z0 = torch.zeros(2, 10)
    z = torch.zeros(2, 10)
    z[:, 0] = -200.0  # e^{-u} of a 200-nat change overflows float32
    kl = _metrics(z0, z).kl
    exact = _kl_reference(z0, z)
    assert torch.isfinite(kl).all()
    assert torch.all((kl - exact).abs() <= 1e-6 * exact)


def test_phi_is_accurate_across_the_series_switch():
    x = torch.tensor([-3.0, -0.6, -0.5, -0.49, -1e-3, -1e-8, 0.0, 1e-8, 1e-3, 0.49, 0.5, 0.6, 3.0])
    exact = torch.expm1(x.double()) - x.double()
    small = x.abs() < 1e-3
    exact[small] = (x.double() ** 2 / 2 + x.double() ** 3 / 6)[small]
    got = phi(x).double()
    assert torch.all((got - exact).abs() <= 5e-7 * exact.abs() + 1e-30)


def test_phi_is_infinite_not_nan_where_the_exponential_overflows():
    """B = E_p[φ] must be +inf there, so that the KL falls back to the direct difference (the lerp blend gives nan)."""
    x = torch.tensor([-200.0, -0.3, 0.2, 80.0, 100.0, 1e4])
    got = phi(x)
    assert torch.isinf(got[4:]).all() and (got[4:] > 0).all()
    exact = torch.expm1(x[:4].double()) - x[:4].double()
    assert torch.all((got[:4].double() - exact).abs() <= 5e-7 * exact)


def test_a_nan_logit_spoils_its_own_row_only():
    """A cut that overflows (say to fp16 inf, then nan) in one position must not bend the KL of the others: with a
    NaN in the chunk, aminmax is NaN, and the other rows' large changes still need expm1, not the series."""
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(4, 300, generator=g) * 3
    z = z0 + 3.0 * torch.randn(4, 300, generator=g)
    z[0, 5] = float("nan")
    kl = _metrics(z0, z).kl
    exact = _kl_reference(z0[1:], z[1:])
    assert torch.isnan(kl[0])
    assert torch.all((kl[1:] - exact).abs() <= 1e-6 * exact)


def test_phi_with_every_entry_inside_the_series_bound():
    """The path a mild cut takes (no entry beyond the bound, so no expm1 pass), against float64."""
    x = torch.linspace(-0.5, 0.5, 1001)
    x64 = x.double()
    exact = torch.where(x64.abs() < 1e-3, x64 ** 2 / 2 + x64 ** 3 / 6 + x64 ** 4 / 24, torch.expm1(x64) - x64)
    got = phi(x).double()
    assert torch.all((got - exact).abs() <= 5e-7 * exact.abs() + 1e-30)


def test_embedding_metrics_by_hand():
    ref = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    same = embedding_metrics(ref, ref * 2.0)
    assert same == pytest.approx((1.0, 1.0))
    moved = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 0.9]])  # sentence 1 now sits next to sentence 2
    cosine, agreement = embedding_metrics(ref, moved)
    cos1 = 0.1 / math.hypot(0.9, 0.1)
    cos2 = 0.9 / math.hypot(0.1, 0.9)
    assert cosine == pytest.approx((1.0 + cos1 + cos2) / 3)
    # nearest neighbours before: 0->1, 1->0, 2->1; after: 0->2 (cos .11 vs 0), 1->2, 2->1
    assert agreement == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------------------- batches

def test_windows_cover_the_text_and_predict_the_next_token():
    ids = torch.arange(10_000)
    x, y = windows(ids, 2048, 128)
    assert x.shape == (16, 128) and x.numel() >= 2000
    assert torch.equal(y, x + 1)
    assert int(x[0, 0]) == 0 and int(y[-1, -1]) == 9999  # first and last tokens of the text are used
    assert len(set(x[:, 0].tolist())) == 16


def test_short_text_gives_what_it_has():
    x, y = windows(torch.arange(50), 2048, 128)
    assert x.shape[1] == 49 and torch.equal(y, x + 1)


@pytest.fixture()
def gpt_session(tmp_path):
    ckpt = load_checkpoint(save_tiny_gpt(tmp_path / "m.safetensors", config=CONFIG, declare_tied=False))
    return Workspace(ckpt), runnable_model(ckpt)


def test_sampled_batch_is_seeded_and_says_so(gpt_session):
    _, runnable = gpt_session
    a = make_eval_batch(runnable, positions=256)
    b = sample_batch(runnable, positions=256, seed=0)
    c = sample_batch(runnable, positions=256, seed=1)
    assert a.source == "sampled" and a.targets is None
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.positions >= 256 and a.input_ids.shape[1] == 32
    assert Evaluator(runnable, a).perplexity_before is None


def test_text_needs_a_tokenizer(gpt_session):
    _, runnable = gpt_session
    with pytest.raises(EvaluationError, match="tokenizer"):
        make_eval_batch(runnable, "some text")


def test_user_text_is_tokenized_into_labelled_windows(gpt_session):
    _, runnable = gpt_session
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    runnable.tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    batch = make_eval_batch(runnable, "the quick brown fox jumps over the lazy dog " * 20, positions=100)
    assert batch.source == "text" and batch.targets is not None
    assert batch.to_dict() == {"source": "text", "sequences": 4, "tokens": 4 * 32}
    assert Evaluator(runnable, batch).perplexity_before > 1.0


# ----------------------------------------------------------------------------------------- stages and sessions

def test_cut_in_a_late_block_reruns_from_cached_activations_with_the_same_result(gpt_session):
    _, runnable = gpt_session
    batch = token_batch(torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(3)))
    evaluator = Evaluator(runnable, batch)
    overrides = {"blocks.1.mlp.c_fc.weight": torch.zeros(128, 32)}
    outputs, start = evaluator.outputs(overrides)
    assert start == 2  # embedding, blocks.0 come from the cache
    full = runnable.forward(batch.input_ids, overrides).reshape(-1, 64)
    assert torch.allclose(outputs, full, atol=1e-6, rtol=0)
    assert evaluator.start_stage({"tok_emb.weight": None}) == 0  # tied: the embedding stage reads it first


def session_of(workspace, runnable, *, positions: int) -> WhatIfSession:
    return WhatIfSession(ModelRuntime(workspace, runnable=runnable), BatchSpec(None, positions))


def test_whatif_run_reports_the_design_keys(gpt_session):
    whatif = session_of(*gpt_session, positions=256)
    out = whatif.run(Choice("rank", 0.5, scope="mlp")).to_dict()
    for key in ("strategy", "value", "scope", "precision", "agreement", "kl", "perplexity_before",
                "perplexity_after", "params_before", "params_after", "compression", "eval", "matrices"):
        assert key in out
    assert set(out["eval"]) == {"source", "sequences", "tokens"}
    assert {"name", "rank", "kept_rank", "relative_error"} <= set(out["matrices"][0])
    assert 0.0 <= out["agreement"] <= 1.0 and out["kl"] > 0.0
    none = whatif.run(Choice("none")).to_dict()
    assert none["agreement"] == 1.0 and none["kl"] == 0.0


def test_moving_back_to_a_seen_plan_reuses_its_metrics_but_rebuilds_the_weights(gpt_session):
    whatif = session_of(*gpt_session, positions=128)
    first = whatif.run(Choice("rank", 0.5))
    kept = whatif.pruner.matrix("blocks.0.mlp.c_fc.weight").clone()
    whatif.run(Choice("rank", 0.25))
    again = whatif.run(Choice("rank", 0.5))
    assert again.metrics is first.metrics
    assert torch.allclose(whatif.pruner.matrix("blocks.0.mlp.c_fc.weight"), kept, atol=1e-6)


def test_sensitivity_scan_matches_cutting_each_matrix_alone(gpt_session):
    workspace = gpt_session[0]
    whatif = session_of(*gpt_session, positions=256)
    rows = whatif.scan(Choice("rank", 0.25))
    assert [r["unit"] for r in rows] == [i.name for i in workspace.matrices]
    for row in rows[::3]:
        others = tuple((i.name, "none", None) for i in workspace.matrices if i.name != row["unit"])
        alone = whatif.run(Choice("rank", 0.25, overrides=others))
        assert row["kl"] == pytest.approx(alone.metrics.kl, rel=1e-5, abs=1e-12)
        assert row["agreement"] == alone.metrics.agreement
    assert rows[0]["layer"] == 0 and rows[-1]["layer"] is None
    by_role = sensitivity_scan(workspace, whatif.evaluator, Choice("rank", 0.25).plan(workspace), by="role")
    assert {r["unit"] for r in by_role} == {i.role for i in workspace.matrices}
    assert all(r["kl"] > 0 for r in by_role)


def test_scan_reports_zero_for_matrices_the_strategy_leaves_alone(gpt_session):
    rows = session_of(*gpt_session, positions=128).scan(Choice("energy", 1.0))
    assert all(r["kl"] == 0.0 and r["agreement"] == 1.0 for r in rows)


@pytest.mark.skipif(not DEMO.is_file(), reason="the demo model is not built yet")
def test_demo_batch_has_at_least_2000_positions_from_its_heldout_text():
    ckpt = load_checkpoint("demo")
    runnable = runnable_model(ckpt)
    batch = make_eval_batch(runnable)
    assert batch.source == "bundled" and batch.positions >= 2000 and batch.targets is not None
    m = Evaluator(runnable, batch).evaluate({})
    assert m.agreement == 1.0 and m.kl == 0.0 and m.perplexity_before == m.perplexity_after


def test_a_model_with_a_tokenizer_but_no_text_reads_cpythons_topics_instead_of_sampling(gpt_session):
    workspace, runnable = gpt_session
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    text_runnable = Runnable(module=runnable.module, kind="causal_lm", architecture="gpt", tokenizer=tokenizer,
                             eval_text=None, block_size=32, vocab_size=64, param_names=runnable.param_names,
                             stages=runnable.stages)
    batch = make_eval_batch(text_runnable, positions=128)
    assert batch.source == "builtin" and batch.targets is not None and batch.positions >= 128


@pytest.mark.parametrize("keep_bytes", [0, 1 << 30])  # the untouched logits recomputed per slice, or kept
def test_the_head_run_in_slices_gives_the_metrics_of_whole_forward_passes(gpt_session, monkeypatch, keep_bytes):
    """A staged causal LM's head runs on whole sequences, HEAD_POSITIONS positions at a time (45 here: two sequences
    of 20 per call, parts of 5 sequences), and the untouched input of every 2nd stage is kept (blocks.0's is not: a
    cut there resumes from the embedding's). For a cut from the first stage, in either block, in the head alone and
    nowhere, agreement, KL and perplexity equal those of whole forward passes of both models computed in float64
    here, on the full batch and on the estimate's subset (8 of the 10 sequences)."""
    import spectral.evaluation

    monkeypatch.setattr(spectral.evaluation, "HEAD_POSITIONS", 45)
    _, runnable = gpt_session
    ids = torch.randint(0, 64, (10, 21), generator=torch.Generator().manual_seed(4))
    batch = EvalBatch(ids[:, :-1], ids[:, 1:], "test")
    evaluator = Evaluator(runnable, batch, chunk_positions=100, keep_bytes=keep_bytes)
    stages = runnable.stages
    assert len(stages) == 4 and len(evaluator.parts) == 2
    assert all(p.stage_inputs[1] is None and p.stage_inputs[2] is not None for p in evaluator.parts)
    head_calls = []
    run = stages[-1].run
    counted = dataclasses.replace(stages[3], run=lambda o, x: head_calls.append(x.shape[0]) or run(o, x))
    monkeypatch.setattr(runnable, "stages", [*stages[:3], counted])
    subset = [0, 1, 3, 4, 5, 6, 8, 9]  # round(i · 9 / 7), i < 8: spread over the batch

    def oracle(overrides, rows, length: int):
        x, y = batch.input_ids[rows, :length], batch.targets[rows, :length].reshape(-1).numpy()
        p = torch.log_softmax(runnable.forward(x).double(), -1).reshape(-1, 64).numpy()
        q = torch.log_softmax(runnable.forward(x, overrides).double(), -1).reshape(-1, 64).numpy()

        def perplexity(lp):
            return math.exp(float(-np.mean(lp[np.arange(len(y)), y])))

        kl = float(np.mean(np.sum(np.exp(p) * (p - q), axis=1)))
        return float(np.mean(p.argmax(1) == q.argmax(1))), kl, perplexity(p), perplexity(q)

    g = torch.Generator().manual_seed(5)
    for overrides, start in (({"tok_emb.weight": torch.randn(64, 32, generator=g)}, 0),
                             ({"blocks.0.mlp.c_fc.weight": torch.randn(128, 32, generator=g)}, 1),
                             ({"blocks.1.mlp.c_fc.weight": torch.randn(128, 32, generator=g)}, 2),
                             ({"ln_f.weight": torch.rand(32, generator=g) + 0.5}, 3),
                             ({}, 4)):
        head_calls.clear()
        full, estimate = evaluator.evaluate(overrides), evaluator.estimate(overrides)
        # sequences per head call: each part of 5 in slices of 2, 2, 1 and the subset of 8 in 2s, the untouched
        # model's too where its logits are not kept; none when no stage reads a changed parameter
        twice = 1 if keep_bytes else 2
        expected = [] if start == 4 else sorted([2, 2, 1] * 2 * twice + [2, 2, 2, 2] * twice)
        assert sorted(head_calls) == expected
        for got, rows in ((full, list(range(10))), (estimate, subset)):
            assert got.start_stage == start and got.positions == len(rows) * 20
            agreement, kl, before, after = oracle(overrides, rows, 20)
            assert got.agreement == pytest.approx(agreement, abs=1e-12)
            assert got.kl == pytest.approx(kl, rel=1e-5, abs=1e-12)
            assert got.perplexity_before == pytest.approx(before, rel=1e-5)
            assert got.perplexity_after == pytest.approx(after, rel=1e-5)
