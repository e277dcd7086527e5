"""spectral/pruning.py: plans from strategies, cuts rebuilt from SVD factors, storage counts, saving."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.gpt import GPT, GPTConfig
from models.registry import runnable_model
from spectral.checkpoint import load_checkpoint
from spectral.lowrank import LowRankWeight, ProjectedWeight
from spectral.metrics import energy_rank
from spectral.pruning import (
    INT8_LEVELS,
    MAX_INCREMENTS,
    Cut,
    Plan,
    PlanError,
    Pruner,
    Strategy,
    band_bounds,
    int8_scales,
    low_rank,
    make_plan,
    quantize,
    save_pruned,
)
from spectral.workspace import Workspace
from tests.tiny_models import save_tiny_gpt

CONFIG = GPTConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, block_size=32)
FC = "blocks.0.mlp.c_fc.weight"  # 128 × 32


@pytest.fixture()
def saved_gpt(tmp_path):
    return save_tiny_gpt(tmp_path / "m.safetensors", config=CONFIG)


@pytest.fixture()
def session(saved_gpt):
    ckpt = load_checkpoint(saved_gpt)
    workspace = Workspace(ckpt)
    runnable = runnable_model(ckpt)
    return workspace, runnable, Pruner(workspace, runnable)


def numpy_svd(w: torch.Tensor):
    return np.linalg.svd(w.double().numpy(), full_matrices=False)


def only(name: str, cut: Cut, strategy: str = "rank") -> Plan:
    return Plan(Strategy(strategy), "all", {name: cut})


# ------------------------------------------------------------------------------------------------------- numerics

def test_full_rank_rebuild_is_lossless_to_float_tolerance():
    w = torch.randn(50, 30, generator=torch.Generator().manual_seed(0))
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(low_rank(U, S, Vh, 30), w, atol=1e-5, rtol=0)


def test_full_rank_cut_through_the_pruner_is_lossless(session):
    workspace, _, pruner = session
    w = workspace.weight(FC)
    result = pruner.apply(only(FC, Cut(kept_rank=32)))
    assert torch.allclose(pruner.matrix(FC), w, atol=1e-6, rtol=0)
    assert next(r for r in result.matrices if r.name == FC).relative_error == 0.0
    assert make_plan(workspace, "rank", 1.0).cuts == {}  # and a plan never asks for it: it is no cut


def test_truncation_error_matches_the_hand_formula(session):
    workspace, _, pruner = session
    w = workspace.weight(FC).double().numpy()
    u, s, vt = numpy_svd(torch.from_numpy(w))
    for k in (1, 7, 16, 25, 31):
        result = pruner.apply(only(FC, Cut(kept_rank=k)))
        row = next(r for r in result.matrices if r.name == FC)
        by_hand = math.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2))
        assert row.kept_rank == k
        assert row.relative_error == pytest.approx(by_hand, rel=1e-5)
        cut = pruner.matrix(FC).double().numpy()
        oracle = (u[:, :k] * s[:k]) @ vt[:k]
        assert np.abs(cut - oracle).max() < 1e-5
        assert np.linalg.norm(w - cut) / np.linalg.norm(w) == pytest.approx(by_hand, rel=1e-4)


@pytest.fixture
def conv_kernel(tmp_path):
    """A pruner over one 64 × 8 × 2 × 2 convolution kernel (a 64 × 32 matrix): a model reads it as 4-D, so its
    truncations are dense buffers, not implicit weights."""
    path = tmp_path / "conv.safetensors"
    save_file({"features.conv.weight": torch.randn(64, 8, 2, 2, generator=torch.Generator().manual_seed(7))},
              str(path))
    workspace = Workspace(load_checkpoint(path))
    (info,) = workspace.matrices
    assert tuple(info.shape) == (64, 32) and len(info.source_shape) == 4
    return workspace, Pruner(workspace), info.name


def test_slider_moves_rebuild_incrementally_without_drift(conv_kernel):
    """Dense truncations move from the previous buffer by the components in between where that is the cheapest
    exact route: after 3 × MAX_INCREMENTS random moves, chains of such increments among them, still the SVD
    truncation to 1e-5 (no drift)."""
    workspace, pruner, name = conv_kernel
    u, s, vt = numpy_svd(workspace.weight(name))
    rng = np.random.default_rng(0)
    increments = []
    for k in rng.integers(1, 32, size=3 * MAX_INCREMENTS):
        pruner.apply(only(name, Cut(kept_rank=int(k))))
        state = pruner._working[name]
        assert state.implicit is None and state.buffer is not None
        increments.append(state.increments)
        oracle = (u[:, :k] * s[:k]) @ vt[:k]
        assert np.abs(pruner.matrix(name).double().numpy() - oracle).max() < 1e-5
    assert max(increments) >= 3, "incremental moves were chained"


def test_a_dense_buffer_kept_while_the_matrix_is_untouched_is_resumed(conv_kernel):
    """Rank 27 -> the original -> rank 29: the buffer stays while inactive, and rank 29 is built from it (one
    increment), equal to the SVD truncation; the implicit forms never appear for a 4-D kernel."""
    workspace, pruner, name = conv_kernel
    u, s, vt = numpy_svd(workspace.weight(name))
    identity = Plan(Strategy("none"), "all", {})
    pruner.apply(only(name, Cut(kept_rank=27)))
    pruner.apply(identity)
    assert not pruner._working[name].active and pruner._working[name].buffer is not None
    pruner.apply(only(name, Cut(kept_rank=29)))
    state = pruner._working[name]
    assert state.increments == 1 and state.implicit is None and state.held is None
    oracle = (u[:, :29] * s[:29]) @ vt[:29]
    assert np.abs(pruner.matrix(name).double().numpy() - oracle).max() < 1e-5


def test_each_truncation_of_a_long_thin_matrix_takes_the_form_its_rank_calls_for(tmp_path, monkeypatch):
    """A 4096 × 32 embedding (FACTORISED_SPEEDUP raised to 8): ranks with 8·4128k ≤ 131072 + 64k, k ≤ 3, run as
    factors; above, the model's weight is projected onto the kept head while it is the smaller set (k = 8, 12) and
    off the removed tail from there (k = 16, 20, 31). Only the factorised form holds components, none a dense
    buffer; every cut equals the SVD truncation."""
    import spectral.lowrank

    monkeypatch.setattr(spectral.lowrank, "FACTORISED_SPEEDUP", 8.0)
    config = GPTConfig(vocab_size=4096, n_layer=1, n_embd=32, n_head=2, block_size=32)
    ckpt = load_checkpoint(save_tiny_gpt(tmp_path / "long.safetensors", config=config))
    workspace = Workspace(ckpt)
    pruner = Pruner(workspace, runnable_model(ckpt))
    (name,) = [m.name for m in workspace.matrices if tuple(m.shape) == (4096, 32)]
    U, S, Vt = numpy_svd(workspace.weight(name))
    for k, form, width in ((31, "off", 1), (20, "off", 12), (16, "off", 16), (12, "onto", 12), (8, "onto", 8),
                           (4, "onto", 4), (3, "factors", 3), (2, "factors", 2), (31, "off", 1)):
        pruner.apply(only(name, Cut(kept_rank=k)))
        state = pruner._working[name]
        assert state.buffer is None and state.implicit is not None
        if form == "factors":
            assert isinstance(state.implicit, LowRankWeight) and state.implicit.rank == width
            assert state.held is not None
        else:
            assert isinstance(state.implicit, ProjectedWeight) and state.held is None, k
            assert state.implicit.keep == (form == "onto") and state.implicit.q.shape[1] == width, k
            assert state.implicit.side == "right"  # 4096 × 32: Q holds the right singular vectors
        exact = (U[:, :k] * S[:k]) @ Vt[:k]
        assert np.abs(pruner.matrix(name).double().numpy() - exact).max() < 1e-5 * np.abs(exact).max()


def test_held_components_go_when_a_cut_turns_dense_or_back_to_the_original(session):
    """FC (128 × 32) through factorised (rank ≤ 16: k ≤ M/2), projected, dense (a precision, a seed) and
    identity cuts: components are held only under the factorised form, an implicit weight exists only under the
    factorised and projected ones, the identity drops both, and after every move the weights and the model's outputs
    equal a fresh pruner's."""
    workspace, runnable, pruner = session
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(6))
    identity = Plan(Strategy("none"), "all", {})
    steps = [(Cut(kept_rank=4), "factors"), (Cut(kept_rank=4, precision="fp16"), "dense"),
             (Cut(kept_rank=31), "projected"), (Cut(random_seed=3), "dense"), (Cut(kept_rank=4), "factors"),
             (None, "original"), (Cut(kept_rank=16), "factors"), (Cut(kept_rank=17), "projected"),
             (Cut(removed=(3, 6)), "projected"), (None, "original")]
    for cut, form in steps:
        plan = identity if cut is None else only(FC, cut)
        pruner.apply(plan)
        state = pruner._working[FC]
        assert (state.held is not None) == (form == "factors"), cut
        assert state.implicit is None if form in ("dense", "original") else isinstance(
            state.implicit, LowRankWeight if form == "factors" else ProjectedWeight), cut
        assert state.active == (cut is not None)
        if cut is None:
            assert pruner.overrides() == {}
        fresh = Pruner(workspace, runnable)
        fresh.apply(plan)
        torch.testing.assert_close(pruner.matrix(FC), fresh.matrix(FC), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(runnable.forward(x, pruner.overrides()), runnable.forward(x, fresh.overrides()),
                                   rtol=1e-5, atol=1e-5)


def test_band_removes_exactly_one_decile_of_singular_values(session):
    workspace, _, pruner = session
    s = numpy_svd(workspace.weight(FC))[1]
    for decile in (0, 4, 9):
        start, stop = band_bounds(decile, 32)
        plan = make_plan(workspace, "band", decile, scope="mlp")
        assert plan.cut(FC).removed == (start, stop)
        pruner.apply(plan)
        remaining = np.linalg.svd(pruner.matrix(FC).double().numpy(), compute_uv=False)
        expected = np.sort(np.concatenate([s[:start], s[stop:], np.zeros(stop - start)]))[::-1]
        assert np.allclose(remaining, expected, atol=1e-5)


def test_band_bounds_split_the_spectrum_into_ten_ordered_parts():
    bounds = [band_bounds(d, 192) for d in range(10)]
    assert bounds[0][0] == 0 and bounds[-1][1] == 192
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


def test_replacements_rank1_zero_and_seeded_random(session):
    workspace, _, pruner = session
    w = workspace.weight(FC)
    u, s, vt = numpy_svd(w)
    pruner.apply(make_plan(workspace, "rank1", scope="mlp"))
    assert np.abs(pruner.matrix(FC).double().numpy() - s[0] * np.outer(u[:, 0], vt[0])).max() < 1e-5
    result = pruner.apply(make_plan(workspace, "zero", scope="mlp"))
    assert torch.count_nonzero(pruner.matrix(FC)) == 0
    assert next(r for r in result.matrices if r.name == FC).relative_error == 1.0
    pruner.apply(make_plan(workspace, "random", 7, scope="mlp"))
    first = pruner.matrix(FC).clone()
    assert float(torch.linalg.vector_norm(first)) == pytest.approx(float(torch.linalg.vector_norm(w)), rel=1e-5)
    pruner.apply(make_plan(workspace, "random", 8, scope="mlp"))
    assert not torch.equal(pruner.matrix(FC), first)
    pruner.apply(make_plan(workspace, "random", 7, scope="mlp"))
    assert torch.equal(pruner.matrix(FC), first)


def test_int8_is_symmetric_per_output_channel_within_half_a_step():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.01, 3, 40)[:, None]
    w[5] = 0.0
    q = quantize(w, "int8")
    scale = w.abs().amax(dim=1, keepdim=True) / INT8_LEVELS
    assert torch.all((q - w).abs() <= scale / 2 + 1e-7 * w.abs().amax())
    steps = q / torch.where(scale > 0, scale, torch.ones_like(scale))
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # values on each row's grid
    assert steps.abs().max() <= INT8_LEVELS + 1e-3
    assert torch.all(q[5] == 0) and torch.equal(int8_scales(w)[5], torch.ones(1))


def test_half_precisions_round_like_torch_casts():
    w = torch.randn(10, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(quantize(w, "fp16"), w.half().float())
    assert torch.equal(quantize(w, "bf16"), w.bfloat16().float())
    assert torch.equal(quantize(w, "fp32"), w)


# ---------------------------------------------------------------------------------------------------- strategies

def test_strategies_pick_ranks_from_the_analysis(session):
    workspace, _, _ = session
    analysis = workspace.analyze()
    spectra = workspace.spectra()
    mp = make_plan(workspace, "mp", 1.0)
    energy = make_plan(workspace, "energy", 0.9)
    rank = make_plan(workspace, "rank", 0.3)
    optimal = make_plan(workspace, "optimal")
    for info in workspace.matrices:
        r = min(info.shape)
        row = analysis.row(info.name)
        expected = {
            "mp": int(np.count_nonzero(np.asarray(row.z_scores) > 1.0)),
            "energy": energy_rank(spectra[info.name].singular_values, 0.9),
            "rank": math.ceil(0.3 * r),
            "optimal": row.n_optimal,
        }
        for label, plan in (("mp", mp), ("energy", energy), ("rank", rank), ("optimal", optimal)):
            kept = plan.cut(info.name).kept_rank
            assert (r if kept is None else kept) == min(expected[label], r), (label, info.name)


def test_default_mp_threshold_is_the_tw_99_point(session):
    workspace, _, _ = session
    plan = make_plan(workspace, "mp")
    assert plan.strategy.value == 2.0234
    for info in workspace.matrices:
        n_signal = workspace.analyze().row(info.name).n_signal
        kept = plan.cut(info.name).kept_rank
        assert (min(info.shape) if kept is None else kept) == n_signal


def test_scopes_select_roles_and_overrides_ignore_the_scope(session):
    workspace, _, _ = session
    roles = {i.name: i.role for i in workspace.matrices}
    attention = make_plan(workspace, "rank", 0.5, scope="attention")
    assert set(attention.cuts) == {n for n, r in roles.items() if r.startswith("attn")}
    mlp = make_plan(workspace, "rank", 0.5, scope="mlp")
    assert set(mlp.cuts) == {n for n, r in roles.items() if r.startswith("mlp")}
    embedding = make_plan(workspace, "rank", 0.5, scope="embedding")
    assert set(embedding.cuts) == {"tok_emb.weight", "pos_emb.weight"}
    mixed = make_plan(workspace, "rank", 0.5, scope="mlp", overrides={"lm_head.weight": Strategy("rank1"),
                                                                     FC: Strategy("none")})
    assert mixed.cut("tok_emb.weight").kept_rank == 1  # named by its tied alias
    assert mixed.cut(FC).is_identity


def test_bad_plans_are_refused_with_a_reason(session):
    workspace, _, _ = session
    with pytest.raises(PlanError, match="energy"):
        Strategy("energy", 1.5)
    with pytest.raises(PlanError, match="decile"):
        Strategy("band", 10)
    with pytest.raises(PlanError, match="scope"):
        make_plan(workspace, "rank", 0.5, scope="everything")
    with pytest.raises(PlanError, match="not a weight matrix"):
        make_plan(workspace, "none", overrides={"nope.weight": Strategy("zero")})
    with pytest.raises(PlanError, match="precision"):
        Strategy("none", precision="int4")


# ------------------------------------------------------------------------------------------------------ the pruner

def test_only_matrices_whose_cut_changed_are_rebuilt(session):
    workspace, _, pruner = session
    n = len(workspace.matrices)
    pruner.apply(make_plan(workspace, "rank", 0.5))
    assert pruner.rebuild_count == n
    pruner.apply(make_plan(workspace, "rank", 0.5))
    assert pruner.last_rebuilt == []
    pruner.apply(make_plan(workspace, "rank", 0.5, overrides={FC: Strategy("rank", 0.25)}))
    assert pruner.last_rebuilt == [FC]
    pruner.apply(make_plan(workspace, "rank", 0.5, scope="attention"))
    assert pruner.last_rebuilt == []  # matrices leaving the plan are restored, not rebuilt
    assert pruner.rebuild_count == n + 1


def test_factors_are_computed_only_for_matrices_a_plan_truncates(session):
    workspace, _, pruner = session
    pruner.apply(make_plan(workspace, "none", precision="fp16"))
    assert not any(workspace.has_truncation(i.name) for i in workspace.matrices)
    pruner.apply(make_plan(workspace, "rank", 0.5, scope="attention"))
    assert {i.name for i in workspace.matrices if workspace.has_truncation(i.name)} == \
        {i.name for i in workspace.matrices if i.role.startswith("attn")}


def test_cached_originals_are_never_mutated(session):
    workspace, runnable, pruner = session
    module_before = {k: v.clone() for k, v in runnable.module.state_dict().items()}
    factors_before = [t.clone() for t in (workspace.truncation(FC).S, workspace.truncation(FC).Q)]
    for strategy, value in (("rank", 0.5), ("zero", None), ("random", 1), ("band", 0), ("rank", 0.75)):
        pruner.apply(make_plan(workspace, strategy, value, precision="int8"))
    assert all(torch.equal(v, runnable.module.state_dict()[k]) for k, v in module_before.items())
    after = workspace.truncation(FC)
    assert all(torch.equal(a, b) for a, b in zip(factors_before, (after.S, after.Q)))
    assert torch.equal(workspace.checkpoint.tensor(FC), module_before[FC])


def test_tied_matrix_is_cut_once_and_both_uses_change(session):
    workspace, runnable, pruner = session
    plan = make_plan(workspace, "rank", 0.25, scope="embedding", overrides={"pos_emb.weight": Strategy("none")})
    assert set(plan.cuts) == {"tok_emb.weight"}
    pruner.apply(plan)
    overrides = pruner.overrides()
    assert list(overrides) == ["tok_emb.weight"]
    w_k = overrides["tok_emb.weight"]
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    manual = GPT(CONFIG).eval()
    manual.load_state_dict(runnable.module.state_dict())
    with torch.no_grad():
        manual.tok_emb.weight.copy_(w_k)  # one Parameter: the input embedding and the LM head both change
        both = manual(x)
        untied = GPT(CONFIG).eval()
        untied.load_state_dict(runnable.module.state_dict())
        untied.lm_head.weight = torch.nn.Parameter(runnable.module.tok_emb.weight.clone())
        untied.tok_emb.weight = torch.nn.Parameter(w_k.clone())  # only the input side cut
        input_only = untied(x)
    got = runnable.forward(x, overrides)
    assert torch.allclose(got, both, atol=1e-5)
    assert not torch.allclose(got, input_only, atol=1e-3)
    saved = pruner.cut_tensors()
    assert set(saved) == {"tok_emb.weight", "lm_head.weight"}


def test_stored_parameters_and_compression_by_hand(session):
    workspace, _, pruner = session
    result = pruner.apply(make_plan(workspace, "rank", 0.25))
    total = workspace.checkpoint.n_params
    saved = 0
    for info in workspace.matrices:
        m, n = info.shape
        k = math.ceil(0.25 * min(m, n))
        saved += m * n - min(k * (m + n), m * n)
    assert result.params_before == total
    assert result.params_after == total - saved
    assert result.compression == pytest.approx(total / (total - saved))
    fp16 = pruner.apply(make_plan(workspace, "none", precision="fp16"))
    matrix_params = sum(i.shape[0] * i.shape[1] for i in workspace.matrices)
    assert fp16.params_after == total
    assert fp16.bytes_after == 4 * total - 2 * matrix_params
    int8 = pruner.apply(make_plan(workspace, "none", precision="int8", scope="mlp"))
    mlp = [i for i in workspace.matrices if i.role.startswith("mlp")]
    assert int8.bytes_after == 4 * total - sum(3 * i.shape[0] * i.shape[1] - 4 * i.shape[0] for i in mlp)


def test_precision_after_a_cut_reports_the_measured_error(session):
    workspace, _, pruner = session
    result = pruner.apply(make_plan(workspace, "rank", 0.5, precision="int8", scope="mlp"))
    w = workspace.weight(FC)
    row = next(r for r in result.matrices if r.name == FC)
    measured = float(torch.linalg.vector_norm(w - pruner.matrix(FC)) / torch.linalg.vector_norm(w))
    assert row.relative_error == pytest.approx(measured, rel=1e-6)
    assert row.precision == "int8" and row.kept_rank == 16


def test_saved_checkpoint_reloads_and_gives_the_same_outputs(session, tmp_path):
    workspace, runnable, pruner = session
    plan = make_plan(workspace, "rank", 0.5, precision="fp16", overrides={"pos_emb.weight": Strategy("rank1")})
    pruner.apply(plan)
    save_pruned(pruner, tmp_path / "cut.safetensors")
    reloaded = load_checkpoint(tmp_path / "cut.safetensors")
    assert reloaded.dtypes[FC] == "float16"
    assert ("tok_emb.weight", "lm_head.weight") in reloaded.tied_groups
    again = runnable_model(reloaded)
    x = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.forward(x), runnable.forward(x, pruner.overrides()))
    assert json.loads(reloaded.metadata["spectra_prune"])["strategy"] == "rank"
    assert isinstance(save_pruned(pruner), bytes)


def test_a_model_on_another_device_leaves_the_pruner_working_on_the_cpu(saved_gpt):
    """The factors live on the CPU, so the pruner reads untouched matrices there: with the model's parameters on
    another device (the meta device stands in for a GPU: placement without data), a truncation still builds, from
    the checkpoint's own weights, and equals the float64 SVD truncation."""
    ckpt = load_checkpoint(saved_gpt)
    workspace = Workspace(ckpt)
    runnable = runnable_model(ckpt)
    runnable.module.to("meta")
    pruner = Pruner(workspace, runnable)
    pruner.apply(make_plan(workspace, "rank", 0.25))
    w = workspace.weight(FC).double()
    U, S, Vh = numpy_svd(w)
    k = pruner.plan.cut(FC).kept_rank
    exact = (U[:, :k] * S[:k]) @ Vh[:k]
    got = pruner.matrix(FC)
    assert got.device.type == "cpu"
    np.testing.assert_allclose(got.double().numpy(), exact, atol=1e-5 * float(np.abs(exact).max()))
