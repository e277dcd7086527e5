"""Checkpoint loading (spectral/checkpoint.py): every format (GGUF and healed files included), tied tensors, content
hashes, and every bad input.

Bad files are written here, byte by byte; the malicious ones would leave a marker file if their payload ran."""
import hashlib
import json
import os
import pickle
import shlex
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from spectral import checkpoint as ck
from spectral import gguf as spectral_gguf
from spectral.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_checkpoint_bytes,
    load_checkpoint_files,
    open_in_folder,
)
from spectral.gguf import GGUF_LIBRARY
from spectral.heal import LOADER_NOTE, densify
from spectral.workspace import Workspace
from tests.test_gguf import _byte_level_vocab as byte_level_vocab
from tests.test_gguf import _file as gguf_raw
from tests.test_gguf import _info as gguf_info
from tests.test_gguf import gaussian, write_gguf

# ------------------------------------------------------------------------------------------------------------ helpers

def st_raw(header: dict, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file written by hand: 8-byte little-endian header length, JSON header, tensor data."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"tok_emb.weight": torch.randn(40, 8, generator=g),
            "blocks.0.attn.c_attn.weight": torch.randn(24, 8, generator=g),
            "blocks.0.attn.c_attn.bias": torch.randn(24, generator=g),
            "ln_f.weight": torch.ones(8)}


def refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "a refusal is one line"
    return message


class RunsShell:
    """Unpickling this with plain pickle would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class CallsEval:
    """Unpickling this with plain pickle would create `marker` through builtins.eval."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('ran')",)


# ------------------------------------------------------------------------------------------------------- safetensors

def test_safetensors_file_lists_names_shapes_and_dtypes(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path))
    ckpt = load_checkpoint(path)
    assert ckpt.format == "safetensors"
    assert set(ckpt.names()) == set(small_state())
    assert ckpt.shapes["tok_emb.weight"] == (40, 8)
    assert ckpt.dtypes["blocks.0.attn.c_attn.bias"] == "float32"
    assert ckpt.n_tensors == 4
    assert ckpt.files == [str(path)]


def test_safetensors_tensor_values_round_trip(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path))
    ckpt = load_checkpoint(path)
    for name, value in small_state().items():
        assert torch.equal(ckpt.tensor(name), value)


def test_safetensors_path_reads_no_tensor_until_asked(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(4, 3), "b.weight": torch.randn(5, 3)}, str(path))
    reads = []
    original = ck._SafetensorsPath.__call__
    monkeypatch.setattr(ck._SafetensorsPath, "__call__", lambda self, name: reads.append(name) or original(self, name))
    ckpt = load_checkpoint(path)
    assert reads == []
    ckpt.tensor("b.weight")
    assert reads == ["b.weight"]


def test_tensor_handed_out_is_the_callers_to_modify(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.zeros(3, 3)}, str(path))
    ckpt = load_checkpoint(path)
    ckpt.tensor("a.weight").add_(1.0)
    assert torch.equal(ckpt.tensor("a.weight"), torch.zeros(3, 3))
    assert load_checkpoint(path).sha256 == ckpt.sha256


def test_tensor_from_bytes_upload_is_the_callers_to_modify(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.zeros(3, 3)}, str(path))
    ckpt = load_checkpoint_bytes(path.read_bytes(), "model.safetensors")
    ckpt.tensor("a.weight").add_(1.0)
    assert torch.equal(ckpt.tensor("a.weight"), torch.zeros(3, 3))


def test_sha256_of_a_file_is_the_sha256_of_its_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path))
    assert load_checkpoint(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_is_the_same_via_path_and_via_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path))
    assert load_checkpoint(path).sha256 == load_checkpoint_bytes(path.read_bytes(), "upload.safetensors").sha256


def test_sha256_is_streamed_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "HASH_CHUNK", 64)  # many chunks for a small file
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path))
    assert load_checkpoint(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_bytes_upload_reads_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path))
    ckpt = load_checkpoint_bytes(path.read_bytes(), "model.safetensors")
    assert ckpt.format == "safetensors" and ckpt.source == "model.safetensors"
    assert torch.equal(ckpt.tensor("tok_emb.weight"), small_state()["tok_emb.weight"])


def test_safetensors_metadata_config_becomes_the_config(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path), metadata={"config": json.dumps({"n_embd": 8}), "format": "pt"})
    ckpt = load_checkpoint(path)
    assert ckpt.config == {"n_embd": 8}
    assert ckpt.metadata["format"] == "pt"


def test_safetensors_names_come_in_natural_order(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({f"blocks.{i}.w": torch.zeros(2, 2) for i in (10, 2, 1)}, str(path))
    assert load_checkpoint(path).names() == ["blocks.1.w", "blocks.2.w", "blocks.10.w"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_safetensors_keeps_the_stored_dtype(tmp_path, dtype):
    value = torch.randn(6, 4).to(dtype)
    path = tmp_path / "model.safetensors"
    save_file({"w": value}, str(path))
    ckpt = load_checkpoint(path)
    assert ckpt.dtypes["w"] == str(dtype).removeprefix("torch.")
    assert ckpt.tensor("w").dtype == dtype and torch.equal(ckpt.tensor("w"), value)


def test_bin_extension_holding_safetensors_is_read_as_safetensors(tmp_path):
    path = tmp_path / "weights.bin"
    save_file(small_state(), str(path))
    assert load_checkpoint(path).format == "safetensors"


def test_safetensors_extension_holding_a_torch_zip_is_read_as_pytorch(tmp_path):
    path = tmp_path / "weights.safetensors"
    torch.save(small_state(), path)
    assert load_checkpoint(path).format == "pytorch"


def test_unknown_name_raises_key_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path))
    with pytest.raises(KeyError):
        load_checkpoint(path).tensor("nope")


# ----------------------------------------------------------------------------------------------------------- PyTorch

def test_pytorch_zip_state_dict_keeps_module_order(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(small_state(), path)
    ckpt = load_checkpoint(path)
    assert ckpt.format == "pytorch"
    assert ckpt.names() == list(small_state())
    assert torch.equal(ckpt.tensor("tok_emb.weight"), small_state()["tok_emb.weight"])


def test_pytorch_legacy_pickle_format_is_read(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(small_state(), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.tensor("tok_emb.weight"), small_state()["tok_emb.weight"])


def test_pytorch_bytes_upload_is_read(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(small_state(), path)
    ckpt = load_checkpoint_bytes(path.read_bytes(), "model.pt")
    assert ckpt.format == "pytorch" and ckpt.sha256 == load_checkpoint(path).sha256
    assert torch.equal(ckpt.tensor("tok_emb.weight"), small_state()["tok_emb.weight"])


def test_torch_load_is_called_with_weights_only_and_mmap(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    torch.save(small_state(), path)
    calls = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    load_checkpoint(path)
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_pytorch_keeps_the_stored_dtype(tmp_path, dtype):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.randn(5, 3).to(dtype)}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.dtypes["w"] == str(dtype).removeprefix("torch.") and ckpt.tensor("w").dtype == dtype


def test_nanogpt_checkpoint_nests_the_state_dict_under_model_with_model_args(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": small_state(), "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}},
                "model_args": {"n_layer": 1, "n_embd": 8}, "iter_num": 500, "best_val_loss": torch.tensor(1.5),
                "config": {"learning_rate": 6e-4}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.names() == list(small_state())
    assert ckpt.config == {"n_layer": 1, "n_embd": 8}
    assert ckpt.metadata["iter_num"] == "500" and ckpt.metadata["best_val_loss"] == "1.5"


@pytest.mark.parametrize("key", ["state_dict", "module", "model_state_dict"])
def test_state_dict_nested_under_a_known_key_is_found(tmp_path, key):
    path = tmp_path / "model.pt"
    torch.save({key: small_state(), "epoch": 3}, path)
    assert load_checkpoint(path).names() == list(small_state())


def test_doubly_nested_state_dict_is_found(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": {"module": small_state()}}, path)
    assert load_checkpoint(path).names() == list(small_state())


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_compile_and_ddp_prefixes_are_stripped(tmp_path, prefix):
    path = tmp_path / "model.pt"
    torch.save({"model": {prefix + k: v for k, v in small_state().items()}}, path)
    assert load_checkpoint(path).names() == list(small_state())


def test_non_tensor_entries_of_a_state_dict_are_ignored(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({**small_state(), "step": 7, "note": "hello", "extra": [1, 2]}, path)
    assert load_checkpoint(path).names() == list(small_state())


# ------------------------------------------------------------------------------------------------ Hugging Face folders

def hf_config(**extra) -> bytes:
    return json.dumps({"model_type": "llama", "hidden_size": 8, **extra}).encode()


def llama_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(30, 8, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
            "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
            "lm_head.weight": torch.randn(30, 8, generator=g)}


def write_sharded(folder: Path, state: dict[str, torch.Tensor], kind: str) -> None:
    """Two shards and their index, as transformers' save_pretrained writes them."""
    folder.mkdir(exist_ok=True)
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    suffix, index = (("safetensors", "model.safetensors.index.json") if kind == "safetensors"
                     else ("bin", "pytorch_model.bin.index.json"))
    stem = "model" if kind == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, half in enumerate(halves, start=1):
        shard = f"{stem}-{i:05d}-of-00002.{suffix}"
        part = {n: state[n] for n in half}
        if kind == "safetensors":
            save_file(part, str(folder / shard), metadata={"format": "pt"})
        else:
            torch.save(part, folder / shard)
        weight_map.update({n: shard for n in half})
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_bytes(hf_config())


def test_hf_folder_with_model_safetensors_and_config(tmp_path):
    save_file(llama_state(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes(hf_config())
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.format == "huggingface"
    assert ckpt.config["model_type"] == "llama"
    assert set(ckpt.names()) == set(llama_state())


def test_hf_folder_with_pytorch_model_bin(tmp_path):
    torch.save(llama_state(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_bytes(hf_config())
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.format == "huggingface" and ckpt.names() == list(llama_state())


def test_hf_folder_prefers_safetensors_over_bin(tmp_path):
    save_file(llama_state(0), str(tmp_path / "model.safetensors"))
    torch.save(llama_state(1), tmp_path / "pytorch_model.bin")
    ckpt = load_checkpoint(tmp_path)
    assert torch.equal(ckpt.tensor("lm_head.weight"), llama_state(0)["lm_head.weight"])


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hf_sharded_folder_reads_every_shard_through_its_index(tmp_path, kind):
    write_sharded(tmp_path, llama_state(), kind)
    ckpt = load_checkpoint(tmp_path)
    assert set(ckpt.names()) == set(llama_state())
    for name, value in llama_state().items():
        assert torch.equal(ckpt.tensor(name), value)
    assert len([f for f in ckpt.files if ".index.json" not in f and "config" not in f]) == 2


def test_hf_sharded_names_come_in_natural_order(tmp_path):
    write_sharded(tmp_path, llama_state(), "safetensors")
    names = load_checkpoint(tmp_path).names()
    assert names.index("model.layers.0.self_attn.q_proj.weight") < names.index("model.layers.1.self_attn.q_proj.weight")


def test_hf_folder_sha256_combines_file_hashes(tmp_path):
    write_sharded(tmp_path, llama_state(), "safetensors")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "README.md").write_text("not part of the content")
    used = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "tokenizer.json"]
    digest = hashlib.sha256()
    for name in sorted(used):
        digest.update(f"{name}\t{hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()}\n".encode())
    assert load_checkpoint(tmp_path).sha256 == digest.hexdigest()


def test_hf_sha256_is_the_same_for_folder_and_upload(tmp_path):
    write_sharded(tmp_path, llama_state(), "safetensors")
    upload = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert load_checkpoint_files(upload).sha256 == load_checkpoint(tmp_path).sha256


def test_uploads_that_differ_only_in_their_heldout_text_are_different_checkpoints(tmp_path):
    write_sharded(tmp_path, llama_state(), "safetensors")
    upload = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    a = load_checkpoint_files({**upload, "heldout.txt": b"one text"})
    b = load_checkpoint_files({**upload, "heldout.txt": b"another text"})
    assert a.sha256 != b.sha256
    assert a.side_files["heldout.txt"] == b"one text"


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hf_multi_file_upload_reads_every_shard(tmp_path, kind):
    write_sharded(tmp_path, llama_state(), kind)
    ckpt = load_checkpoint_files({p.name: p.read_bytes() for p in tmp_path.iterdir()})
    assert ckpt.format == "huggingface" and ckpt.config["model_type"] == "llama"
    for name, value in llama_state().items():
        assert torch.equal(ckpt.tensor(name), value)


def test_single_file_upload_through_files_is_a_plain_file(tmp_path):
    save_file(small_state(), str(tmp_path / "model.safetensors"))
    ckpt = load_checkpoint_files({"model.safetensors": (tmp_path / "model.safetensors").read_bytes()})
    assert ckpt.format == "safetensors"


def test_hf_index_naming_a_missing_shard_is_refused(tmp_path):
    write_sharded(tmp_path, llama_state(), "safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    message = refusal(load_checkpoint, tmp_path)
    assert "model.safetensors.index.json" in message and "model-00002-of-00002.safetensors" in message
    assert "missing" in message


def test_hf_index_placing_a_tensor_in_the_wrong_shard_is_refused(tmp_path):
    write_sharded(tmp_path, llama_state(), "safetensors")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    message = refusal(load_checkpoint, tmp_path)
    assert "model-00001-of-00002.safetensors" in message and "lm_head.weight" in message


def test_hf_index_without_weight_map_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert "weight_map" in refusal(load_checkpoint, tmp_path)


def test_hf_config_that_is_not_json_is_refused(tmp_path):
    save_file(small_state(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{not json")
    message = refusal(load_checkpoint, tmp_path)
    assert "config.json" in message and "not valid JSON" in message


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_bytes(hf_config())
    message = refusal(load_checkpoint, tmp_path)
    assert message.startswith(str(tmp_path)) and "no weights found" in message and "config.json" in message


def test_folder_with_several_weight_files_and_no_index_is_refused(tmp_path):
    save_file(small_state(), str(tmp_path / "a.safetensors"))
    save_file(small_state(), str(tmp_path / "b.safetensors"))
    assert "several weight files" in refusal(load_checkpoint, tmp_path)


def test_tie_word_embeddings_with_lm_head_missing_reports_the_embedding_alone(tmp_path):
    state = {k: v for k, v in llama_state().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes(hf_config(tie_word_embeddings=True))
    ckpt = load_checkpoint(tmp_path)
    assert "lm_head.weight" not in ckpt.names() and ckpt.tied_groups == []
    assert ckpt.n_params == sum(v.numel() for v in state.values())


# ------------------------------------------------------------------------------------------------------------- ties

def test_shared_storage_under_two_names_is_one_group(tmp_path):
    shared = torch.randn(6, 4)
    path = tmp_path / "model.pt"
    torch.save({"encoder.proj.weight": shared, "other.weight": torch.randn(6, 4), "decoder.proj.weight": shared}, path)
    assert load_checkpoint(path).tied_groups == [("encoder.proj.weight", "decoder.proj.weight")]


def test_views_at_different_offsets_of_one_storage_are_not_tied(tmp_path):
    fused = torch.randn(12, 4)
    path = tmp_path / "model.pt"
    torch.save({"a.weight": fused[:6], "b.weight": fused[6:]}, path)
    assert load_checkpoint(path).tied_groups == []


def test_weight_tied_module_state_dict_is_one_group(tmp_path):
    emb = torch.nn.Embedding(20, 4)
    head = torch.nn.Linear(4, 20, bias=False)
    head.weight = emb.weight
    path = tmp_path / "model.pt"
    torch.save({"model": {"tok_emb.weight": emb.weight, "lm_head.weight": head.weight}}, path)
    assert load_checkpoint(path).tied_groups == [("tok_emb.weight", "lm_head.weight")]


@pytest.mark.parametrize("embedding,head", [
    ("tok_emb.weight", "lm_head.weight"), ("wte.weight", "lm_head.weight"),
    ("transformer.wte.weight", "lm_head.weight"), ("model.embed_tokens.weight", "lm_head.weight"),
    ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"), ("shared.weight", "lm_head.weight"),
])
def test_equal_copies_of_a_known_tied_pair_are_one_group(tmp_path, embedding, head):
    value = torch.randn(20, 4)
    path = tmp_path / "model.safetensors"
    save_file({embedding: value, head: value.clone(), "x.weight": torch.randn(4, 4)}, str(path))
    assert load_checkpoint(path).tied_groups == [(embedding, head)]


def test_tied_group_names_the_embedding_first(tmp_path):
    value = torch.randn(20, 4)
    path = tmp_path / "model.safetensors"  # sorted by name, lm_head comes before tok_emb in the file
    save_file({"tok_emb.weight": value, "lm_head.weight": value.clone()}, str(path))
    assert load_checkpoint(path).tied_groups == [("tok_emb.weight", "lm_head.weight")]


def test_known_pair_with_different_values_is_not_tied(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"tok_emb.weight": torch.randn(20, 4), "lm_head.weight": torch.randn(20, 4)}, str(path))
    assert load_checkpoint(path).tied_groups == []


def test_equal_copies_under_unrelated_names_are_not_tied(tmp_path):
    value = torch.randn(8, 8)
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": value, "b.weight": value.clone()}, str(path))
    assert load_checkpoint(path).tied_groups == []


def test_metadata_tied_names_are_one_group(tmp_path):
    value = torch.randn(20, 4)
    path = tmp_path / "model.safetensors"
    save_file({"input.table": value, "output.table": value.clone()}, str(path),
              metadata={"tied": "input.table,output.table"})
    assert load_checkpoint(path).tied_groups == [("input.table", "output.table")]


def test_metadata_tied_names_with_different_values_warn_and_stay_apart(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"input.table": torch.randn(20, 4), "output.table": torch.randn(20, 4)}, str(path),
              metadata={"tied": "input.table,output.table"})
    ckpt = load_checkpoint(path)
    assert ckpt.tied_groups == [] and any("values differ" in w for w in ckpt.warnings)


def test_tie_detection_compares_only_candidate_pairs(tmp_path, monkeypatch):
    compared = []
    original = ck._same_bits
    monkeypatch.setattr(ck, "_same_bits", lambda a, b: compared.append(a.shape) or original(a, b))
    value = torch.randn(16, 16)
    state = {f"blocks.{i}.mlp.c_fc.weight": value.clone() for i in range(20)}
    state.update({"wte.weight": value.clone(), "lm_head.weight": value.clone()})
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    assert load_checkpoint(path).tied_groups == [("wte.weight", "lm_head.weight")]
    assert len(compared) == 1


def test_n_params_counts_a_tied_group_once(tmp_path):
    value = torch.randn(20, 4)
    path = tmp_path / "model.safetensors"
    save_file({"tok_emb.weight": value, "lm_head.weight": value.clone(), "b": torch.zeros(3)}, str(path))
    assert load_checkpoint(path).n_params == 20 * 4 + 3


def test_tied_with_lists_the_other_names(tmp_path):
    value = torch.randn(20, 4)
    path = tmp_path / "model.safetensors"
    save_file({"tok_emb.weight": value, "lm_head.weight": value.clone()}, str(path))
    ckpt = load_checkpoint(path)
    assert ckpt.tied_with("lm_head.weight") == ("tok_emb.weight",)


# ---------------------------------------------------------------------------------------------------------- the demo

def test_demo_word_loads_the_bundled_model():
    if not (ck.DEMO_DIR / "model.safetensors").is_file():
        pytest.skip("the demo model has not been built yet")
    ckpt = load_checkpoint("demo")
    assert ckpt.format == "demo" and ckpt.source == "demo"
    assert ckpt.tied_groups[0][:2] == ("tok_emb.weight", "lm_head.weight")
    assert ckpt.config is not None


def test_demo_word_opens_model_safetensors_of_the_demo_folder(tmp_path, monkeypatch):
    value = torch.randn(50, 8)
    weights = tmp_path / "model.safetensors"
    save_file({"tok_emb.weight": value, "lm_head.weight": value.clone(), "pos_emb.weight": torch.randn(16, 8)},
              str(weights), metadata={"config": json.dumps({"n_embd": 8}), "tied": "tok_emb.weight,lm_head.weight"})
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "spectra-demo-gpt", "n_embd": 8}))
    monkeypatch.setattr(ck, "DEMO_DIR", tmp_path)
    ckpt = load_checkpoint("demo")
    assert (ckpt.source, ckpt.format) == ("demo", "demo")
    assert ckpt.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ckpt.tied_groups == [("tok_emb.weight", "lm_head.weight")]
    assert ckpt.config["architecture"] == "spectra-demo-gpt"


def test_demo_missing_says_how_to_rebuild_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "DEMO_DIR", tmp_path)
    message = refusal(load_checkpoint, "demo")
    assert message.startswith("demo:") and "train_demo.py" in message


# ------------------------------------------------------------------------------------------------------------- GGUF
# Files written by the gguf library's own writer and quantisers (tests/test_gguf.py `write_gguf`); the expected values
# are the library's own dequantisation of its own quantisation, independent of spectral/gguf.py.

def test_a_gguf_file_opens_as_float32_tensors_with_their_quantisation(tmp_path):
    source = {"blk.0.w": gaussian((48, 96), 1), "blk.0.b": gaussian((96,), 2)}
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.w": (source["blk.0.w"], Q.Q8_0), "blk.0.b": (source["blk.0.b"], Q.F32)})
    c = load_checkpoint(path)
    assert c.format == "gguf" and c.on_disk and c.files == [str(path)]
    assert c.names() == ["blk.0.w", "blk.0.b"] and c.shapes == {"blk.0.w": (48, 96), "blk.0.b": (96,)}
    assert set(c.dtypes.values()) == {"float32"} and c.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    library = gguf.quants.dequantize(gguf.quants.quantize(source["blk.0.w"], Q.Q8_0), Q.Q8_0)
    np.testing.assert_array_equal(c.tensor("blk.0.w").numpy(), library)
    np.testing.assert_array_equal(c.tensor("blk.0.b").numpy(), source["blk.0.b"])
    kind, sigma = c.quantization["blk.0.w"]
    empirical = np.sqrt(np.mean((library.astype(np.float64) - source["blk.0.w"]) ** 2))
    assert kind == "Q8_0" and sigma == pytest.approx(empirical, rel=0.15)
    assert c.quantization["blk.0.b"] == ("F32", 0.0)
    assert c.tokenizer is not None and c.tokenizer() is None  # the file carries no vocabulary
    assert c.left_out == {} and all(w.startswith(f"{path}: ") and "\n" not in w for w in c.warnings)


def test_a_gguf_reads_the_same_from_a_path_bytes_a_folder_an_upload_set_and_the_server_folder(tmp_path):
    tensors = {"blk.0.w": (gaussian((16, 64), 3), Q.Q4_1), "blk.0.v": (gaussian((8, 32), 4), Q.F16)}
    root = tmp_path / "served"
    (root / "model").mkdir(parents=True)
    path = write_gguf(root / "model" / "m.gguf", tensors)
    raw = path.read_bytes()
    opened = {"path": load_checkpoint(path), "bytes": load_checkpoint_bytes(raw, "m.gguf"),
              "folder": load_checkpoint(root / "model"), "served": open_in_folder(root, "model/m.gguf"),
              "set": load_checkpoint_files({"m.gguf": raw, "heldout.txt": b"held out"})}
    for c in opened.values():
        assert c.format == "gguf" and c.names() == ["blk.0.w", "blk.0.v"]
        assert c.quantization == opened["path"].quantization
        for name in c.names():
            assert torch.equal(c.tensor(name), opened["path"].tensor(name))
    assert {k: c.on_disk for k, c in opened.items()} == {"path": True, "bytes": False, "folder": True,
                                                          "served": True, "set": False}
    assert opened["bytes"].sha256 == opened["path"].sha256 == opened["served"].sha256
    assert opened["served"].source == "model/m.gguf" and opened["set"].side_file("heldout.txt") == b"held out"
    assert ck.list_checkpoints(root) == ["model/m.gguf"]  # a GGUF is offered alone, not its folder


def hand_gguf(entries: list[tuple[str, list[int], int, bytes]]) -> bytes:
    """A GGUF written byte by byte (tests/test_gguf.py `_file`): (name, dims fastest first, ggml type, data), each
    tensor's data padded to the 32-byte alignment."""
    infos, data = [], b""
    for name, dims, qtype, payload in entries:
        infos.append(gguf_info(name, dims, qtype, len(data)))
        data += payload + b"\0" * (-len(payload) % 32)
    return gguf_raw([], infos, data)


W_8x32 = np.arange(256, dtype=np.float32).reshape(8, 32) / 256  # 8 rows of 32: a matrix with distinct values
V_4x32 = np.ones((4, 32), dtype=np.float32)


def test_unreadable_gguf_tensors_are_left_out_with_a_warning_and_the_rest_analyses(tmp_path):
    raw = hand_gguf([("w", [32, 8], 0, W_8x32.tobytes()), ("odd", [32, 2], 99, bytes(256)),
                     ("q8k", [256], 15, bytes(292)), ("v", [32, 4], 0, V_4x32.tobytes())])
    c = load_checkpoint_bytes(raw, "odd.gguf")
    assert c.names() == ["w", "v"] and not c.on_disk
    assert c.left_out == {"odd": f"type 99: unknown ggml type 99 (not in gguf {GGUF_LIBRARY})",
                          "q8k": f"Q8_K: gguf {GGUF_LIBRARY} has no dequantiser for Q8_K"}
    assert "odd.gguf: tensor 'odd' (type 99) left out: unknown ggml type 99" in " ".join(c.warnings)
    np.testing.assert_array_equal(c.tensor("w").numpy(), W_8x32)
    analysis = Workspace(c).analyze()
    assert [r.name for r in analysis.matrices] == ["w", "v"]
    assert [r.quant for r in analysis.matrices] == ["F32", "F32"]


def test_a_gguf_with_no_readable_tensor_is_refused_in_one_line(tmp_path):
    path = write(tmp_path / "k.gguf", hand_gguf([("q8k", [256, 2], 15, bytes(584))]))
    assert refusal(load_checkpoint, path) == (f"{path}: no readable tensors: all 1 left out (the first: tensor 'q8k' "
                                              f"(Q8_K) left out: gguf {GGUF_LIBRARY} has no dequantiser for Q8_K)")


def test_a_gguf_upload_keeps_each_float32_copy_within_the_memory_budget(tmp_path, monkeypatch):
    """Quantised bytes expand (Q4_0: 4.5 bits per weight -> 32): an upload's tensor whose float32 copy would exceed
    the budget is left out, as the loader bounds what an upload makes it allocate; on disk it is read."""
    path = write_gguf(tmp_path / "m.gguf", {"big": (gaussian((64, 256), 5), Q.Q4_0),
                                            "small": (gaussian((8, 32), 6), Q.Q4_0)})
    monkeypatch.setattr(ck, "MEMORY_BUDGET", 32 << 10)  # 32 KiB: "big" is 64 KiB in float32, 9 KiB stored
    upload = load_checkpoint_bytes(path.read_bytes(), "m.gguf")
    assert upload.names() == ["small"] and set(upload.left_out) == {"big"}
    assert any("'big' (Q4_0) left out" in w and "over the 32.0 KiB budget" in w for w in upload.warnings)
    assert load_checkpoint(path).names() == ["big", "small"]


def test_a_gguf_tokenizer_is_built_lazily_within_the_vocabulary_bound(tmp_path, monkeypatch):
    tokens = byte_level_vocab() + ["he", "ll", "hell"]

    def metadata(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_merges(["h e", "l l", "he ll"])

    path = write_gguf(tmp_path / "m.gguf", {"w": (gaussian((4, 32)), Q.F32)}, metadata=metadata)
    assert load_checkpoint(path).tokenizer().encode("hell", add_special_tokens=False).ids == [258]  # the merges'
    monkeypatch.setattr(spectral_gguf, "MAX_TOKENIZER_ITEMS", 261)  # 259 tokens + 3 merges
    c = load_checkpoint(path)
    assert c.tokenizer() is None


# ---------------------------------------------------------------------------------------------------- healed files
# spectral/heal.py `save_healed` stores a cut matrix as NAME.factor_a @ NAME.factor_b; the loader presents NAME dense.
# The oracle is `spectral.heal.densify`, the heal's own reference (the loader cannot import spectral.heal).

def healed_raw(tensors: dict[str, torch.Tensor], factorised: dict, **extra) -> tuple[bytes, dict[str, str]]:
    metadata = {"spectra_factorised": json.dumps(factorised), "spectra_loader_note": LOADER_NOTE, **extra}
    return save(tensors, metadata=metadata), metadata


def healed_example() -> tuple[dict[str, torch.Tensor], dict]:
    g = torch.Generator().manual_seed(7)
    tensors = {"w.factor_a": torch.randn(8, 3, generator=g), "w.factor_b": torch.randn(3, 5, generator=g),
               "z.factor_a": torch.zeros(6, 0), "z.factor_b": torch.zeros(0, 4),  # rank 0: a zero matrix
               "k.factor_a": torch.randn(4, 2, generator=g), "k.factor_b": torch.randn(2, 18, generator=g),
               "ln.weight": torch.ones(5)}
    factorised = {"w": {"a": "w.factor_a", "b": "w.factor_b", "shape": [8, 5], "rank": 3, "dtype": "float32",
                        "tied_with": ["w_alias"]},
                  "z": {"a": "z.factor_a", "b": "z.factor_b", "shape": [6, 4], "rank": 0, "dtype": "float32",
                        "tied_with": []},
                  "k": {"a": "k.factor_a", "b": "k.factor_b", "shape": [4, 2, 3, 3], "rank": 2, "dtype": "float32",
                        "tied_with": []}}  # a conv kernel, cut in its out x in*kh*kw view
    return tensors, factorised


def test_a_healed_file_presents_its_factorised_matrices_dense(tmp_path):
    tensors, factorised = healed_example()
    raw, metadata = healed_raw(tensors, factorised, other="kept")
    path = write(tmp_path / "healed.safetensors", raw)
    reference = densify(tensors, metadata)
    for c in (load_checkpoint(path), load_checkpoint_bytes(raw, "healed.safetensors")):
        assert sorted(c.names()) == sorted(reference) == ["k", "ln.weight", "w", "w_alias", "z"]
        for name, expected in reference.items():
            assert c.shapes[name] == tuple(expected.shape) and c.dtypes[name] == "float32"
            assert torch.equal(c.tensor(name), expected), name
        assert c.tied_groups == [("w", "w_alias")]
        assert "spectra_factorised" not in c.metadata and c.metadata["other"] == "kept"
        assert c.metadata["spectra_loader_note"] == LOADER_NOTE


def _huge_rank_zero(t: dict, f: dict) -> None:
    """Rank-0 factors hold no bytes, so nothing in the file backs the size they claim."""
    t["z.factor_a"], t["z.factor_b"] = torch.zeros(100_000, 0), torch.zeros(0, 100_000)
    f["z"]["shape"] = [100_000, 100_000]


@pytest.mark.parametrize("change, words", [
    (lambda t, f: f["w"].update(a="missing.factor_a"), "names factors 'missing.factor_a' and 'w.factor_b'"),
    (lambda t, f: f["w"].update(shape=[8, 6]), "do not multiply into shape [8, 6]"),
    (_huge_rank_zero, "37.3 GiB as a dense float32 tensor, over the 1.0 GiB budget"),
    (lambda t, f: f["z"].update(a="w.factor_a", b="w.factor_b", shape=[8, 5]), "reuses a factor"),
    (lambda t, f: f["w"].update(tied_with=["ln.weight"]), "'ln.weight' is both a stored tensor"),
    (lambda t, f: f["w"].update(tied_with="w_alias"), "not a list of names"),
    (lambda t, f: f.update(w=[1, 2]), "entry 'w' is not an object"),
    (lambda t, f: t.update({"w.factor_a": torch.ones(8, 3, dtype=torch.int32)}), "not floating point"),
])
def test_a_healed_file_whose_factorisation_does_not_hold_is_refused_in_one_line(tmp_path, change, words):
    tensors, factorised = healed_example()
    change(tensors, factorised)
    raw, _ = healed_raw(tensors, factorised)
    message = refusal(load_checkpoint_bytes, raw, "healed.safetensors")
    assert message.startswith("healed.safetensors: metadata 'spectra_factorised': ") and words in message


# --------------------------------------------------------------------------------------------- on disk, side files

def test_on_disk_says_whether_every_tensor_is_read_from_the_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(small_state(), str(path))
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(small_state(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    assert load_checkpoint(path).on_disk and load_checkpoint(folder).on_disk
    assert open_in_folder(tmp_path, "hf/").on_disk
    assert not load_checkpoint_bytes(path.read_bytes(), "m.safetensors").on_disk
    assert not load_checkpoint_files({"model.safetensors": path.read_bytes(), "config.json": b"{}"}).on_disk


def test_an_uploaded_image_processor_config_stays_with_the_weights_and_in_the_hash(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path))
    files = {"model.safetensors": path.read_bytes(), "config.json": b"{}"}
    processor = json.dumps({"image_mean": [0.5] * 3}).encode()
    plain = load_checkpoint_files(files)
    with_processor = load_checkpoint_files({**files, "preprocessor_config.json": processor})
    assert with_processor.side_file("preprocessor_config.json") == processor
    assert plain.side_file("preprocessor_config.json") is None and plain.sha256 != with_processor.sha256


# -------------------------------------------------------------------------------------------------------- bad input

def test_missing_path_is_refused(tmp_path):
    message = refusal(load_checkpoint, tmp_path / "nope.safetensors")
    assert message == f"{tmp_path / 'nope.safetensors'}: no such file or folder"


def test_empty_path_is_refused_rather_than_read_as_the_current_folder():
    assert "no checkpoint path given" in refusal(load_checkpoint, "")


def test_empty_file_is_refused(tmp_path):
    path = write(tmp_path / "model.safetensors", b"")
    assert refusal(load_checkpoint, path) == f"{path}: empty file (0 bytes)"


def test_empty_upload_is_refused():
    assert refusal(load_checkpoint_bytes, b"", "up.pt") == "up.pt: empty file (0 bytes)"


def test_truncated_safetensors_is_refused(tmp_path):
    full = tmp_path / "full.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(full))
    cut = write(tmp_path / "model.safetensors", full.read_bytes()[:-1000])
    message = refusal(load_checkpoint, cut)
    assert message.startswith(f"{cut}: truncated file: header says 16384 bytes of tensor data, file has 15384")


def test_file_shorter_than_the_header_length_is_refused(tmp_path):
    path = write(tmp_path / "model.safetensors", b"\x10\x00\x00")
    assert "truncated file: 3 bytes" in refusal(load_checkpoint, path)


def test_bogus_header_that_is_not_json_is_refused(tmp_path):
    path = write(tmp_path / "model.safetensors", struct.pack("<Q", 12) + b"{not json!!}" + b"\x00" * 8)
    assert refusal(load_checkpoint, path).startswith(f"{path}: bogus header: not valid JSON")


def test_bogus_header_that_is_a_json_list_is_refused(tmp_path):
    path = write(tmp_path / "model.safetensors", struct.pack("<Q", 2) + b"[]")
    assert "bogus header" in refusal(load_checkpoint, path)


def test_bogus_header_with_garbage_after_the_length_is_refused(tmp_path):
    path = write(tmp_path / "model.safetensors", struct.pack("<Q", 4) + b"\xff\xfe\x00\x01")
    assert "bogus header" in refusal(load_checkpoint, path)


def test_header_past_end_is_refused(tmp_path):
    path = write(tmp_path / "model.safetensors", struct.pack("<Q", 1_000_000) + b'{"w": {"dtype": "F32"')
    message = refusal(load_checkpoint, path)
    assert message.startswith(f"{path}: header past end: the header length is larger than the 21 bytes after it")
    assert "1000000" not in message, "the header length is the file's first 8 bytes: never quoted"


def test_offsets_past_end_are_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4096, 4104]}}
    path = write(tmp_path / "model.safetensors", st_raw(header, b"\x00" * 16))
    message = refusal(load_checkpoint, path)
    assert message.startswith(f"{path}: offsets past end: tensor 'b' has data_offsets [4096, 4104]")


def test_offsets_that_disagree_with_shape_and_dtype_are_refused(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 40]}}
    path = write(tmp_path / "model.safetensors", st_raw(header, b"\x00" * 40))
    assert "needs 48 bytes" in refusal(load_checkpoint, path)


def test_unknown_dtype_is_refused(tmp_path):
    header = {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}
    path = write(tmp_path / "model.safetensors", st_raw(header, b"\x00" * 2))
    assert "unsupported dtype 'Q7'" in refusal(load_checkpoint, path)


def test_gap_between_tensors_is_refused(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    path = write(tmp_path / "model.safetensors", st_raw(header, b"\x00" * 8))
    assert "gap or overlap" in refusal(load_checkpoint, path)


def test_trailing_bytes_after_the_tensor_data_are_refused(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    path = write(tmp_path / "model.safetensors", st_raw(header, b"\x00" * 10))
    assert "6 bytes after the last tensor" in refusal(load_checkpoint, path)


def test_safetensors_without_tensors_is_refused(tmp_path):
    path = write(tmp_path / "model.safetensors", st_raw({"__metadata__": {"a": "b"}}))
    assert refusal(load_checkpoint, path) == f"{path}: no tensors in the file"


def test_bad_safetensors_upload_is_refused_before_the_library_sees_it():
    data = st_raw({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 8)
    assert refusal(load_checkpoint_bytes, data, "up.safetensors").startswith("up.safetensors: truncated file")


def test_text_file_named_pt_is_not_a_checkpoint(tmp_path):
    path = write(tmp_path / "model.pt", b"hello, I am a text file and not a tensor\n")
    message = refusal(load_checkpoint, path)
    assert message.startswith(f"{path}: not a checkpoint: the file is text")


def test_garbage_with_a_weights_extension_is_not_a_checkpoint(tmp_path):
    path = write(tmp_path / "model.bin", bytes(range(200, 256)) * 4)
    assert refusal(load_checkpoint, path).startswith(f"{path}: not a checkpoint")


def test_garbage_with_an_unknown_extension_is_an_unknown_format(tmp_path):
    path = write(tmp_path / "weights.xyz", b"\x01\x02\x03\xff" * 50)
    assert refusal(load_checkpoint, path).startswith(f"{path}: unknown format")


def test_truncated_torch_zip_is_refused(tmp_path):
    full = tmp_path / "full.pt"
    torch.save(small_state(), full)
    path = write(tmp_path / "model.pt", full.read_bytes()[:300])
    assert refusal(load_checkpoint, path).startswith(f"{path}: corrupt PyTorch file")


def test_truncated_legacy_pickle_is_refused(tmp_path):
    full = tmp_path / "full.pt"
    torch.save(small_state(), full, _use_new_zipfile_serialization=False)
    path = write(tmp_path / "model.pt", full.read_bytes()[:40])
    assert refusal(load_checkpoint, path).startswith(f"{path}: ")


def test_pickle_without_tensors_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    assert "no tensors found" in refusal(load_checkpoint, path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_raw_pickle_that_runs_a_shell_command_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = write(tmp_path / "model.pt", pickle.dumps({"w": RunsShell(marker)}, protocol=protocol))
    message = refusal(load_checkpoint, path)
    assert message == (f"{path}: refused: the pickle tries to load {os.system.__module__}.system "
                       "(code execution is never allowed)")
    assert not marker.exists()


def test_raw_pickle_calling_eval_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path / "model.bin", pickle.dumps(CallsEval(marker), protocol=2))
    assert "refused: the pickle tries to load builtins.eval" in refusal(load_checkpoint, path)
    assert not marker.exists()


def test_torch_zip_holding_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2, 2), "payload": RunsShell(marker)}, path)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    message = refusal(load_checkpoint, path)
    assert "refused: the pickle tries to load" in message and "system" in message
    assert "(code execution is never allowed)" in message
    assert not marker.exists()


def test_malicious_upload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"payload": RunsShell(marker)}, path)
    assert "refused" in refusal(load_checkpoint_bytes, path.read_bytes(), "model.pt")
    assert not marker.exists()


def test_pickled_whole_module_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(3, 3), path)
    assert "refused: the pickle tries to load torch.nn" in refusal(load_checkpoint, path)


def test_file_over_max_bytes_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path))
    monkeypatch.setattr(ck, "_sha256_file", lambda p: pytest.fail("read a file that is over the limit"))
    message = refusal(load_checkpoint, path, max_bytes=100)
    assert message.startswith(f"{path}: ") and "over the 100 bytes limit" in message


def test_upload_over_max_bytes_is_refused():
    assert "over the 10 bytes limit" in refusal(load_checkpoint_bytes, b"x" * 11, "big.pt", max_bytes=10)


def test_folder_over_max_bytes_is_refused(tmp_path):
    write_sharded(tmp_path, llama_state(), "safetensors")
    assert "over the" in refusal(load_checkpoint, tmp_path, max_bytes=1000)


def test_every_refusal_is_a_checkpoint_error_naming_the_file(tmp_path):
    bad = {"a.safetensors": b"", "b.pt": b"text", "c.xyz": b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09",
           "d.safetensors": struct.pack("<Q", 99) + b"{"}
    for name, data in bad.items():
        path = write(tmp_path / name, data)
        assert refusal(load_checkpoint, path).startswith(f"{path}: ")
        assert refusal(load_checkpoint_bytes, data, name).startswith(f"{name}: ")


# ------------------------------------------------------------------------------------------------------ fuzzing

def _valid_files() -> dict[str, bytes]:
    import io
    buffer = io.BytesIO()
    torch.save({"a.weight": torch.randn(4, 3), "b.weight": torch.randn(2).half()}, buffer)
    from safetensors.torch import save
    return {"model.safetensors": save({"a.weight": torch.randn(4, 3), "b.weight": torch.randn(2).half()},
                                      metadata={"config": "{}"}),
            "model.pt": buffer.getvalue()}


VALID_FILES = _valid_files()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(VALID_FILES)), cut=st.integers(0, 4000),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=4))
def test_damaged_files_load_or_raise_checkpoint_error_only(name, cut, flips):
    data = bytearray(VALID_FILES[name][:cut] if cut < len(VALID_FILES[name]) else VALID_FILES[name])
    for position, value in flips:
        if position < len(data):
            data[position] = value
    try:
        ckpt = load_checkpoint_bytes(bytes(data), name)
        for tensor_name in ckpt.names():
            ckpt.tensor(tensor_name)
    except CheckpointError as error:
        assert "\n" not in str(error) and str(error).startswith(f"{name}: ")
