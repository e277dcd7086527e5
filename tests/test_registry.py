"""models/registry.py: which checkpoints run, how their tensors map onto modules, and why the others do not."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models

from models.gpt import GPT, GPTConfig
from models.registry import NotRunnable, runnable_model
from spectral.checkpoint import load_checkpoint

CONFIG = GPTConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, block_size=32)


def tiny_gpt(seed: int = 0, config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def save_demo_layout(model: GPT, path, dtype=torch.float32) -> None:
    """The demo's own layout: both tied names as equal copies, architecture and config in the metadata."""
    tensors = {k: v.detach().to(dtype).clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"architecture": "spectra-demo-gpt",
                                            "config": json.dumps(model.config.to_dict()),
                                            "tied": "tok_emb.weight,lm_head.weight"})


def nanogpt_state(model: GPT) -> dict:
    """Our GPT's weights under nanoGPT's names (wte/lm_head share storage, as nanoGPT saves them)."""
    out = {}
    for k, v in model.state_dict().items():
        k = (k.replace("tok_emb.", "transformer.wte.").replace("pos_emb.", "transformer.wpe.")
             .replace("blocks.", "transformer.h.").replace("ln_f.", "transformer.ln_f."))
        out[k] = v
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def ids(n=3, t=16, vocab=64, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_demo_layout_runs_and_matches_the_original_module(tmp_path):
    model = tiny_gpt()
    save_demo_layout(model, tmp_path / "m.safetensors")
    runnable = runnable_model(load_checkpoint(tmp_path / "m.safetensors"))
    x = ids()
    with torch.no_grad():
        expected = model(x)
    assert runnable.kind == "causal_lm" and runnable.architecture == "spectra-demo-gpt"
    assert torch.equal(runnable.forward(x), expected)
    assert not runnable.module.training
    assert all(p.dtype == torch.float32 for p in runnable.module.parameters())


def test_staged_forward_equals_the_plain_module_call(tmp_path):
    save_demo_layout(tiny_gpt(), tmp_path / "m.safetensors")
    runnable = runnable_model(load_checkpoint(tmp_path / "m.safetensors"))
    x = ids()
    staged = runnable.forward(x)
    with torch.no_grad():
        plain = runnable.module(x)
    assert [s.name for s in runnable.stages] == ["embedding", "blocks.0", "blocks.1", "head"]
    assert torch.equal(staged, plain)


def test_tied_names_feed_one_parameter_used_at_input_and_output(tmp_path):
    save_demo_layout(tiny_gpt(), tmp_path / "m.safetensors")
    runnable = runnable_model(load_checkpoint(tmp_path / "m.safetensors"))
    assert runnable.params_for(["tok_emb.weight"]) == runnable.params_for(["lm_head.weight"])
    (ref,) = runnable.params_for(["tok_emb.weight", "lm_head.weight"])
    assert ref.name == "tok_emb.weight" and not ref.transposed
    assert runnable.module.lm_head.weight is runnable.module.tok_emb.weight
    reading = [s.name for s in runnable.stages if ref.name in s.params]
    assert reading == ["embedding", "head"]


def test_overrides_never_mutate_the_module(tmp_path):
    save_demo_layout(tiny_gpt(), tmp_path / "m.safetensors")
    runnable = runnable_model(load_checkpoint(tmp_path / "m.safetensors"))
    before = {k: v.clone() for k, v in runnable.module.state_dict().items()}
    x = ids()
    base = runnable.forward(x)
    changed = runnable.forward(x, {"blocks.0.mlp.c_fc.weight": torch.zeros(128, 32)})
    assert not torch.equal(base, changed)
    assert all(torch.equal(v, runnable.module.state_dict()[k]) for k, v in before.items())
    assert torch.equal(runnable.forward(x), base)


def test_half_precision_checkpoint_runs_in_float32(tmp_path):
    model = tiny_gpt()
    save_demo_layout(model, tmp_path / "m.safetensors", dtype=torch.float16)
    runnable = runnable_model(load_checkpoint(tmp_path / "m.safetensors"))
    assert all(p.dtype == torch.float32 for p in runnable.module.parameters())
    assert torch.equal(runnable.module.blocks[0].mlp.c_fc.weight, model.blocks[0].mlp.c_fc.weight.half().float())


def test_nanogpt_checkpoint_with_model_args_maps_onto_the_same_network(tmp_path):
    model = tiny_gpt(3)
    state = {"_orig_mod." + k: v for k, v in nanogpt_state(model).items()}
    causal_mask = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
    for i in range(CONFIG.n_layer):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = causal_mask  # nanoGPT's non-flash buffer
    model_args = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "bias": True, "vocab_size": 64,
                  "dropout": 0.0}
    torch.save({"model": state, "model_args": model_args, "iter_num": 100, "best_val_loss": 1.5},
               tmp_path / "ckpt.pt")
    runnable = runnable_model(load_checkpoint(tmp_path / "ckpt.pt"))
    x = ids()
    with torch.no_grad():
        expected = model(x)
    assert runnable.architecture == "nanogpt"
    assert torch.allclose(runnable.forward(x), expected, atol=1e-6, rtol=0)
    assert runnable.params_for(["transformer.wte.weight"])[0].name == "tok_emb.weight"
    assert runnable.params_for(["transformer.h.1.mlp.c_proj.weight"])[0].name == "blocks.1.mlp.c_proj.weight"


def test_nanogpt_state_dict_without_heads_is_refused_until_told(tmp_path):
    torch.save(nanogpt_state(tiny_gpt()), tmp_path / "bare.pt")
    ckpt = load_checkpoint(tmp_path / "bare.pt")
    with pytest.raises(NotRunnable, match="attention heads"):
        runnable_model(ckpt)
    assert runnable_model(ckpt, config_overrides={"n_head": 2}).block_size == 32


def nanogpt_ckpt(path, **model_args):
    """nanoGPT's ckpt.pt of `tiny_gpt()` with these model_args (the hostile ones of issue 17 included)."""
    args = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "bias": True, "vocab_size": 64,
            "dropout": 0.0, **model_args}
    torch.save({"model": nanogpt_state(tiny_gpt()), "model_args": args}, path)
    return path


@pytest.mark.parametrize("n_head", [0, -4, 5, 2.0, "2", True])
def test_a_head_count_that_does_not_fit_the_width_is_one_line_and_asked_for_again(tmp_path, n_head):
    # issue 17: n_head 0 raised ZeroDivisionError out of the registry; -4 was accepted and failed in the forward pass
    ckpt = load_checkpoint(nanogpt_ckpt(tmp_path / "ckpt.pt", n_head=n_head))
    with pytest.raises(NotRunnable) as info:
        runnable_model(ckpt)
    message = str(info.value)
    assert f"n_head={n_head!r} does not fit the weights" in message and "\n" not in message
    (need,) = info.value.needs
    assert need.name == "n_head" and need.choices == (1, 2, 4, 8, 16, 32)
    assert runnable_model(ckpt, config_overrides={"n_head": 2}).architecture == "nanogpt"


def test_gpt_module_refuses_a_head_count_that_is_not_a_positive_divisor():
    for n_head in (0, -4, 5):
        with pytest.raises(ValueError, match="positive divisor"):
            GPT(GPTConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=n_head, block_size=8))


@pytest.mark.parametrize("args, says", [({"block_size": "32"}, "block_size='32' but the weights have block_size=32"),
                                        ({"dropout": "x"}, "invalid GPT config"),
                                        ({"n_layer": 10**9}, "n_layer=1000000000 but the weights have n_layer=2")])
def test_model_args_the_weights_contradict_are_one_line(tmp_path, args, says):
    ckpt = load_checkpoint(nanogpt_ckpt(tmp_path / "ckpt.pt", **args))
    with pytest.raises(NotRunnable, match=re.escape(says)) as info:
        runnable_model(ckpt)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(tmp_path / "ckpt.pt"))


def test_untied_head_is_refused_for_a_tied_architecture(tmp_path):
    model = tiny_gpt()
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    save_file(tensors, str(tmp_path / "m.safetensors"),
              metadata={"architecture": "spectra-demo-gpt", "config": json.dumps(CONFIG.to_dict())})
    with pytest.raises(NotRunnable, match="ties"):
        runnable_model(load_checkpoint(tmp_path / "m.safetensors"))


def test_config_that_contradicts_the_weights_is_refused(tmp_path):
    model = tiny_gpt()
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    wrong = dict(CONFIG.to_dict(), n_layer=3)
    save_file(tensors, str(tmp_path / "m.safetensors"),
              metadata={"architecture": "spectra-demo-gpt", "config": json.dumps(wrong)})
    with pytest.raises(NotRunnable, match="n_layer=3"):
        runnable_model(load_checkpoint(tmp_path / "m.safetensors"))


def test_unknown_architecture_says_spectra_only(tmp_path):
    save_file({"encoder.layer.weight": torch.randn(8, 8)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(NotRunnable, match="spectra only") as info:
        runnable_model(load_checkpoint(tmp_path / "x.safetensors"))
    assert str(info.value).startswith(str(tmp_path / "x.safetensors"))
    assert "\n" not in str(info.value)


def test_hugging_face_family_without_an_adapter_says_spectra_only(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(8, 8)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(NotRunnable, match="'t5'.*spectra only"):
        runnable_model(load_checkpoint(folder))


def char_tokenizer(chars: str = "abcdefghijklmnopqrstuvwxyz .,\n") -> Tokenizer:
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<unk>"] = len(vocab)
    return Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))


def test_tokenizer_and_heldout_text_beside_the_weights_are_used(tmp_path):
    save_demo_layout(tiny_gpt(), tmp_path / "m.safetensors")
    char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "heldout.txt").write_text("hello world")
    runnable = runnable_model(load_checkpoint(tmp_path / "m.safetensors"))
    assert runnable.eval_text == "hello world"
    assert runnable.tokenizer.encode("hab").ids == [7, 0, 1]


def test_tokenizer_larger_than_the_vocabulary_is_ignored_with_a_note(tmp_path):
    save_demo_layout(tiny_gpt(), tmp_path / "m.safetensors")
    char_tokenizer("".join(chr(0x100 + i) for i in range(100))).save(str(tmp_path / "tokenizer.json"))
    runnable = runnable_model(load_checkpoint(tmp_path / "m.safetensors"))
    assert runnable.tokenizer is None
    assert any("tokenizer" in note for note in runnable.notes)


def test_concurrent_forwards_with_different_overrides_do_not_see_each_other(tmp_path):
    # two browser sessions share one cached model; functional_call swaps tensors in for the call's duration
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "m.safetensors"
    save_demo_layout(tiny_gpt(), path)
    runnable = runnable_model(load_checkpoint(path))
    name = runnable.params_for(["blocks.0.mlp.c_fc.weight"])[0].name
    x = ids()
    variants = [{}, {name: torch.zeros_like(runnable.parameter(name))},
                {name: 3.0 * runnable.parameter(name)}]
    expected = [runnable.forward(x, v) for v in variants]
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda i: (i % 3, runnable.forward(x, variants[i % 3])), range(150)))
    for i, out in got:
        assert torch.equal(out, expected[i])
