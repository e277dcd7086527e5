"""spectral/runtime.py, spectral/whatif.py, spectral/library.py and spectral/report.py: the per-checkpoint runtime, the
what-if session (one call per slider move), the reference strategies, the bounded cache of open checkpoints and
sessions, and the report the page and the CLI share."""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.contract import NotRunnable
from models.gpt import GPT, GPTConfig
from spectral.analysis import Settings
from spectral.checkpoint import load_checkpoint
from spectral.evaluation import Evaluator
from spectral.library import Library
from spectral.report import build_report
from spectral.runtime import BatchSpec, ModelRuntime
from spectral.whatif import REFERENCE, Choice, WhatIfSession
from spectral.workspace import Workspace
from tests.tiny_models import save_tiny_gpt

ROOT = Path(__file__).resolve().parent.parent
CONFIG = GPTConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, block_size=32)


@pytest.fixture(scope="module")
def gpt_path(tmp_path_factory) -> Path:
    return save_tiny_gpt(tmp_path_factory.mktemp("gpt") / "tiny.safetensors", config=CONFIG, seed=0)


def bare_state_dict(path: Path) -> Path:
    """A nanoGPT state dict without n_head anywhere: analysable, not runnable until the user gives n_head."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=4, block_size=16))
    names = {"tok_emb": "transformer.wte", "pos_emb": "transformer.wpe", "blocks": "transformer.h",
             "ln_f": "transformer.ln_f"}
    tensors = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        head, _, rest = k.partition(".")
        tensors[f"{names.get(head, head)}.{rest}"] = v.detach().clone().contiguous()
    save_file(tensors, str(path))
    return path


def test_one_run_plans_computes_factors_rebuilds_and_evaluates(gpt_path):
    session = WhatIfSession.open(gpt_path, positions=128)
    seen = []
    result = session.run(Choice("rank", 0.5), progress=lambda i, n, name: seen.append((i, n, name)))
    truncated = [name for name, cut in result.plan.cuts.items() if cut.needs_factors]
    factors = [s for s in seen if s[2] not in ("untouched model", "evaluation")]
    assert factors[-1] == (len(truncated), len(truncated), "") and {n for _, _, n in factors[:-1]} == set(truncated)
    chunks = len(session.evaluator.parts)
    assert [s for s in seen if s[2] == "untouched model"][-1] == (chunks, chunks, "untouched model")
    assert [s for s in seen if s[2] == "evaluation"][-1] == (chunks, chunks, "evaluation")
    assert result.metrics.kl > 0 and result.label == "rank 50%"
    again = session.run(Choice("rank", 0.5), progress=lambda *a: seen.append(a))
    assert again.prune.rebuilt == []  # nothing changed since the previous move
    independent = session.evaluator.evaluate(session.pruner.overrides())
    assert again.metrics.kl == pytest.approx(independent.kl, rel=1e-12)


def test_the_estimate_comes_first_from_a_fixed_subset_of_the_batch_positions(gpt_path):
    session = WhatIfSession.open(gpt_path, positions=512)
    estimates = []
    result = session.run(Choice("rank", 0.25), on_estimate=estimates.append)
    (estimate,) = estimates
    m = estimate.metrics
    assert m.estimate and m.positions == 8 * 32 and not result.metrics.estimate and result.estimate is m
    assert m.kl_se > 0 and abs(m.kl - result.metrics.kl) < 4 * m.kl_se + 0.2 * result.metrics.kl
    # the subset's numbers are the full batch's at those positions: first 32 tokens of 8 spread sequences
    ev = session.evaluator
    out, _ = ev.outputs(session.pruner.overrides())
    per_position = ev.positions(out).kl.reshape(ev.batch.sequences, -1)
    rows = ev._estimate.rows
    assert m.kl == pytest.approx(float(per_position[rows, :32].mean()), rel=1e-5)
    again = []
    session.run(Choice("rank", 0.25), on_estimate=again.append)
    assert again == []  # a move seen before is answered at once, without an estimate


def test_settings_are_arguments_not_state(gpt_path):
    """Two moves with different analysis settings on one session give different MP cuts, each as if alone."""
    runtime = ModelRuntime.open(gpt_path)
    session = WhatIfSession(runtime, BatchSpec(None, 128))
    loose = session.run(Choice("mp", 0.0), Settings(confidence=0.5))
    strict = session.run(Choice("mp", 0.0), Settings(estimator="median"))
    alone = WhatIfSession(runtime, BatchSpec(None, 128)).run(Choice("mp", 0.0), Settings(confidence=0.5))
    assert loose.metrics.kl == pytest.approx(alone.metrics.kl, rel=1e-12)
    assert {n: c.kept_rank for n, c in loose.plan.cuts.items()} != {n: c.kept_rank for n, c in strict.plan.cuts.items()}


def test_sessions_share_the_runtime_but_not_their_working_copies(gpt_path):
    runtime = ModelRuntime.open(gpt_path)
    a, b = WhatIfSession(runtime, BatchSpec(None, 128)), WhatIfSession(runtime, BatchSpec(None, 128))
    assert a.evaluator is b.evaluator  # one reference forward pass per text
    a.run(Choice("zero"))
    untouched = b.run(Choice("none"))
    assert untouched.metrics.kl == 0.0 and untouched.metrics.agreement == 1.0
    name = runtime.workspace.matrices[0].name
    assert not torch.equal(a.pruner.matrix(name), b.pruner.matrix(name))


def test_reference_strategies_are_one_list_and_leave_the_session_cut_alone(gpt_path):
    session = WhatIfSession.open(gpt_path, positions=128)
    mine = session.run(Choice("rank", 0.25))
    name = next(iter(mine.plan.cuts))
    before = session.pruner.matrix(name).clone()
    points = session.reference("all")
    assert [p["label"] for p in points] == [r.label for r in REFERENCE]
    fp16 = next(p for p in points if p["label"] == "fp16")
    assert fp16["compression"] == pytest.approx(2.0, rel=0.05) and fp16["kl"] < 1e-3
    assert session.pruner.plan is mine.plan and torch.equal(session.pruner.matrix(name), before)
    assert session.run(Choice("rank", 0.25)).metrics is mine.metrics


def test_reference_points_are_computed_once_for_every_session_on_the_same_evaluator(gpt_path, monkeypatch):
    """A second session on the same runtime and text gets the first one's chart points without evaluating again;
    another scope is computed anew."""
    runtime = ModelRuntime.open(gpt_path)
    a, b = WhatIfSession(runtime, BatchSpec(None, 128)), WhatIfSession(runtime, BatchSpec(None, 128))
    first = a.reference("all")
    calls = []
    real = Evaluator.evaluate
    monkeypatch.setattr(Evaluator, "evaluate", lambda self, *args, **kw: calls.append(1) or real(self, *args, **kw))
    assert b.reference("all") is first and not calls
    assert [p["label"] for p in b.reference("mlp")] == [r.label for r in REFERENCE] and calls


def test_a_model_that_needs_hyperparameters_runs_once_they_are_given(tmp_path):
    runtime = ModelRuntime.open(bare_state_dict(tmp_path / "bare.safetensors"))
    assert runtime.runnable is None and [n.name for n in runtime.needs] == ["n_head"]
    with pytest.raises(NotRunnable):
        runtime.with_hyperparameters({"n_head": 5})  # 5 does not divide the width 32
    assert runtime.generation == 0
    runtime.with_hyperparameters({"n_head": 4})
    assert runtime.runnable is not None and runtime.generation == 1 and runtime.needs == ()
    session = WhatIfSession(runtime, BatchSpec(None, 64))
    assert session.run(Choice("none")).metrics.kl == 0.0
    runtime.with_hyperparameters({"n_head": 2})  # a rebuild discards what was built from the old model
    assert session.stale and WhatIfSession(runtime, BatchSpec(None, 64)).evaluator is not session.evaluator


def test_library_keeps_one_object_per_content_and_evicts_the_oldest(tmp_path):
    paths = [save_tiny_gpt(tmp_path / f"m{i}.safetensors", config=CONFIG, seed=i) for i in range(3)]
    lib = Library(capacity=2, session_capacity=2)
    a = lib.open_path(str(paths[0]), "a", "server")
    assert lib.open_path(str(paths[0]), "a again", "server") is a  # same file: not even hashed again
    assert lib.open_checkpoint(load_checkpoint(paths[0]), "same content", "upload") is a
    b = lib.open_path(str(paths[1]), "b", "server")
    lib.get(a.sha256)  # a is now the most recently used
    lib.open_path(str(paths[2]), "c", "server")
    assert lib.get(b.sha256) is None and lib.get(a.sha256) is a and len(lib) == 2


def test_evicting_a_checkpoint_drops_its_sessions_and_frees_it(tmp_path):
    paths = [save_tiny_gpt(tmp_path / f"m{i}.safetensors", config=CONFIG, seed=i) for i in range(2)]
    lib = Library(capacity=1, session_capacity=4)
    first = lib.open_path(str(paths[0]), "a", "server")
    session = lib.session("user-1", first, BatchSpec(None, 64))
    assert lib.session("user-1", first, BatchSpec(None, 64)) is session
    assert lib.session("user-2", first, BatchSpec(None, 64)) is not session
    gone = weakref.ref(first.runtime.workspace)
    del first, session
    lib.open_path(str(paths[1]), "b", "server")  # evicts the first checkpoint and its sessions
    gc.collect()
    assert gone() is None, "something still holds the evicted checkpoint's workspace"


def test_report_holds_the_analysis_and_whatif_figures(gpt_path):
    session = WhatIfSession.open(gpt_path, positions=64)
    report = build_report(session.workspace, Settings(), session=session, choice=Choice("energy", 0.99),
                          scan_by="role")
    stems = [f.stem for f in report.figures]
    assert stems[:3] == ["ranks-by-role", "ranks-by-matrix", "params-kept"]
    assert "compression-vs-kl" in stems and "sensitivity" in stems
    html = report.html()
    assert html.count("<h2>") == len(report.figures) + len(report.tables) and "plotly" in html
    assert report.whatif.label == "energy 99%"
    only_analysis = build_report(Workspace.open(gpt_path))
    assert all(f.stem != "compression-vs-kl" for f in only_analysis.figures)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectral", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_prune_reference_prints_every_reference_strategy(gpt_path):
    out = cli("prune", str(gpt_path), "--reference", "--positions", "64")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["label"] for r in rows] == [r.label for r in REFERENCE]
    assert rows[2]["precision"] == "fp16" and rows[0]["strategy"] == "mp"


@pytest.mark.slow
def test_report_command_writes_the_html_and_every_figure(gpt_path, tmp_path):
    out = cli("report", str(gpt_path), "--html", str(tmp_path / "r.html"), "--figures", str(tmp_path / "fig"),
              "--formats", "svg", "--strategy", "rank", "--value", "0.5")
    assert out.returncode == 0, out.stderr
    html = (tmp_path / "r.html").read_text()
    assert "Spectra Explorer report" in html and "rank 50%" in html
    svgs = sorted(p.name for p in (tmp_path / "fig").glob("*.svg"))
    assert "compression-vs-kl.svg" in svgs and "ranks-by-role.svg" in svgs and len(svgs) == 7


def test_report_command_refuses_an_unknown_matrix(gpt_path):
    out = cli("report", str(gpt_path), "--matrix", "nope", "--no-whatif")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "nope" in out.stderr


# ------------------------------------------------------------------------------ background factors (issue 11)

def test_background_factors_cover_every_matrix_and_moves_during_them_give_the_same_numbers(gpt_path):
    """`start_prefetch` computes every matrix's truncation factors off the caller's thread; a move made while it
    runs (it computes what it needs itself, under the same locks) equals a move made with every factor ready."""
    cold = ModelRuntime(Workspace(load_checkpoint(gpt_path), cache=None))
    cold.runnable  # built before the thread starts, as the dashboard does
    session = WhatIfSession(cold, BatchSpec(positions=256))
    cold.start_prefetch()
    during = session.run(Choice("energy", 0.95))
    cold._prefetch.join(timeout=120)
    assert not cold.prefetching and cold.prefetch_progress == (len(cold.workspace.matrices),) * 2
    assert all(cold.workspace.has_truncation(m.name) for m in cold.workspace.matrices)
    cold.start_prefetch()  # once per checkpoint: nothing left to do, no new thread
    assert not cold.prefetching

    warm = ModelRuntime(Workspace(load_checkpoint(gpt_path), cache=None))
    for m in warm.workspace.matrices:
        warm.workspace.truncation(m.name)
    after = WhatIfSession(warm, BatchSpec(positions=256)).run(Choice("energy", 0.95))
    assert during.metrics.kl == pytest.approx(after.metrics.kl, rel=1e-6)
    assert during.metrics.agreement == after.metrics.agreement and during.metrics.kl > 0


def test_background_factors_stop_when_asked(gpt_path):
    runtime = ModelRuntime(Workspace(load_checkpoint(gpt_path), cache=None))
    runtime.stop_prefetch()  # before any start: harmless
    runtime.start_prefetch()
    runtime.stop_prefetch(wait=True)
    done, total = runtime.prefetch_progress
    assert not runtime.prefetching and done <= total == len(runtime.workspace.matrices)
    runtime.start_prefetch(names=[m.name for m in runtime.workspace.matrices])  # an explicit list runs again
    runtime._prefetch.join(timeout=120)
    assert all(runtime.workspace.has_truncation(m.name) for m in runtime.workspace.matrices)
