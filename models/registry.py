"""Which checkpoints can be run, and how: `runnable_model(checkpoint)` returns a `Runnable` or raises `NotRunnable`.

What-ifs need a forward pass; the analysis does not. The contract (`Runnable`, `NotRunnable`, `Need`, `ParamRef`,
`Stage`, the swap lock) is in models/contract.py; this module decides which builder applies and builds the demo's
GPT and nanoGPT itself.

Dispatch, in this order (docs/supported.md lists what runs and what is "spectra only"):
1. the demo architecture (models/gpt.py, metadata or config "architecture": "spectra-demo-gpt");
2. Hugging Face models (models/hf.py, through `transformers`): any config.json `model_type` transformers can build
   as a causal LM, an encoder or an image classifier, or a GPT-2/Llama/BERT layout recognised by its tensor names;
3. nanoGPT (`ckpt.pt` with `model_args`, or a bare state dict; keys `transformer.wte/wpe/h.N...`, `lm_head` tied to
   `wte`; `_orig_mod.` prefixes are stripped by the loader), which is the demo's network under other names;
4. anything else: `NotRunnable` ending in "spectra only".
A hyperparameter the shapes do not fix (heads, RoPE base, norm epsilon) comes from config.json, nanoGPT's
`model_args`, safetensors metadata or `config_overrides`; never from a guess. Missing ones are listed in
`NotRunnable.needs`, so the dashboard can ask for them. Whatever goes wrong while building a model (a hostile or
inconsistent config included) is `NotRunnable` with one line, never a traceback.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
from tokenizers import Tokenizer

from models import hf
from models.contract import (
    Need,
    NotRunnable,
    Overrides,
    ParamRef,
    Runnable,
    Stage,
    canonical_names,
    submodule_call,
)
from models.gpt import GPT, GPTConfig
from models.hf import side_file

DEMO_ARCHITECTURE = "spectra-demo-gpt"
NANOGPT_ARCHITECTURE = "nanogpt"
EVAL_TEXT_FILE = "heldout.txt"  # held-out text shipped beside the weights (the demo's convention)
TOKENIZER_FILE = "tokenizer.json"


# ------------------------------------------------------------------------------------------------------ entry point

def runnable_model(checkpoint, *, tokenizer=None, eval_text: str | None = None,
                   config_overrides: dict | None = None, memory_budget: int | None = None) -> Runnable:
    """A `Runnable` for a loaded `spectral.checkpoint.Checkpoint`, or `NotRunnable` saying why not (one line).

    `tokenizer` (a tokenizers.Tokenizer or a path to tokenizer.json) and `eval_text` replace what is found beside the
    weights (or uploaded with them); `config_overrides` supplies hyperparameters the checkpoint does not record
    (e.g. {"n_head": 12}); `NotRunnable.needs` says which. `memory_budget`: bytes the built model may take
    (default: `models.limits.default_budget()`)."""
    try:
        return _runnable_model(checkpoint, tokenizer, eval_text, config_overrides, memory_budget)
    except NotRunnable:
        raise
    except (Exception, RecursionError, MemoryError) as e:  # noqa: BLE001 - whatever a hostile file provokes
        text = " ".join(str(e).split())[:200]
        raise NotRunnable(checkpoint.source, f"cannot build the model ({type(e).__name__}"
                                             f"{': ' + text if text else ''}); spectra only") from None


def _runnable_model(checkpoint, tokenizer, eval_text, config_overrides, memory_budget) -> Runnable:
    names = set(checkpoint.names())
    config = dict(checkpoint.config or {})
    config.update(config_overrides or {})
    metadata = checkpoint.metadata or {}
    architecture = metadata.get("architecture") or config.get("architecture")

    if architecture == DEMO_ARCHITECTURE or (architecture is None and "tok_emb.weight" in names
                                             and any(n.startswith("blocks.") for n in names)):
        runnable = _build_gpt(checkpoint, config, _DEMO_NAMES, DEMO_ARCHITECTURE)
    elif architecture != NANOGPT_ARCHITECTURE and (model_type := hf.hf_model_type(checkpoint, config)):
        runnable = hf.build(checkpoint, config, model_type, memory_budget=memory_budget)
    elif architecture == NANOGPT_ARCHITECTURE or "transformer.wte.weight" in names:
        runnable = _build_gpt(checkpoint, config, _NANOGPT_NAMES, NANOGPT_ARCHITECTURE)
    elif checkpoint.format == "gguf":
        raise NotRunnable(checkpoint.source, _gguf_not_runnable(checkpoint))
    else:
        raise NotRunnable(checkpoint.source, "architecture not recognised (runnable: the demo GPT, nanoGPT, and "
                          "Hugging Face models with a config.json transformers can build; see docs/supported.md); "
                          "spectra only")
    _attach_text(runnable, checkpoint, tokenizer, eval_text)
    return runnable


def _gguf_not_runnable(checkpoint) -> str:
    """Why a GGUF without a Hugging Face config does not run: the reader's own note (spectral/gguf.py) where it left
    one (transformers does not know the architecture, or is not installed)."""
    arch = (checkpoint.metadata or {}).get("general.architecture", "unnamed")
    prefix = f"{checkpoint.source}: "
    note = next((w.removeprefix(prefix) for w in checkpoint.warnings if "transformers" in w or "architecture" in w),
                "its tensors match no model this tool builds")
    return f"GGUF architecture {arch!r} does not run here: {note}; spectra only"


# ---------------------------------------------------------------------------------------------- GPT and nanoGPT

def _demo_name(module_name: str) -> str:
    return module_name


_NANOGPT_RULES = [(re.compile(r"^transformer\.wte\."), "tok_emb."), (re.compile(r"^transformer\.wpe\."), "pos_emb."),
                  (re.compile(r"^transformer\.h\.(\d+)\."), r"blocks.\1."), (re.compile(r"^transformer\.ln_f\."), "ln_f.")]


def _nanogpt_name(stored: str) -> str:
    for pattern, replacement in _NANOGPT_RULES:
        if pattern.search(stored):
            return pattern.sub(replacement, stored)
    return stored


_DEMO_NAMES = _demo_name
_NANOGPT_NAMES = _nanogpt_name
_IGNORED_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")  # nanoGPT's causal-mask buffers (non-flash path)


def _build_gpt(checkpoint, config: dict, to_module_name: Callable[[str], str], architecture: str) -> Runnable:
    """models/gpt.py's GPT with the checkpoint's weights; nanoGPT's names are mapped onto ours (same network)."""
    source = checkpoint.source
    shapes = checkpoint.shapes
    module_of = {}  # stored name -> module state-dict name
    for stored in checkpoint.names():
        if _IGNORED_BUFFERS.search(stored) and len(shapes[stored]) != 1:
            continue
        module_of[stored] = to_module_name(stored)
    by_module = {}
    for stored, mod in module_of.items():
        by_module.setdefault(mod, stored)

    if "tok_emb.weight" not in by_module:
        raise NotRunnable(source, "no token embedding (tok_emb.weight / transformer.wte.weight) found")
    vocab_size, n_embd = shapes[by_module["tok_emb.weight"]]
    n_layer = 1 + max((int(m.split(".")[1]) for m in by_module if m.startswith("blocks.")), default=-1)
    inferred = {"vocab_size": vocab_size, "n_embd": n_embd, "n_layer": n_layer,
                "bias": "ln_f.bias" in by_module}
    if "pos_emb.weight" in by_module:
        inferred["block_size"] = shapes[by_module["pos_emb.weight"]][0]
    heads = Need("n_head", "attention heads per block (nanoGPT's GPT-2 small: 12)", "int",
                 tuple(d for d in range(1, n_embd + 1) if n_embd % d == 0))
    if "n_head" not in config:
        raise NotRunnable(source, "the number of attention heads is not recorded (no config/model_args with "
                          "n_head); give it (the Overview page asks; Python: config_overrides)", needs=(heads,))
    n_head = config["n_head"]
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head not in heads.choices:
        raise NotRunnable(source, f"n_head={n_head!r} does not fit the weights: a head count is a positive divisor "
                          f"of the width {n_embd}", needs=(heads,))
    values = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}
    for key, value in inferred.items():
        if key in values and values[key] != value:
            raise NotRunnable(source, f"config says {key}={values[key]!r} but the weights have {key}={value!r}")
        values[key] = value
    try:
        gpt_config = GPTConfig(**values)
        with torch.device("meta"):
            model = GPT(gpt_config)
    except (TypeError, ValueError) as e:
        raise NotRunnable(source, f"invalid GPT config ({e})") from None

    expected = model.state_dict(keep_vars=True)
    missing = [m for m in expected if m not in by_module and m != "lm_head.weight"]
    unexpected = [s for s, m in module_of.items() if m not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise NotRunnable(source, f"tensors do not match the {architecture} layout ({'; '.join(parts)})")
    for mod, stored in by_module.items():
        if tuple(expected[mod].shape) != tuple(shapes[stored]):
            raise NotRunnable(source, f"{stored} has shape {list(shapes[stored])}, the {architecture} layout "
                              f"expects {list(expected[mod].shape)}")
    head = by_module.get("lm_head.weight")
    if head is not None and head not in checkpoint.tied_with(by_module["tok_emb.weight"]):
        raise NotRunnable(source, f"{head} differs from {by_module['tok_emb.weight']}, but this architecture ties "
                          "the LM head to the token embedding")

    state = {}
    for mod in expected:
        stored = by_module.get(mod, by_module["tok_emb.weight"] if mod == "lm_head.weight" else None)
        tensor = checkpoint.tensor(stored)
        if not torch.is_floating_point(tensor):
            raise NotRunnable(source, f"{stored} has dtype {tensor.dtype}, expected floating point")
        state[mod] = tensor.to(torch.float32).contiguous()
    state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.tok_emb.weight  # re-tie: assign=True made two Parameters of one tensor
    model.eval().requires_grad_(False)

    canonical = canonical_names(model)
    param_names = {stored: [ParamRef(canonical[mod])] for stored, mod in module_of.items() if mod in canonical}
    return Runnable(module=model, kind="causal_lm", architecture=architecture, param_names=param_names,
                    tokenizer=None, eval_text=None, block_size=gpt_config.block_size,
                    vocab_size=gpt_config.vocab_size, stages=_gpt_stages(model, canonical))


def _gpt_stages(model: GPT, canonical: dict[str, str]) -> list[Stage]:
    """GPT.forward cut at block boundaries: embedding, each block, final norm + tied head (models/gpt.py)."""
    tok, tok_params = submodule_call(model, "tok_emb", canonical)
    pos, pos_params = submodule_call(model, "pos_emb", canonical)

    def embed(overrides: Overrides, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]  # idx: (B, T)
        if T > model.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={model.config.block_size}")
        return tok(overrides, idx) + pos(overrides, torch.arange(T, device=idx.device))  # (B, T, C)

    stages = [Stage("embedding", tok_params | pos_params, embed)]
    for i in range(len(model.blocks)):
        block, params = submodule_call(model, f"blocks.{i}", canonical)
        stages.append(Stage(f"blocks.{i}", params, block))
    ln_f, ln_params = submodule_call(model, "ln_f", canonical)
    head, head_params = submodule_call(model, "lm_head", canonical)
    stages.append(Stage("head", ln_params | head_params, lambda overrides, x: head(overrides, ln_f(overrides, x))))
    return stages


# ------------------------------------------------------------------------------------------------ tokenizer, text

def _attach_text(runnable: Runnable, checkpoint, tokenizer, eval_text: str | None) -> None:
    """Tokenizer and held-out text: given explicitly, else tokenizer.json / heldout.txt beside the weights (or
    uploaded with them), read through `Checkpoint.side_file` (confined to the server folder), else the tokenizer the
    checkpoint itself carries (`Checkpoint.tokenizer`: a GGUF's vocabulary)."""
    if tokenizer is None:
        tokenizer = side_file(checkpoint, TOKENIZER_FILE, runnable.notes)
    if tokenizer is None and callable(getattr(checkpoint, "tokenizer", None)):
        tokenizer = checkpoint.tokenizer()
        if tokenizer is not None:
            tokenizer.no_padding()
            tokenizer.no_truncation()
    if isinstance(tokenizer, (str, Path, bytes)):
        label = TOKENIZER_FILE if isinstance(tokenizer, bytes) else str(tokenizer)
        try:
            if isinstance(tokenizer, bytes):
                tokenizer = Tokenizer.from_str(tokenizer.decode("utf-8"))
            else:
                tokenizer = Tokenizer.from_file(str(tokenizer))
            tokenizer.no_padding()  # a tokenizer.json may pad or truncate every encoding (sentence-transformers'
            tokenizer.no_truncation()  # pad to 128): evaluation builds its own windows and sentences
        except Exception as e:  # noqa: BLE001 - a bad side file only costs the text evaluation
            runnable.notes.append(f"{label}: unreadable tokenizer ({str(e).splitlines()[0][:120]}); ignored")
            tokenizer = None
    if tokenizer is not None and runnable.vocab_size is not None and tokenizer.get_vocab_size() > runnable.vocab_size:
        runnable.notes.append(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                              f"{runnable.vocab_size}; ignored")
        tokenizer = None
    runnable.tokenizer = tokenizer
    if eval_text is None:
        text = side_file(checkpoint, EVAL_TEXT_FILE, runnable.notes)
        eval_text = None if text is None else text.decode("utf-8", errors="replace")
    runnable.eval_text = eval_text


def gpt_metadata(runnable: Runnable) -> dict[str, str]:
    """safetensors metadata that lets `runnable_model` rebuild this architecture from a saved file."""
    model = runnable.module
    if not isinstance(model, GPT):
        return {}
    return {"architecture": runnable.architecture, "config": json.dumps(model.config.to_dict())}
