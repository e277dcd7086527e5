"""`python -m spectral analyze`: DESIGN.md's JSON contract, CSV, exit codes and one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.rmt_oracles import spiked

ROOT = Path(__file__).resolve().parent.parent
MATRIX_KEYS = {"name", "shape", "role", "tied_with", "sigma", "edge_upper", "edge_lower", "n_signal", "n_below",
               "z_max", "energy_rank", "utilization", "participation_ratio", "stable_rank", "effective_rank",
               "spectral_norm", "frobenius_norm", "alpha", "ave_w_phi", "ks_distance", "warnings"}
NULL_KEYS = {"null", "null_ok", "frac_above", "frac_below", "ks_whole", "row_cv", "col_cv", "row_spread", "col_spread",
             "excess_kurtosis", "shuffles", "quant", "quant_sigma"}  # issue 13


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "spectral", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """Two planted spikes in a 200×800 noise matrix, an embedding tied to a head, a bias and a NaN matrix."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    emb = torch.from_numpy(spiked(800, 200, [3.0, 4.0], sigma=0.02, seed=1)).float()
    bad = torch.randn(64, 128)
    bad[3, 5] = float("nan")
    save_file({"tok_emb.weight": emb, "lm_head.weight": emb.clone(),
               "blocks.0.mlp.c_fc.weight": torch.from_numpy(spiked(512, 128, seed=3)).float(),
               "blocks.0.mlp.c_fc.bias": torch.zeros(512), "blocks.0.attn.c_proj.weight": bad}, str(path))
    return path


def test_analyze_writes_design_json(small_checkpoint, tmp_path):
    out = tmp_path / "a.json"
    result = run_cli("analyze", small_checkpoint, "--json", out, "--csv", tmp_path / "a.csv")
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert set(doc) >= {"checkpoint", "settings", "matrices", "summary"}
    assert set(doc["checkpoint"]) >= {"path", "sha256", "format", "n_tensors", "n_params"}
    assert doc["settings"] == {"estimator": "bema", "confidence": 0.99, "energy": 0.999, "null": "mp"}
    by_name = {m["name"]: m for m in doc["matrices"]}
    assert set(by_name) == {"tok_emb.weight", "blocks.0.mlp.c_fc.weight"}, "tied pair once, bias and NaN out"
    for m in doc["matrices"]:
        assert set(m) >= MATRIX_KEYS | NULL_KEYS
        assert m["null"] == "mp" and m["shuffles"] is None and m["quant"] is None
    emb = by_name["tok_emb.weight"]
    assert emb["tied_with"] == ["lm_head.weight"] and emb["role"] == "embedding"
    assert emb["shape"] == [800, 200] and emb["n_signal"] == 2
    assert abs(emb["sigma"] - 0.02) < 0.002
    assert by_name["blocks.0.mlp.c_fc.weight"]["n_signal"] == 0
    s = doc["summary"]
    assert s["n_matrices"] == 2 and s["matrix_params"] == 800 * 200 + 512 * 128
    assert s["params_kept_mp"] == 2 * (800 + 200)
    assert "blocks.0.attn.c_proj.weight" in result.stderr and "NaN" in result.stderr
    assert "tok_emb.weight" in result.stdout, "a human-readable table goes to stdout when --json is a file"
    csv_lines = (tmp_path / "a.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("name,shape,role")


def test_analyze_prints_json_to_stdout_and_respects_settings(small_checkpoint):
    result = run_cli("analyze", small_checkpoint, "--estimator", "median", "--confidence", "0.9", "--energy", "0.5")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["settings"] == {"estimator": "median", "confidence": 0.9, "energy": 0.5, "null": "mp"}


@pytest.mark.parametrize("content, problem", [(b"", "empty"), (b"hello world, not weights" * 3, "header")])
def test_bad_checkpoint_exits_3_with_one_line(tmp_path, content, problem):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    result = run_cli("analyze", bad)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.safetensors" in lines[0] and problem in lines[0].lower()


def test_missing_path_exits_3(tmp_path):
    result = run_cli("analyze", tmp_path / "nope.pt")
    assert result.returncode == 3 and "nope.pt" in result.stderr


def test_bad_arguments_exit_2(small_checkpoint):
    result = run_cli("analyze", small_checkpoint, "--confidence", "7")
    assert result.returncode == 2


def test_role_table_sums_per_role(small_checkpoint):
    result = run_cli("analyze", small_checkpoint, "--table")
    assert result.returncode == 0, result.stderr
    assert "| embedding | 1 | 2/200 |" in result.stdout
    assert "null mp" in result.stdout.splitlines()[0]


@pytest.mark.parametrize("null", ["biwhitened", "permutation"])
def test_analyze_null_option_changes_what_signal_refers_to(small_checkpoint, null):
    result = run_cli("analyze", small_checkpoint, "--null", null)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["settings"]["null"] == null
    emb = next(m for m in doc["matrices"] if m["name"] == "tok_emb.weight")
    assert emb["null"] == null and emb["n_signal"] == 2  # two planted spikes in i.i.d. noise, under any null
    assert emb["null_ok"] is True
    assert emb["shuffles"] == (32 if null == "permutation" else None)
    table = run_cli("analyze", small_checkpoint, "--null", null, "--table")
    assert f"null {null}" in table.stdout.splitlines()[0]


def test_analyze_rejects_an_unknown_null(small_checkpoint):
    result = run_cli("analyze", small_checkpoint, "--null", "bootstrap")
    assert result.returncode == 2 and "bootstrap" in result.stderr


def test_nulls_command_writes_per_role_counts_under_each_null(small_checkpoint, tmp_path):
    # in-process through the command's own parser: spectral/cli.py registers it (the lead's file)
    import argparse

    from spectral.commands import nulls as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "nulls.json"
    args = parser.parse_args(["nulls", str(small_checkpoint), "--json", str(out), "--nulls", "mp,biwhitened"])
    assert command.run(args) == 0
    doc = json.loads(out.read_text())
    assert doc["view"] == "nulls" and doc["nulls"] == ["mp", "biwhitened"]
    emb = next(r for r in doc["roles"] if r["role"] == "embedding")
    assert emb["n_signal"] == {"mp": 2, "biwhitened": 2} and emb["null_fits"] == {"mp": 1, "biwhitened": 1}
    assert emb["fitting_signal"] == 2 and emb["fitting_signal_pct"] == pytest.approx(1.0)
    m = next(m for m in doc["matrices"] if m["name"] == "tok_emb.weight")
    assert m["fitting_null"] == "mp" and set(m) >= {"excess_kurtosis", "row_spread", "col_spread", "ks_whole"}
    assert doc["totals"]["matrices"] == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["nulls", str(small_checkpoint), "--nulls", "mp,nope"])


def test_analyze_takes_several_checkpoints_and_folders_of_them(small_checkpoint, tmp_path):
    """Issue 14: CKPT... or a folder of checkpoints; JSON lines on stdout, one list with --json; a file that cannot
    be read is reported in one line, the others still analysed, and the exit code says 3."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for step in (10, 20):
        state = {"blocks.0.mlp.c_fc.weight": torch.from_numpy(spiked(512, 128, [2.0 + step / 10], seed=step)).float()}
        save_file(state, str(run_dir / f"step-{step}.safetensors"))
    (run_dir / "step-30.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    done = run_cli("analyze", run_dir, small_checkpoint)
    assert done.returncode == 3
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        line for line in done.stderr.splitlines() if "step-30.safetensors" in line and line.startswith("error:")]
    documents = [json.loads(line) for line in done.stdout.splitlines()]
    assert [d["checkpoint"]["path"] for d in documents] == [str(run_dir / "step-10.safetensors"),
                                                           str(run_dir / "step-20.safetensors"), str(small_checkpoint)]
    single = json.loads(run_cli("analyze", run_dir / "step-20.safetensors").stdout)
    for key in ("n_signal", "sigma", "energy_rank"):
        assert documents[1]["matrices"][0][key] == single["matrices"][0][key]
    assert documents[0]["matrices"][0]["n_signal"] >= 1  # each file's own planted spike, not the other's
    out = tmp_path / "all.json"
    assert run_cli("analyze", run_dir / "step-10.safetensors", small_checkpoint, "--json", out).returncode == 0
    assert [d["checkpoint"]["sha256"] for d in json.loads(out.read_text())] == [documents[0]["checkpoint"]["sha256"],
                                                                               documents[2]["checkpoint"]["sha256"]]
    refused = run_cli("analyze", run_dir, small_checkpoint, "--csv", tmp_path / "x.csv")
    assert refused.returncode == 2 and "--csv writes one checkpoint's table" in refused.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("analyze", empty).returncode == 2


def test_analyze_device_and_ray_errors_are_one_line(small_checkpoint):
    for args, words in ((["--device", "cuda"], "--device cuda: no CUDA GPU available"),
                        (["--ray", "127.0.0.1:9"], "nothing answers at 127.0.0.1:9")):
        done = run_cli("analyze", small_checkpoint, *args)
        assert done.returncode == 2 and words in done.stderr and done.stderr.count("\n") == 1, done.stderr
    local = json.loads(run_cli("analyze", small_checkpoint, "--device", "cpu").stdout)
    auto = json.loads(run_cli("analyze", small_checkpoint, "--device", "auto").stdout)  # no GPU here: the CPU route
    assert [m["n_signal"] for m in local["matrices"]] == [m["n_signal"] for m in auto["matrices"]]


def test_a_float32_device_states_the_error_it_adds(small_checkpoint, monkeypatch, capsys):
    """A GPU without full-rate FP64 computes float32 singular values; the CLI says so with the error measured on the
    checkpoint's first matrix. The route is the same on any torch device, so a float32 CPU device stands in here."""
    import torch

    from spectral.cli import main
    from spectral.commands import common
    from spectral.devices import Device

    float32_cpu = Device("cpu", torch.float32, "CPU standing in for a float32 GPU")
    monkeypatch.setattr(common, "resolve_device", lambda requested: float32_cpu)
    assert main(["analyze", str(small_checkpoint), "--device", "cuda"]) == 0
    err = capsys.readouterr().err
    found = [line for line in err.splitlines() if line.startswith("note: spectra on ")]
    assert len(found) == 1 and "float32 singular values, measured max |Δs|/s_max = " in found[0]
    error = float(found[0].split("= ")[1].split()[0])
    assert 0 < error < 1e-5  # float32 rounding of singular values, not a wrong route
