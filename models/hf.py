"""Hugging Face families through `transformers` (an optional dependency): GPT-2, Llama-family, BERT-family encoders.

The model is built from the checkpoint's config.json with `from_config` (nothing is ever downloaded) and filled with
the checkpoint's own tensors, in float32. What the what-if engine needs is a `models.contract.Runnable`:

- causal language models (GPT-2, Llama, Mistral, Qwen2): `module(input_ids)` gives logits (B, T, vocab);
- encoders (BERT, RoBERTa, DistilBERT; sentence embedders such as all-MiniLM-L6-v2): `module(input_ids)` gives one
  embedding per sequence (B, C), mean-pooled over the non-padding tokens (or the first token where the folder's
  sentence-transformers `1_Pooling/config.json` says CLS), kind "encoder". Padding is the config's `pad_token_id`.

Layouts. GPT-2 stores its Conv1D weights in x out; the module keeps that layout, so every `ParamRef` here is
untransposed (the analysis transposes to out x in on its side: `spectral.matrices.MatrixInfo.transposed`, and the
pruner maps back before handing tensors over). Checkpoint names are matched to module names exactly, with or
without the base-model prefix (`transformer.`, `model.`, `bert.`, ...), and legacy LayerNorm `gamma`/`beta`.
A tied embedding/LM head is one module parameter: both names map to it, so a cut reaches input and output together.
Where config.json ties them but the stored values differ, the model is built untied (and says so in `notes`).

Without config.json, a GPT-2, Llama or BERT layout recognised from the tensor names is built from what the shapes
fix; what they do not (heads, RoPE base, norm epsilon) must be given (`config_overrides`), else `NotRunnable` lists
them in `needs`.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from models.contract import Need, NotRunnable, ParamRef, Runnable, canonical_names
from spectral.matrices import uses_conv1d_layout

CAUSAL_FAMILIES = {"gpt2": "GPT-2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
ENCODER_FAMILIES = {"bert": "BERT", "roberta": "RoBERTa", "xlm-roberta": "XLM-RoBERTa", "distilbert": "DistilBERT"}
FAMILIES = {**CAUSAL_FAMILIES, **ENCODER_FAMILIES}
INSTALL_HINT = "pip install transformers"
DEFAULT_BLOCK = 2048  # evaluation context cap when the config records none (RoPE models without max_position)

# tensors a checkpoint may hold that are buffers, not weights: never loaded, never reported as unused
_BUFFER_NAMES = re.compile(r"(position_ids|token_type_ids|rotary_emb\.inv_freq|attn\.(bias|masked_bias))$")

# layouts recognised by name when there is no config.json (prefix optional)
_LAYOUTS = {
    "gpt2": re.compile(r"(^|\.)h\.\d+\.attn\.c_attn\.weight$"),
    "llama": re.compile(r"(^|\.)layers\.\d+\.self_attn\.q_proj\.weight$"),
    "bert": re.compile(r"(^|\.)encoder\.layer\.\d+\.attention\.self\.query\.weight$"),
}


# ------------------------------------------------------------------------------------------------------ detection

def hf_model_type(checkpoint, config: dict) -> str | None:
    """The Hugging Face model_type to build: config.json's, else a GPT-2/Llama/BERT layout seen in the names."""
    if config.get("model_type"):
        return str(config["model_type"])
    names = checkpoint.names()
    for model_type, pattern in _LAYOUTS.items():
        if any(pattern.search(n) for n in names):
            if model_type == "gpt2":
                if not uses_conv1d_layout(checkpoint):
                    continue  # nanoGPT: same names, nn.Linear layout (models/registry.py builds it)
            if model_type == "llama" and not any(n.endswith("mlp.gate_proj.weight") for n in names):
                continue
            return model_type
    return None


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


@contextlib.contextmanager
def _quiet(transformers):
    """transformers' own warnings (e.g. bos_token_id outside a tiny vocabulary) are not the user's business here."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------- the modules

class CausalLMLogits(nn.Module):
    """A transformers causal LM as `input_ids (B, T) -> logits (B, T, vocab)`, no cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits  # (B, T, vocab)


class SentenceEmbedder(nn.Module):
    """A transformers encoder as `input_ids (B, T) -> sentence embeddings (B, C)`.

    Tokens equal to `pad_token_id` are masked out of attention and of the pooling; pooling is "mean" (the mean of
    the last hidden states over real tokens, sentence-transformers' default) or "cls" (the first token)."""

    GROUP = 16  # rows per forward call

    def __init__(self, model: nn.Module, pad_token_id: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows are run in groups of similar length, each cut to its longest row: padding is masked anyway, so this
        only saves the work a long sentence would impose on short ones."""
        mask = input_ids != self.pad_token_id  # (B, T)
        lengths = mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        out = None
        for start in range(0, len(order), self.GROUP):
            rows = order[start:start + self.GROUP]
            width = max(int(lengths[rows].max()), 1)
            pooled = self._embed(input_ids[rows, :width], mask[rows, :width])
            if out is None:
                out = pooled.new_empty((input_ids.shape[0], pooled.shape[1]))
            out[rows] = pooled
        return out  # (B, C)

    def _embed(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state  # (b, t, C)
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (b, C)


# --------------------------------------------------------------------------------------------------- entry point

def build(checkpoint, config: dict, model_type: str) -> Runnable:
    """A `Runnable` for a Hugging Face family, or `NotRunnable` saying why not (missing package, unknown family,
    missing hyperparameters, tensors that do not fit)."""
    source = checkpoint.source
    family = FAMILIES.get(model_type)
    if family is None:
        runnable = ", ".join(sorted(FAMILIES))
        raise NotRunnable(source, f"Hugging Face model_type {model_type!r} has no adapter (runnable: {runnable}); "
                                  "spectra only")
    transformers = _transformers()
    if transformers is None:
        raise NotRunnable(source, f"{family} checkpoints run through the transformers package, which is not "
                                  f"installed ({INSTALL_HINT}); spectra only until then")
    config = dict(config)
    if "model_type" not in config:
        config = _config_from_shapes(checkpoint, config, model_type)
    kind = "causal_lm" if model_type in CAUSAL_FAMILIES else "encoder"
    with _quiet(transformers):
        hf_config = _hf_config(transformers, source, model_type, config)
        model, module_of, notes = _load(transformers, checkpoint, hf_config, kind)
    pad = None
    if kind == "causal_lm":
        module = CausalLMLogits(model)
    else:
        pad, pooling = _pad_token_id(checkpoint, hf_config), _pooling(checkpoint)
        module = SentenceEmbedder(model, pad, pooling)
        notes.append(f"encoder: sentence embeddings by {pooling} pooling over non-padding tokens (pad id {pad})")
    module.eval().requires_grad_(False)
    canonical = canonical_names(module)
    param_names = {stored: [ParamRef(canonical[f"model.{key}"])] for stored, key in module_of.items()
                   if f"model.{key}" in canonical}  # untransposed: the module keeps the stored layout
    return Runnable(module=module, kind=kind, architecture=f"hf-{model_type}", param_names=param_names,
                    tokenizer=None, eval_text=None, block_size=_block_size(checkpoint, hf_config, kind),
                    vocab_size=int(hf_config.vocab_size), notes=notes, pad_token_id=pad)


# ---------------------------------------------------------------------------------------------------- the config

def _hf_config(transformers, source: str, model_type: str, config: dict):
    mapping = transformers.CONFIG_MAPPING
    if model_type not in mapping:
        raise NotRunnable(source, f"this transformers ({transformers.__version__}) does not know model_type "
                                  f"{model_type!r}; spectra only")
    try:
        hf_config = mapping[model_type].from_dict(config)
    except Exception as e:  # noqa: BLE001 - a config transformers refuses is one readable line
        raise NotRunnable(source, f"config.json is not a valid {model_type} config ({_first_line(e)})") from None
    for key in ("dtype", "torch_dtype"):
        if hasattr(hf_config, key):
            with contextlib.suppress(Exception):
                setattr(hf_config, key, torch.float32)
    return hf_config


def _config_from_shapes(checkpoint, given: dict, model_type: str) -> dict:
    """A config.json for a GPT-2/Llama/BERT layout without one: sizes from the shapes, the rest from `given` (the
    user's answers); what neither fixes is listed in `NotRunnable.needs`."""
    shapes = {_strip(n): s for n, s in checkpoint.shapes.items()}

    def shape(suffix: str):
        hit = [s for n, s in shapes.items() if n.endswith(suffix)]
        return hit[0] if hit else None

    def count(pattern: str) -> int:
        found = {int(m.group(1)) for n in shapes if (m := re.search(pattern, n))}
        return max(found) + 1 if found else 0

    tied = _tied_in_checkpoint(checkpoint)
    if model_type == "gpt2":
        vocab, width = shape("wte.weight")
        derived = {"model_type": "gpt2", "vocab_size": vocab, "n_embd": width, "n_layer": count(r"h\.(\d+)\."),
                   "n_positions": shape("wpe.weight")[0], "n_inner": shape("h.0.mlp.c_fc.weight")[1],
                   "bos_token_id": None, "eos_token_id": None}
        needs = [Need("n_head", "attention heads per block (GPT-2 small: 12)", "int", _divisors(width))]
    elif model_type == "llama":
        vocab, width = shape("embed_tokens.weight")
        derived = {"model_type": "llama", "vocab_size": vocab, "hidden_size": width,
                   "num_hidden_layers": count(r"layers\.(\d+)\."),
                   "intermediate_size": shape("layers.0.mlp.gate_proj.weight")[0],
                   "attention_bias": any(n.endswith("self_attn.q_proj.bias") for n in shapes),
                   "tie_word_embeddings": tied, "max_position_embeddings": DEFAULT_BLOCK,
                   "bos_token_id": None, "eos_token_id": None}
        needs = [Need("num_attention_heads", "query heads per layer (Llama-2-7B: 32)", "int", _divisors(width)),
                 Need("rope_theta", "RoPE base frequency (Llama 2: 10000, Llama 3: 500000)", "float",
                      typical=10000.0),
                 Need("rms_norm_eps", "RMSNorm epsilon (Llama 2: 1e-5, Llama 3: 1e-5, TinyLlama: 1e-5)", "float",
                      typical=1e-5)]
        if "num_attention_heads" in given:
            heads = int(given["num_attention_heads"])
            head_dim = width // heads if heads > 0 and width % heads == 0 else 0
            kv_rows = shape("layers.0.self_attn.k_proj.weight")[0]
            if head_dim and kv_rows % head_dim == 0:
                derived["num_key_value_heads"] = kv_rows // head_dim
    else:  # bert
        vocab, width = shape("embeddings.word_embeddings.weight")
        derived = {"model_type": "bert", "vocab_size": vocab, "hidden_size": width,
                   "num_hidden_layers": count(r"layer\.(\d+)\."),
                   "intermediate_size": shape("layer.0.intermediate.dense.weight")[0],
                   "max_position_embeddings": shape("embeddings.position_embeddings.weight")[0],
                   "type_vocab_size": (shape("embeddings.token_type_embeddings.weight") or (2,))[0]}
        needs = [Need("num_attention_heads", "attention heads per layer (BERT-base: 12, MiniLM-L6: 12)", "int",
                      _divisors(width)),
                 Need("layer_norm_eps", "LayerNorm epsilon (BERT: 1e-12, RoBERTa: 1e-5)", "float", typical=1e-12)]
    missing = tuple(n for n in needs if n.name not in given)
    if missing:
        names = ", ".join(n.name for n in missing)
        raise NotRunnable(checkpoint.source, f"a {FAMILIES[model_type]} layout without config.json: the weights do "
                                             f"not fix {names}; give {'it' if len(missing) == 1 else 'them'} (or "
                                             "config.json)", needs=missing)
    return {**derived, **given}


def _divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


# --------------------------------------------------------------------------------------------------- the weights

def _load(transformers, checkpoint, hf_config, kind: str):
    """The transformers model filled with the checkpoint's tensors: (model, stored name -> module key, notes)."""
    source = checkpoint.source
    tied_checkpoint = _tied_in_checkpoint(checkpoint)
    notes: list[str] = []
    model = _instantiate(transformers, source, hf_config, kind)
    expected = model.state_dict()
    module_of, unused = _match_names(checkpoint, model, expected)
    if kind == "causal_lm":
        head, embed = _head_and_embedding(model)
        both = head is not None and embed is not None
        if both and _ties(model, head, embed) and not tied_checkpoint and head in module_of.values() \
                and embed in module_of.values():
            hf_config.tie_word_embeddings = False  # config says tied, weights say otherwise: the weights win
            notes.append("config.json ties the LM head to the embedding but the stored values differ: built untied")
            model = _instantiate(transformers, source, hf_config, kind)
            expected = model.state_dict()
            module_of, unused = _match_names(checkpoint, model, expected)
    canonical = canonical_names(model)
    loaded = {canonical[key] for key in module_of.values()}
    missing = [k for k in expected if k in canonical and canonical[k] not in loaded]
    if kind == "encoder":  # mean/CLS pooling never reads BERT's pooler: a masked-LM checkpoint has none
        for key in [k for k in missing if k.startswith("pooler.")]:
            missing.remove(key)
            with torch.no_grad():
                model.get_parameter(key).zero_()  # left uninitialised by no_init_weights: keep it finite
    if missing:
        listed = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise NotRunnable(source, f"tensors do not match the {hf_config.model_type} layout (missing {listed})")
    for stored, key in module_of.items():  # shapes and dtypes are known without reading any data
        if tuple(checkpoint.shapes[stored]) != tuple(expected[key].shape):
            raise NotRunnable(source, f"{stored} has shape {list(checkpoint.shapes[stored])}, the "
                                      f"{hf_config.model_type} config expects {list(expected[key].shape)}")
        if not checkpoint.dtypes[stored].startswith(("float", "bfloat")) and expected[key].is_floating_point():
            raise NotRunnable(source, f"{stored} has dtype {checkpoint.dtypes[stored]}, expected floating point")
    with torch.no_grad():  # one tensor at a time, straight into the module's float32 storage
        for stored, key in module_of.items():
            target = expected[key]
            target.copy_(checkpoint.tensor(stored).to(target.dtype))
    model.eval().requires_grad_(False)
    if unused:
        listed = ", ".join(unused[:3]) + (" ..." if len(unused) > 3 else "")
        notes.append(f"{len(unused)} tensors are not used by the {kind.replace('_', ' ')} ({listed}): cutting them "
                     "does not change the what-if")
    return model, module_of, notes


def _instantiate(transformers, source: str, hf_config, kind: str) -> nn.Module:
    auto = transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModel
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise normally (slower, same result once the weights load)
        no_init_weights = contextlib.nullcontext
    try:
        with no_init_weights():
            model = auto.from_config(hf_config)
        model.tie_weights()  # skipped along with the initialisation; the tie is one Parameter in two places
    except Exception as e:  # noqa: BLE001 - an inconsistent config is one readable line
        raise NotRunnable(source, f"cannot build {hf_config.model_type} from its config ({_first_line(e)})") from None
    return model.float()


def _match_names(checkpoint, model: nn.Module, expected: dict) -> tuple[dict[str, str], list[str]]:
    """(stored name -> module state-dict key, stored floating tensors the module does not use)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    module_of: dict[str, str] = {}
    for stored in checkpoint.names():
        key = _module_key(stored, prefix, expected)
        if key is not None and key not in module_of.values():
            module_of[stored] = key
    unused = [n for n in checkpoint.names()
              if n not in module_of and not _BUFFER_NAMES.search(n)
              and checkpoint.dtypes[n].startswith(("float", "bfloat"))
              and not any(other in module_of for other in checkpoint.tied_with(n))]  # a tied alias is used
    return module_of, unused


def _module_key(stored: str, prefix: str, expected: dict) -> str | None:
    candidates = [stored]
    if prefix:
        candidates += [f"{prefix}.{stored}", stored.removeprefix(f"{prefix}.")]
    legacy = [re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", c)) for c in candidates]
    for key in candidates + legacy:
        if key in expected:
            return key
    return None


def _head_and_embedding(model: nn.Module) -> tuple[str | None, str | None]:
    """State-dict keys of the output (LM head) and input embedding weights."""
    paths = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}

    def key(module):
        return f"{paths[id(module)]}.weight" if module is not None and id(module) in paths else None

    return key(model.get_output_embeddings()), key(model.get_input_embeddings())


def _ties(model: nn.Module, head_key: str, embed_key: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    return params[head_key] is params[embed_key]


def _tied_in_checkpoint(checkpoint) -> bool:
    """The checkpoint stores one token embedding for input and output: no separate head, or a head tied to it."""
    names = checkpoint.names()
    heads = [n for n in names if re.search(r"(^|\.)lm_head\.weight$", n)]
    return not heads or any(checkpoint.tied_with(h) for h in heads)


# ------------------------------------------------------------------------------------------- encoders, sizes

def _pad_token_id(checkpoint, hf_config) -> int:
    pad = getattr(hf_config, "pad_token_id", None)
    if pad is None:
        raise NotRunnable(checkpoint.source, "the encoder's config has no pad_token_id, needed to pool sentences",
                          needs=(Need("pad_token_id", "token id of padding ([PAD] in BERT: 0, <pad> in RoBERTa: 1)",
                                      "int"),))
    return int(pad)


def _pooling(checkpoint) -> str:
    """'cls' where a sentence-transformers folder says so (1_Pooling/config.json), else 'mean'."""
    folder = _folder(checkpoint)
    if folder is not None and (folder / "1_Pooling" / "config.json").is_file():
        try:
            pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        except (OSError, ValueError):
            return "mean"
        if pooling.get("pooling_mode_cls_token") and not pooling.get("pooling_mode_mean_tokens"):
            return "cls"
    return "mean"


def _block_size(checkpoint, hf_config, kind: str) -> int:
    """Longest input: the position table (GPT-2 n_positions, BERT max_position_embeddings, less RoBERTa's pad
    offset), capped by sentence-transformers' max_seq_length where the folder has one."""
    size = getattr(hf_config, "n_positions", None) or getattr(hf_config, "max_position_embeddings", None) \
        or DEFAULT_BLOCK
    if getattr(hf_config, "model_type", "") in ("roberta", "xlm-roberta"):
        size -= (getattr(hf_config, "pad_token_id", 1) or 0) + 1
    folder = _folder(checkpoint)
    if kind == "encoder" and folder is not None and (folder / "sentence_bert_config.json").is_file():
        with contextlib.suppress(OSError, ValueError, TypeError):
            size = min(size, int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]))
    return int(size)


def _folder(checkpoint) -> Path | None:
    for f in checkpoint.files or []:
        p = Path(f)
        if p.is_file():
            return p.parent
    return None


def _strip(name: str) -> str:
    for prefix in ("transformer.", "model.", "bert.", "roberta."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
