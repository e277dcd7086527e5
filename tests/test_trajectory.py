"""Training trajectories (spectral/trajectory.py): finding a run's checkpoints and their steps in the layouts
training scripts write, every metric against step equal to analysing each checkpoint alone, the cache, the server
folder's confinement, the JSON contract, the CLI, the shipped demo run, the snapshot option of models/train_demo.py
and the Compare page's trajectory view."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from spectral import cli
from spectral import trajectory as trajectory_module
from spectral.analysis import Settings
from spectral.checkpoint import DEMO_DIR, CheckpointError
from spectral.compare import compare, evaluate_pair, pair_runtimes
from spectral.compare_figures import trajectory_metric, trajectory_ranks
from spectral.runtime import BatchSpec
from spectral.trajectory import clear_cache, find_checkpoints, run_folders, step_from_name, trajectory
from spectral import workspace as workspace_module
from spectral.workspace import Workspace
from tests.rmt_oracles import spiked

ROOT = Path(__file__).resolve().parent.parent
DEMO_RUN = DEMO_DIR / "trajectory"
registered = pytest.mark.skipif(not any(m.__name__ == "spectral.commands.trajectory" for m in cli.COMMANDS),
                                reason="`trajectory` is not registered in spectral/cli.py yet")
shipped = pytest.mark.skipif(not DEMO_RUN.is_dir(), reason="the demo's trajectory (models/demo/trajectory) is missing")


@pytest.fixture(autouse=True)
def private_disk_cache(tmp_path, monkeypatch):
    """Each test its own disk cache (spectral/cache.py), and nothing kept in memory from another test."""
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "cache"))
    clear_cache()


def growing(step: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 'training' state: noise plus spikes that grow with the step (none at step 0), like signal leaving the bulk."""
    strengths = [0.5 * step / 100 * k for k in (2.0, 3.0, 4.0)] if step else []
    return {"layer.0.mlp.c_fc.weight": torch.from_numpy(spiked(256, 96, strengths, sigma=0.02, seed=seed)).float(),
            "layer.0.attn.c_proj.weight": torch.from_numpy(spiked(96, 96, [], sigma=0.02, seed=seed + 1)).float(),
            "layer.0.ln.weight": torch.ones(96)}


def write_run(folder: Path, steps=(0, 100, 200, 400)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for step in steps:
        save_file(growing(step), str(folder / f"model-step{step}.safetensors"))
    return folder


# ---------------------------------------------------------------------------------------------------- discovery

def test_steps_from_names():
    assert step_from_name("ckpt_2000.pt") == 2000
    assert step_from_name("step-000300.safetensors") == 300
    assert step_from_name("run2-epoch3-step200.safetensors") == 200
    assert step_from_name("final.safetensors") is None


def test_hugging_face_checkpoint_folders_in_numeric_order(tmp_path):
    for step in (10, 9, 100):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file(growing(step), str(folder / "model.safetensors"))
        (folder / "config.json").write_text("{}")
    save_file(growing(1), str(tmp_path / "model.safetensors"))  # the final model at the top: not a point
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x04junk")
    points, notes = find_checkpoints(tmp_path)
    assert [(p.path, p.step, p.step_from) for p in points] == [
        ("checkpoint-9/", 9, "folder name"), ("checkpoint-10/", 10, "folder name"),
        ("checkpoint-100/", 100, "folder name")]
    assert notes == []


def test_nanogpt_iter_num_wins_over_the_name_and_stepless_files_are_left_out(tmp_path):
    for iter_num, name in ((250, "ckpt_run2.pt"), (50, "ckpt_run7.pt")):
        state = {"transformer.h.0.mlp.c_fc.weight": growing(iter_num)["layer.0.mlp.c_fc.weight"]}
        torch.save({"model": state, "model_args": {"n_layer": 1}, "iter_num": iter_num, "best_val_loss": 3.2},
                   tmp_path / name)
    save_file(growing(0), str(tmp_path / "final.safetensors"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    points, notes = find_checkpoints(tmp_path)
    assert [(p.path, p.step, p.step_from) for p in points] == [("ckpt_run7.pt", 50, "iter_num"),
                                                                ("ckpt_run2.pt", 250, "iter_num")]
    assert len(notes) == 1 and "final.safetensors" in notes[0] and "no step" in notes[0]


def test_an_unreadable_checkpoint_is_left_out_and_a_run_of_them_is_an_error(tmp_path):
    run = write_run(tmp_path / "run", steps=(0, 100))
    (run / "model-step50.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    points, notes = find_checkpoints(run)
    assert [p.step for p in points] == [0, 100]
    assert any("model-step50.safetensors: left out" in n for n in notes)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt_1.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="ckpt_1.pt"):
        find_checkpoints(bad)
    with pytest.raises(CheckpointError, match="no such folder"):
        find_checkpoints(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints with a step"):
        find_checkpoints(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------- the numbers

def test_every_metric_against_step_equals_analysing_each_checkpoint_alone(tmp_path):
    run = write_run(tmp_path / "run")
    settings = Settings(confidence=0.95, energy=0.99)
    result = trajectory(run, settings)
    assert result.steps == [0, 100, 200, 400]
    series = {m.name: m for m in result.matrices}
    for point in result.checkpoints:
        alone = Workspace.open(run / point.path).analyze(settings)
        for row in alone.matrices:
            s = series[row.name]
            i = s.step.index(point.step)
            assert (s.sigma[i], s.n_signal[i], s.energy_rank[i], s.alpha[i], s.stable_rank[i]) == (
                row.sigma, row.n_signal, row.energy_rank, row.alpha, row.stable_rank)
    # the planted spikes leave the bulk as they grow (RMT.md §9: BBP threshold σ(MN)^{1/4} in weight units)
    assert series["layer.0.mlp.c_fc.weight"].n_signal[0] == 0
    assert series["layer.0.mlp.c_fc.weight"].n_signal[-1] == 3
    assert series["layer.0.attn.c_proj.weight"].n_signal == [0, 0, 0, 0]


def test_json_contract_and_roles(tmp_path):
    result = trajectory(write_run(tmp_path / "run", steps=(200, 0, 100)))
    d = json.loads(result.to_json())
    assert set(d) == {"checkpoints", "matrices"}
    assert d["checkpoints"] == [{"path": f"model-step{s}.safetensors", "step": s} for s in (0, 100, 200)]
    for m in d["matrices"]:
        assert set(m) == {"name", "role", "step", "sigma", "n_signal", "energy_rank", "alpha", "stable_rank"}
        assert m["step"] == [0, 100, 200] and all(len(m[k]) == 3 for k in ("sigma", "n_signal", "energy_rank"))
    roles = {r.role: r for r in result.by_role()}
    assert set(roles) == {"mlp_up", "attn_out"}
    assert roles["mlp_up"].full_rank == [96, 96, 96]


def test_a_rerun_comes_from_the_cache_and_a_changed_file_is_read_again(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    clear_cache()
    opened = []
    real = trajectory_module.load_checkpoint
    monkeypatch.setattr(trajectory_module, "load_checkpoint", lambda path: opened.append(path) or real(path))
    cold = trajectory(run)
    assert len(opened) == 4
    warm = trajectory(run)
    assert warm.to_dict() == cold.to_dict() and len(opened) == 4  # nothing opened (nor hashed) again
    save_file(growing(400, seed=9), str(run / "model-step400.safetensors"))  # one file changes on disk
    changed = trajectory(run)
    assert len(opened) == 5 and changed.matrices[0].sigma[-1] != cold.matrices[0].sigma[-1]


def test_a_new_process_reads_the_spectra_from_the_disk_cache(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    first = trajectory(run, Settings(confidence=0.9))
    clear_cache()  # as a new process would start
    computed = []
    real = workspace_module.matrix_spectrum  # the per-matrix computation itself: not run when the disk has it
    monkeypatch.setattr(workspace_module, "matrix_spectrum", lambda *a, **k: computed.append(1) or real(*a, **k))
    again = trajectory(run, Settings(confidence=0.9))
    assert computed == [] and again.to_dict() == first.to_dict()
    monkeypatch.setenv("SPECTRA_CACHE", "off")
    clear_cache()
    assert trajectory(run, Settings(confidence=0.9)).to_dict() == first.to_dict() and computed  # computed again


def test_a_server_run_reads_nothing_outside_the_server_folder(tmp_path):
    root = tmp_path / "models"
    run = write_run(root / "run")
    secret = write_run(tmp_path / "outside", steps=(999,))
    (run / "model-step999.safetensors").symlink_to(secret / "model-step999.safetensors")
    result = trajectory("run", root=root)
    assert result.steps == [0, 100, 200, 400]
    assert any("model-step999" in n and "outside" in n for n in result.notes)
    assert run_folders(root) == ["run"]
    with pytest.raises(CheckpointError, match="inside the server"):
        trajectory("../outside", root=root)


def test_figures_one_line_per_role_and_per_matrix(tmp_path):
    result = trajectory(write_run(tmp_path / "run", steps=(0, 3, 30, 400)))
    fig = trajectory_ranks(result)
    assert len(fig.data) == 2 * len(result.by_role())  # signal rank and energy rank for each role
    assert fig.layout.xaxis.type == "log" and "0" in fig.layout.xaxis.ticktext  # 3 .. 400: LOG_STEPS apart, and 0
    assert trajectory_ranks(trajectory(write_run(tmp_path / "lin", steps=(0, 100, 200)))).layout.xaxis.type == "linear"
    by_matrix = trajectory_metric(result, "n_signal", by="matrix")
    assert [list(t.y) for t in by_matrix.data] == [m.n_signal for m in result.matrices]


@pytest.mark.slow
def test_ray_map_gives_the_local_numbers(tmp_path):
    pytest.importorskip("ray")
    run = write_run(tmp_path / "run", steps=(0, 400))
    local = trajectory(run).to_dict()
    clear_cache()
    remote = trajectory(run, ray="local")
    assert remote.where.startswith("Ray cluster")
    d = remote.to_dict()
    assert d["checkpoints"] == local["checkpoints"]
    for ours, theirs in zip(d["matrices"], local["matrices"]):  # workers run one thread: equal to rounding
        assert (ours["name"], ours["step"], ours["n_signal"], ours["energy_rank"]) == (
            theirs["name"], theirs["step"], theirs["n_signal"], theirs["energy_rank"])
        for key in ("sigma", "alpha", "stable_rank"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-9)


# ------------------------------------------------------------------------------------------------------- CLI

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "spectral", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.slow
@registered
def test_cli_trajectory_json_table_and_exit_codes(tmp_path):
    run = write_run(tmp_path / "run", steps=(0, 400))
    ok = run_cli("trajectory", run)
    assert ok.returncode == 0, ok.stderr
    assert [c["step"] for c in json.loads(ok.stdout)["checkpoints"]] == [0, 400]
    out = tmp_path / "t.json"
    table = run_cli("trajectory", run, "--json", out)
    assert table.returncode == 0 and "| mlp_up | 400 | 3/96 |" in table.stdout and json.loads(out.read_text())
    missing = run_cli("trajectory", tmp_path / "nope")
    assert missing.returncode == 3 and len(missing.stderr.strip().splitlines()) == 1 and "nope" in missing.stderr
    bad = run_cli("trajectory", run, "--energy", "1.5")
    assert bad.returncode == 2 and sum("error:" in line for line in bad.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------------- the shipped demo run

@shipped
def test_the_shipped_demo_run_leaves_the_mp_bulk_as_it_trains():
    """At initialisation every matrix is i.i.d. Gaussian (models/gpt.py's init), so MP finds no signal; trained
    steps have signal in every role. Snapshots are fp16 and a few MB."""
    points, notes = find_checkpoints(DEMO_RUN)
    assert len(points) >= 4 and points[0].step == 0 and not notes
    assert sum(p.stat().st_size for p in DEMO_RUN.glob("*.safetensors")) < 12 * 2**20
    result = trajectory(DEMO_RUN)
    assert all(m.n_signal[0] == 0 for m in result.matrices)
    for role in result.by_role():
        assert role.n_signal[-1] > 0
        assert role.energy_pct[-1] > 80  # the energy rank stays high while the signal rank grows
    assert {m.name for m in result.matrices} == {i.name for i in Workspace.open("demo").matrices}


@shipped
def test_the_last_snapshot_is_the_demo_in_fp16():
    """Step 1000 of the replayed run is the bundled demo: the update is at fp16's rounding level (no signal in ΔW),
    the subspaces do not move, and B in A's model gives A's outputs to a small KL."""
    last = DEMO_RUN / find_checkpoints(DEMO_RUN)[0][-1].path
    result = compare("demo", last)
    assert all(m.delta.n_signal == 0 and m.delta.relative_norm < 1e-3 for m in result.matrices)
    assert all(max(m.subspace.angles_deg, default=0.0) < 1.0 for m in result.matrices)
    evaluation = evaluate_pair(*pair_runtimes("demo", last), BatchSpec(positions=512))
    assert evaluation.metrics.kl < 1e-3 and evaluation.metrics.agreement > 0.95


@shipped
def test_compare_page_shows_the_shipped_trajectory():
    at = AppTest.from_file(str(ROOT / "pages" / "compare.py"), default_timeout=240).run()
    at.segmented_control(key="cmp_mode").set_value("Training run").run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    assert len(at.get("plotly_chart")) == 2
    at.selectbox(key="traj_metric").set_value("stable_rank").run()
    at.segmented_control(key="traj_by").set_value("matrix").run()
    assert not at.exception
    steps = ", ".join(str(p.step) for p in find_checkpoints(DEMO_RUN)[0])
    assert any(steps in c.value for c in at.caption)


@pytest.mark.slow
def test_train_demo_writes_snapshots_and_leaves_the_demo_alone(tmp_path):
    demo = DEMO_DIR / "model.safetensors"
    before = hashlib.sha256(demo.read_bytes()).hexdigest() if demo.is_file() else None
    run = subprocess.run([sys.executable, "-m", "models.train_demo", "--snapshots", str(tmp_path / "run"),
                          "--snapshot-steps", "0,2", "--n-layer", "1", "--vocab", "300", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    points, _ = find_checkpoints(tmp_path / "run")
    assert [(p.path, p.step, p.step_from) for p in points] == [("step-000000.safetensors", 0, "step"),
                                                                ("step-000002.safetensors", 2, "step")]
    ws = Workspace.open(tmp_path / "run" / "step-000002.safetensors")
    assert set(ws.checkpoint.dtypes.values()) == {"float16"} and "lm_head.weight" not in ws.checkpoint.shapes
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    if before is not None:
        assert hashlib.sha256(demo.read_bytes()).hexdigest() == before
    assert np.isfinite([m.sigma for m in ws.analyze().matrices]).all()
