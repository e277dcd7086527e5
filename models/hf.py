"""Hugging Face models through `transformers` (an optional dependency): any architecture it can build from config.json.

The model is built from the checkpoint's config.json with `from_config` (nothing is ever downloaded) and filled with
the checkpoint's own tensors by name, in float32. What the what-if engine needs is a `models.contract.Runnable`, of
one of three kinds, chosen from config.json's `architectures` (else from what the model_type offers):

- causal language models (`*ForCausalLM`, `*LMHeadModel`): `module(input_ids)` gives logits (B, T, vocab);
- encoders (base models, masked LMs: BERT, RoBERTa, DistilBERT; sentence embedders such as all-MiniLM-L6-v2):
  `module(input_ids)` gives one embedding per sequence (B, C), mean-pooled over the non-padding tokens (or the first
  token where the folder's sentence-transformers `1_Pooling/config.json` says CLS). Padding is the config's
  `pad_token_id`;
- image classifiers (`*ForImageClassification`: ViT, DeiT, ...): `module(pixel_values)` gives logits (B, classes);
  the runnable carries its evaluation images (`models.vision`).
Encoder-decoder models are "spectra only" (a what-if would need decoder inputs).

Names. Checkpoint names are mapped to module names by transformers' own checkpoint conversion rules (renamings such
as ViT's `encoder.layer.N.attention.attention.query` -> `layers.N.attention.q_proj`, legacy LayerNorm
`gamma`/`beta`, the base-model prefix added or stripped); a stored tensor that needs more than a rename (split,
merged, permuted) makes the model "spectra only", since a cut must reach the module as the matrix analysed.
Layouts. The module keeps the stored layout, so every `ParamRef` is untransposed: GPT-2's Conv1D weights are in x out
in both (the analysis transposes to out x in on its side: `spectral.matrices.MatrixInfo.transposed`, and the pruner
maps back). A tied embedding/LM head is one module parameter: both names map to it, so a cut reaches input and output
together. Where config.json ties them but the stored values differ, the model is built untied (and says so).

Hostile configs (issue 17): sizes a config declares are checked against the stored tensors and a memory budget on
the meta device before anything is allocated (`models.limits`); any failure to build is one line (`NotRunnable`).

Without config.json, a GPT-2, Llama or BERT layout recognised from the tensor names is built from what the shapes
fix; what they do not (heads, RoPE base, norm epsilon) must be given (`config_overrides`), else `NotRunnable` lists
them in `needs`.

Stages (a cut in layer L re-runs layers L.. only) come from `models.hf_stages`, generically; a model whose forward
does not fit them runs unstaged.
"""
from __future__ import annotations

import contextlib
import json
import re

import torch
from torch import nn

from models import hf_stages, limits, vision
from models.contract import Need, NotRunnable, ParamRef, Runnable, canonical_names
from spectral.checkpoint import CheckpointError
from spectral.matrices import uses_conv1d_layout

CAUSAL, ENCODER, IMAGE = "causal_lm", "encoder", "image_classifier"
LAYOUT_FAMILIES = {"gpt2": "GPT-2", "llama": "Llama", "bert": "BERT"}  # recognised without config.json
INSTALL_HINT = "pip install transformers"
DEFAULT_BLOCK = 2048  # evaluation context cap when the config records none (RoPE/ALiBi models without max_position)
PROBE_TOKENS = 6  # tokens per row of the build-time probe (does it run; do the stages agree)

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
            if model_type == "gpt2" and not uses_conv1d_layout(checkpoint):
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


class ImageLogits(nn.Module):
    """A transformers image classifier as `pixel_values (B, 3, H, W) -> logits (B, classes)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits  # (B, classes)


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

    def groups(self, input_ids: torch.Tensor):
        """(rows, width, mask) per group of up to GROUP rows of similar length, each cut to its longest row: padding
        is masked anyway, so this only saves the work a long sentence would impose on short ones."""
        mask = input_ids != self.pad_token_id  # (B, T)
        lengths = mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        for start in range(0, len(order), self.GROUP):
            rows = order[start:start + self.GROUP]
            width = max(int(lengths[rows].max()), 1)
            yield rows, width, mask[rows, :width]

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(b, t, C) last hidden states -> (b, C) by the configured pooling over the real tokens."""
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (b, C)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = None
        for rows, width, mask in self.groups(input_ids):
            hidden = self.model(input_ids=input_ids[rows, :width], attention_mask=mask.long()).last_hidden_state
            pooled = self.pool(hidden, mask)
            if out is None:
                out = pooled.new_empty((input_ids.shape[0], pooled.shape[1]))
            out[rows] = pooled
        return out  # (B, C)


# --------------------------------------------------------------------------------------------------- entry point

def build(checkpoint, config: dict, model_type: str, *, memory_budget: int | None = None) -> Runnable:
    """A `Runnable` for a Hugging Face model, or `NotRunnable` saying why not (missing package, a model_type this
    transformers does not know, an encoder-decoder, missing hyperparameters, tensors that do not fit, a config whose
    sizes the stored tensors cannot back, a model over `memory_budget` bytes (default: `limits.default_budget()`))."""
    source = checkpoint.source
    transformers = _transformers()
    if transformers is None:
        raise NotRunnable(source, f"Hugging Face model_type {model_type!r} runs through the transformers package, "
                                  f"which is not installed ({INSTALL_HINT}); spectra only until then")
    config = dict(config)
    if "model_type" not in config:
        config = _config_from_shapes(checkpoint, config, model_type)
    with _quiet(transformers):
        hf_config = _hf_config(transformers, source, model_type, config)
        kind = _kind(transformers, source, hf_config, model_type)
        budget = limits.default_budget() if memory_budget is None else memory_budget
        model, module_of, notes = _load(transformers, checkpoint, hf_config, kind, budget)
        pad = None
        eval_inputs, eval_source = None, ""
        if kind == CAUSAL:
            module = CausalLMLogits(model)
            vocab = int(hf_config.vocab_size)
        elif kind == ENCODER:
            pad, pooling = _pad_token_id(checkpoint, hf_config), _pooling(checkpoint, notes)
            module = SentenceEmbedder(model, pad, pooling)
            vocab = int(hf_config.vocab_size)
            notes.append(f"encoder: sentence embeddings by {pooling} pooling over non-padding tokens (pad id {pad})")
        else:
            module = ImageLogits(model)
            vocab = None
            images = vision.evaluation_images(side_file(checkpoint, vision.PREPROCESSOR_FILE, notes), hf_config)
            eval_inputs, eval_source = images.pixel_values, images.source
            notes.extend(images.notes)
        module.eval().requires_grad_(False)
        canonical = canonical_names(module)
        probe = _probe_input(kind, hf_config, vocab, pad, eval_inputs)
        stages = _stages(source, module, kind, canonical, probe, hf_config, model_type, notes)
    param_names = {stored: [ParamRef(canonical[f"model.{key}"])] for stored, key in module_of.items()
                   if f"model.{key}" in canonical}  # untransposed: the module keeps the stored layout
    return Runnable(module=module, kind=kind, architecture=f"hf-{model_type}", param_names=param_names,
                    tokenizer=None, eval_text=None, block_size=_block_size(checkpoint, hf_config, kind),
                    vocab_size=vocab, stages=stages, notes=notes, pad_token_id=pad, eval_inputs=eval_inputs,
                    eval_inputs_source=eval_source)


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


def _names(mapping) -> set[str]:
    """Class names in one of transformers' auto mappings (values are a name or a tuple of names)."""
    out = set()
    for value in mapping.values():
        out.update([value] if isinstance(value, str) else value)
    return out


def _kind(transformers, source: str, hf_config, model_type: str) -> str:
    """causal_lm, encoder or image_classifier: config.json's `architectures` first, else what the model_type offers
    (a masked LM means an encoder; else a causal LM; else an image classifier; else the base model as an encoder)."""
    auto = transformers.models.auto.modeling_auto
    causal = _names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    image = _names(auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    seq2seq = _names(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    architectures = [str(a) for a in (getattr(hf_config, "architectures", None) or [])]
    for name in architectures[:1]:
        if name in image:
            return IMAGE
        if name in causal:
            return CAUSAL
        if name in seq2seq:
            break
    if model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES or getattr(hf_config, "is_encoder_decoder",
                                                                                   False):
        raise NotRunnable(source, f"Hugging Face model_type {model_type!r} is an encoder-decoder model: a what-if "
                                  "would need decoder inputs, which this tool does not make; spectra only")
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return ENCODER
    if model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return CAUSAL
    if model_type in auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return IMAGE
    if model_type in auto.MODEL_MAPPING_NAMES:
        return ENCODER
    raise NotRunnable(source, f"Hugging Face model_type {model_type!r} is neither a causal LM, an encoder nor an "
                              "image classifier in this transformers; spectra only")


def _auto_class(transformers, kind: str):
    return {CAUSAL: transformers.AutoModelForCausalLM, ENCODER: transformers.AutoModel,
            IMAGE: transformers.AutoModelForImageClassification}[kind]


def _config_from_shapes(checkpoint, given: dict, model_type: str) -> dict:
    """A config.json for a GPT-2/Llama/BERT layout without one: sizes from the shapes, the rest from `given` (the
    user's answers); what neither fixes is listed in `NotRunnable.needs`."""
    if model_type not in LAYOUT_FAMILIES:
        raise NotRunnable(checkpoint.source, f"a {model_type} checkpoint without config.json: give the config; "
                                             "spectra only until then")
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
            heads = given["num_attention_heads"]
            ok = isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 and width % heads == 0
            head_dim = width // heads if ok else 0
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
        raise NotRunnable(checkpoint.source, f"a {LAYOUT_FAMILIES[model_type]} layout without config.json: the "
                                             f"weights do not fix {names}; give "
                                             f"{'it' if len(missing) == 1 else 'them'} (or config.json)",
                          needs=missing)
    for need in needs:  # the user's answers, checked before transformers divides by them
        value = given[need.name]
        if need.choices and value not in need.choices:
            raise NotRunnable(checkpoint.source, f"{need.name}={value!r} does not fit the weights (it must divide "
                                                 f"the width {width})", needs=(need,))
    return {**derived, **given}


def _divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


# --------------------------------------------------------------------------------------------------- the weights

def _load(transformers, checkpoint, hf_config, kind: str, budget: int | None):
    """The transformers model filled with the checkpoint's tensors: (model, stored name -> module key, notes).

    Everything is checked on a meta-device model first (layer count, module count, names, shapes, dtypes, memory);
    only then is the real model allocated."""
    source = checkpoint.source
    notes: list[str] = []
    limits.check_layer_count(source, getattr(hf_config, "num_hidden_layers", None), checkpoint.names())
    meta = _instantiate(transformers, checkpoint, hf_config, kind, meta=True)
    module_of, unused = _match_names(checkpoint, meta)
    if kind == CAUSAL:
        head, embed = _head_and_embedding(meta)
        stored = {key: name for name, key in module_of.items()}
        if head in stored and embed in stored and _ties(meta, head, embed) \
                and stored[head] not in checkpoint.tied_with(stored[embed]):
            hf_config.tie_word_embeddings = False  # config says tied, weights say otherwise: the weights win
            notes.append("config.json ties the LM head to the embedding but the stored values differ: built untied")
            meta = _instantiate(transformers, checkpoint, hf_config, kind, meta=True)
            module_of, unused = _match_names(checkpoint, meta)
    expected = meta.state_dict()
    canonical = canonical_names(meta)
    loaded = {canonical.get(key, key) for key in module_of.values()}
    missing = [k for k in expected if k in canonical and canonical[k] not in loaded]
    optional = [k for k in missing if kind == ENCODER and k.startswith("pooler.")]  # mean/CLS pooling never reads
    missing = [k for k in missing if k not in optional]  # BERT's pooler: a masked-LM checkpoint has none
    prefix = getattr(meta, "base_model_prefix", "") or ""
    for name, why in getattr(checkpoint, "left_out", {}).items():  # in the file, but unreadable (a GGUF type)
        if _module_key(name, prefix, expected) in missing:
            raise NotRunnable(source, f"{name} could not be read ({why}) and the {hf_config.model_type} model needs "
                                      "it; spectra only")
    if missing:
        listed = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise NotRunnable(source, f"tensors do not match the {hf_config.model_type} layout (missing {listed})")
    for stored, key in module_of.items():  # shapes and dtypes are known without reading any data
        if tuple(checkpoint.shapes[stored]) != tuple(expected[key].shape):
            raise NotRunnable(source, f"{stored} has shape {list(checkpoint.shapes[stored])}, the "
                                      f"{hf_config.model_type} config expects {list(expected[key].shape)}")
        if not checkpoint.dtypes[stored].startswith(("float", "bfloat")) and expected[key].is_floating_point():
            raise NotRunnable(source, f"{stored} has dtype {checkpoint.dtypes[stored]}, expected floating point")
    limits.check_memory(source, meta, budget)
    del meta, expected

    model = _instantiate(transformers, checkpoint, hf_config, kind, meta=False)
    target = model.state_dict()
    with torch.no_grad():
        for key in optional:  # left uninitialised by no_init_weights: keep it finite
            model.get_parameter(key).zero_()
        for stored, key in module_of.items():  # one tensor at a time, straight into the module's float32 storage
            target[key].copy_(checkpoint.tensor(stored).to(target[key].dtype))
    model.eval().requires_grad_(False)
    if unused:
        listed = ", ".join(unused[:3]) + (" ..." if len(unused) > 3 else "")
        notes.append(f"{len(unused)} tensors are not used by the {kind.replace('_', ' ')} ({listed}): cutting them "
                     "does not change the what-if")
    return model, module_of, notes


def _instantiate(transformers, checkpoint, hf_config, kind: str, *, meta: bool) -> nn.Module:
    """`from_config` without initialising weights; on the meta device (no storage), with a bound on the number of
    modules built, for the checks; then for real."""
    source = checkpoint.source
    auto = _auto_class(transformers, kind)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise normally (slower, same result once the weights load)
        no_init_weights = contextlib.nullcontext
    device = torch.device("meta") if meta else contextlib.nullcontext()
    if getattr(hf_config, "architectures", []) is None:
        hf_config.architectures = []  # from_config iterates over them
    try:
        with limits.module_count_limit(source, checkpoint.n_tensors), device, no_init_weights():
            model = auto.from_config(hf_config)
        model.tie_weights()  # skipped along with the initialisation; the tie is one Parameter in two places
        return model.float()
    except NotRunnable:
        raise
    except Exception as e:  # noqa: BLE001 - an inconsistent config is one readable line
        raise NotRunnable(source, f"cannot build {hf_config.model_type} from its config ({_first_line(e)})") from None


def _renamer(model: nn.Module, expected: dict):
    """stored name -> (module key, whether it needs a layout conversion), by transformers' own loading rules;
    None with a transformers that has none (before 5.0: names are matched as stored, with or without prefix)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:
        return None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", "") or None

    def rename(stored: str) -> tuple[str, bool]:
        key, converter = rename_source_key(stored, renamings, converters, prefix, expected)
        return key, converter is not None

    return rename


def _match_names(checkpoint, model: nn.Module) -> tuple[dict[str, str], list[str]]:
    """(stored name -> module state-dict key, stored floating tensors the module does not use)."""
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    rename = _renamer(model, expected)
    module_of: dict[str, str] = {}
    converted = []
    for stored in checkpoint.names():
        key = None
        if rename is not None:
            renamed, needs_conversion = rename(stored)
            if needs_conversion:
                converted.append(stored)
                continue
            key = renamed if renamed in expected else None
        key = key or _module_key(stored, prefix, expected)
        if key is not None and key not in module_of.values():
            module_of[stored] = key
    if converted:
        listed = ", ".join(converted[:3]) + (" ..." if len(converted) > 3 else "")
        raise NotRunnable(checkpoint.source, f"{len(converted)} stored tensors ({listed}) need transformers' layout "
                                             "conversion (split, merged or permuted), so a cut could not reach the "
                                             "module as analysed; spectra only")
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

    try:
        return key(model.get_output_embeddings()), key(model.get_input_embeddings())
    except (AttributeError, NotImplementedError):
        return None, None


def _ties(model: nn.Module, head_key: str, embed_key: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    return head_key in params and embed_key in params and params[head_key] is params[embed_key]


def _tied_in_checkpoint(checkpoint) -> bool:
    """The checkpoint stores one token embedding for input and output: no separate head, or a head tied to it."""
    names = checkpoint.names()
    heads = [n for n in names if re.search(r"(^|\.)lm_head\.weight$", n)]
    return not heads or any(checkpoint.tied_with(h) for h in heads)


# ------------------------------------------------------------------------------------------ probe and stages

def _probe_input(kind: str, hf_config, vocab: int | None, pad: int | None, images) -> torch.Tensor:
    """A small fixed input: two rows of token ids (an encoder's second row padded), or two evaluation images."""
    if kind == IMAGE:
        if images is not None:
            return images[:2]
        return torch.zeros((2, 3, *vision.image_size(hf_config)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab - 1, 1), (2, PROBE_TOKENS), generator=g)
    if pad is not None:
        ids = ids + (ids >= pad).long()  # never the pad id
        ids[1, PROBE_TOKENS // 2:] = pad
    return ids


def _stages(source: str, module: nn.Module, kind: str, canonical: dict[str, str], probe: torch.Tensor, hf_config,
            model_type: str, notes: list[str]) -> list:
    """The staged forward (`models.hf_stages`), checked on `probe`; [] (with a note) where the model's forward does
    not fit it; `NotRunnable` where the model does not run at all."""
    try:
        return hf_stages.stage_runnable(module, kind, canonical, probe,
                                        getattr(hf_config, "num_hidden_layers", None))
    except hf_stages.ModelDoesNotRun as e:
        raise NotRunnable(source, f"the {model_type} model does not run as a {kind.replace('_', ' ')} ({e}); "
                                  "spectra only") from None
    except Exception as e:  # noqa: BLE001 - unstaged is slower, never wrong (the plain forward ran)
        notes.append(f"runs unstaged: every what-if re-runs the whole model ({_first_line(e)})")
        return []


# ------------------------------------------------------------------------------------------- encoders, sizes

def _pad_token_id(checkpoint, hf_config) -> int:
    pad = getattr(hf_config, "pad_token_id", None)
    if pad is None:
        raise NotRunnable(checkpoint.source, "the encoder's config has no pad_token_id, needed to pool sentences",
                          needs=(Need("pad_token_id", "token id of padding ([PAD] in BERT: 0, <pad> in RoBERTa: 1)",
                                      "int"),))
    return int(pad)


def _pooling(checkpoint, notes: list[str]) -> str:
    """'cls' where a sentence-transformers folder says so (1_Pooling/config.json), else 'mean'."""
    pooling = _json(side_file(checkpoint, "1_Pooling/config.json", notes))
    if pooling.get("pooling_mode_cls_token") and not pooling.get("pooling_mode_mean_tokens"):
        return "cls"
    return "mean"


def _block_size(checkpoint, hf_config, kind: str) -> int:
    """Longest input: the position table (GPT-2 n_positions, BERT max_position_embeddings, less RoBERTa's pad
    offset), capped by sentence-transformers' max_seq_length where the folder has one; image classifiers: the image
    side in pixels."""
    if kind == IMAGE:
        return int(max(vision.image_size(hf_config)))
    size = getattr(hf_config, "n_positions", None) or getattr(hf_config, "max_position_embeddings", None) \
        or DEFAULT_BLOCK
    if getattr(hf_config, "model_type", "") in ("roberta", "xlm-roberta"):
        size -= (getattr(hf_config, "pad_token_id", 1) or 0) + 1
    if kind == ENCODER:
        limit = _json(side_file(checkpoint, "sentence_bert_config.json", [])).get("max_seq_length")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            size = min(size, limit)
    return int(size)


def side_file(checkpoint, name: str, notes: list[str]) -> bytes | None:
    """A file beside the weights or uploaded with them (`Checkpoint.side_file`: confined to the server folder, size
    bounded); None when absent, or refused (the refusal goes to `notes`)."""
    try:
        return checkpoint.side_file(name)
    except CheckpointError as e:
        notes.append(f"{name} ignored: {e.problem}")
        return None


def _json(data: bytes | None) -> dict:
    """A side file's JSON object, or {} (absent, unreadable, not an object)."""
    if data is None:
        return {}
    try:
        value = json.loads(data.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _strip(name: str) -> str:
    for prefix in ("transformer.", "model.", "bert.", "roberta."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _first_line(error: BaseException) -> str:
    """The error as one short line (transformers' validation errors span several)."""
    text = " ".join(str(error).split())
    return text[:200] if text else type(error).__name__
