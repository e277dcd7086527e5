"""LoRA / PEFT adapters (spectral/lora.py): tiny base models built with transformers and adapters written by the real
`peft` package (save_pretrained), merged by us and checked against peft's own merge_and_unload; then compared as
base vs base + (α/r)·B·A (spectral/compare.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from streamlit.testing.v1 import AppTest

from spectral import cli
from spectral.checkpoint import CheckpointError, load_checkpoint
from spectral.compare import compare, open_pair
from spectral.lora import MergedCheckpoint, load_adapter, merge_adapter
from spectral.matrices import find_matrices, matrix_view

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
registered = pytest.mark.skipif(not any(m.__name__ == "spectral.commands.compare" for m in cli.COMMANDS),
                                reason="`compare` is not registered in spectral/cli.py yet")


def _randomise_b(model, seed: int) -> None:
    """PEFT initialises one factor to zero (lora_B; lora_embedding_A for embeddings), so ΔW = 0; trained ones are
    not."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding" in name:
            with torch.no_grad():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def build(folder: Path, family: str, lora: dict, *, seed: int = 0) -> tuple[Path, Path, dict]:
    """A tiny base (GPT-2: Conv1D in × out; Llama: Linear out × in) saved with save_pretrained, an adapter saved by
    peft, and peft's merge_and_unload state dict (the oracle)."""
    torch.manual_seed(seed)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=2, eos_token_id=0, bos_token_id=0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, eos_token_id=0, bos_token_id=0, pad_token_id=0))
    base, adapter = folder / "base", folder / "adapter"
    model.save_pretrained(base)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**lora))
    _randomise_b(wrapped, seed)
    wrapped.save_pretrained(adapter)
    merged = {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    return base, adapter, merged


CASES = {
    "gpt2 conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "llama rslora with patterns": ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 use_rslora=True, rank_pattern={"down_proj": 2},
                                                 alpha_pattern={"v_proj": 4})),
    "llama embedding": ("llama", dict(r=3, lora_alpha=6, target_modules=["embed_tokens", "up_proj"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft_merge_and_unload(tmp_path, case):
    family, lora = CASES[case]
    base_path, adapter_path, oracle = build(tmp_path, family, lora)
    base = load_checkpoint(base_path)
    merged = merge_adapter(base, load_adapter(adapter_path))
    assert isinstance(merged, MergedCheckpoint) and merged.adapted
    for name in base.names():
        ours = merged.tensor(name).float()
        torch.testing.assert_close(ours, oracle[name].float(), rtol=0, atol=1e-6, msg=name)
    for info in merged.adapted.values():  # rank and scaling as PEFT defines them
        r = 2 if info.module.endswith("down_proj") else lora["r"]
        alpha = 4 if info.module.endswith("v_proj") else lora["lora_alpha"]
        assert info.rank == r and info.alpha == alpha
        assert info.scaling == pytest.approx(alpha / math.sqrt(r) if lora.get("use_rslora") else alpha / r)


def test_compare_base_with_its_adapter_reports_rank_scaling_and_the_merged_spectrum(tmp_path):
    base_path, adapter_path, oracle = build(tmp_path, "gpt2", CASES["gpt2 conv1d"][1])
    a, b = open_pair(base_path, adapter_path)
    result = compare(a, b)
    adapted = {m.name: m for m in result.matrices if m.lora is not None}
    assert set(adapted) == {f"transformer.h.{i}.{p}.weight" for i in range(2)
                            for p in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}
    infos = {i.name: i for i in find_matrices(a)}
    for m in result.matrices:
        if m.lora is None:
            assert m.delta.relative_norm == 0.0 and m.delta.n_signal == 0
            continue
        assert m.delta.n_signal == 4 and m.lora.rank == 4 and m.lora.scaling == 2.0
        w = matrix_view(a.tensor(m.name), infos[m.name]).double()
        merged = matrix_view(oracle[m.name], infos[m.name]).double()
        assert m.delta.relative_norm == pytest.approx(float((merged - w).norm() / w.norm()), rel=1e-5)
        expected = np.linalg.svd(merged.numpy(), compute_uv=False)  # the merged spectrum, independently
        spectrum = result.row(m.name)
        assert spectrum.b.spectral_norm == pytest.approx(expected[0], rel=1e-5)
        assert spectrum.b.frobenius_norm == pytest.approx(float(np.sqrt((expected**2).sum())), rel=1e-5)
    d = json.loads(result.to_json())
    entry = next(x for x in d["matrices"] if x["name"] == "transformer.h.0.attn.c_attn.weight")
    assert entry["lora"] == {"module": "transformer.h.0.attn.c_attn", "rank": 4, "alpha": 8.0, "scaling": 2.0}


def test_a_folder_holding_the_base_and_its_adapter_compares_alone(tmp_path):
    base_path, adapter_path, _ = build(tmp_path, "llama", CASES["llama embedding"][1])
    for f in adapter_path.iterdir():
        (base_path / f.name).write_bytes(f.read_bytes())
    a, b = open_pair(base_path)
    assert a.sha256 != b.sha256 and isinstance(b, MergedCheckpoint)
    assert a.names() == b.names()
    row = compare(a, b).row("model.embed_tokens.weight")
    assert row.lora is not None and row.delta.n_signal == 3


def test_unsupported_or_mismatched_adapters_are_one_line_errors(tmp_path):
    base_path, adapter_path, _ = build(tmp_path, "gpt2", CASES["gpt2 conv1d"][1])
    config = json.loads((adapter_path / "adapter_config.json").read_text())
    for change, message in (({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "not LoRA"),
                            ({"r": "four"}, "positive integer")):
        bad = tmp_path / f"bad-{message.split()[0]}"
        bad.mkdir()
        (bad / "adapter_model.safetensors").write_bytes((adapter_path / "adapter_model.safetensors").read_bytes())
        (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message) as info:
            load_adapter(bad)
        assert "\n" not in str(info.value)
    other = tmp_path / "other"
    other.mkdir()
    tensors = load_file(adapter_path / "adapter_model.safetensors")
    tensors = {k: torch.cat([v, v], 1) if k.endswith("lora_A.weight") else v for k, v in tensors.items()}
    save_file(tensors, str(other / "adapter_model.safetensors"))
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="but the base"):
        merge_adapter(load_checkpoint(base_path), load_adapter(other))
    half = tmp_path / "half"
    half.mkdir()
    save_file({k: v for k, v in load_file(adapter_path / "adapter_model.safetensors").items() if "lora_A" in k},
              str(half / "adapter_model.safetensors"))
    (half / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="without its partner"):
        load_adapter(half)


@pytest.mark.slow
@registered
def test_cli_compares_a_base_with_an_adapter_folder(tmp_path):
    base_path, adapter_path, _ = build(tmp_path, "gpt2", CASES["gpt2 conv1d"][1])
    run = subprocess.run([sys.executable, "-m", "spectral", "compare", str(base_path), str(adapter_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    d = json.loads(run.stdout)
    assert sum("lora" in m for m in d["matrices"]) == 6 and d["b"]["format"] == "lora"
    (adapter_path / "adapter_config.json").write_text("{broken")
    bad = subprocess.run([sys.executable, "-m", "spectral", "compare", str(base_path), str(adapter_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 3 and len(bad.stderr.strip().splitlines()) == 1


def test_compare_page_merges_an_uploaded_adapter_onto_a(tmp_path, monkeypatch):
    _, adapter_path, _ = build(tmp_path / "models", "gpt2", CASES["gpt2 conv1d"][1])
    monkeypatch.setenv("SPECTRA_MODELS", str(tmp_path / "models"))
    at = AppTest.from_file(str(ROOT / "pages" / "compare.py"), default_timeout=240).run()
    at.segmented_control(key="cmp_A_source").set_value("Server folder").run()
    at.selectbox(key="cmp_A_server").set_value("base/").run()
    at.segmented_control(key="cmp_B_source").set_value("Upload").run()
    at.file_uploader(key="cmp_B_upload").set_value([
        (name, (adapter_path / name).read_bytes(), "application/octet-stream")
        for name in ("adapter_config.json", "adapter_model.safetensors")]).run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Changed"] == "6" and metrics["Low-rank updates"] == "6"  # rank-4 updates of 6 adapted matrices
    table = at.dataframe[0].value
    assert sorted(table["LoRA rank"].dropna().astype(int).tolist()) == [4] * 6
