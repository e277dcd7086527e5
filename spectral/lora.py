"""LoRA / PEFT adapters: a base checkpoint plus (α/r)·B·A per adapted matrix, as a checkpoint of its own.

An adapter is a folder holding `adapter_config.json` and `adapter_model.safetensors` (or `.bin`), the layout PEFT's
`save_pretrained` writes (https://huggingface.co/docs/peft, "LoRA"): tensors `base_model.model.<module>.lora_A.weight`
(r × in) and `...lora_B.weight` (out × r), `lora_embedding_A` (r × vocab) and `lora_embedding_B` (dim × r) for
embeddings, and whole replaced modules (`modules_to_save`). The update of a module is
ΔW = s·B·A with s = lora_alpha / r (lora_alpha / √r with `use_rslora`; `rank_pattern`/`alpha_pattern` override r and
α per module), transposed where the base stores the weight as in × out (GPT-2's Conv1D, `fan_in_fan_out`) and for
embeddings, exactly as PEFT's `get_delta_weight` does. The adapter's tensors are read through
spectral/checkpoint.py's loader (validated safetensors, or `weights_only` pickles); its config through
`Checkpoint.side_file` (bounded, confined to the server folder).

`merge_adapter(base, adapter)` returns a `MergedCheckpoint`: the base with every adapted tensor replaced by
W + ΔW (float32), computed when read; the rest reads straight from the base.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spectral.checkpoint import Checkpoint, CheckpointError, load_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_-]+)?$")
_SAVED_MODULE = re.compile(r"\.modules_to_save(?:\.[A-Za-z0-9_-]+)?(?=\.)")
_BASE_LAYER = re.compile(r"\.base_layer(?=\.weight$)")  # save_embedding_layers: the base's own (possibly resized) copy
_REFUSED = {"lora_magnitude_vector": "DoRA (use_dora) adapters", "lora_B.bias": "LoRA biases (lora_bias)"}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of an adapter: its factors' tensor names, rank, α and scaling s."""

    module: str  # PEFT's module path without the base_model.model. prefix
    a_name: str  # tensor name of A in the adapter file
    b_name: str
    rank: int
    alpha: float
    scaling: float  # s in ΔW = s·B·A
    embedding: bool = False  # lora_embedding_A/B: ΔW = s·(B·A)ᵀ


@dataclass
class Adapter:
    """A LoRA adapter read from its folder: config, modules and the checkpoint holding its tensors."""

    source: str
    config: dict
    checkpoint: Checkpoint
    modules: dict[str, LoraModule]  # by module path
    replaced: dict[str, str] = field(default_factory=dict)  # modules_to_save: module tensor path -> adapter name
    warnings: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return self.checkpoint.sha256

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one module in float32: A is r × in, B is out × r (embeddings: A r × vocab, B dim × r)."""
        m = self.modules[module]
        return self.checkpoint.tensor(m.a_name).float(), self.checkpoint.tensor(m.b_name).float()


@dataclass(frozen=True)
class AdaptedMatrix:
    """A base tensor changed by the adapter: which module, its rank, α, scaling s, and whether ΔW is stored
    transposed (B·A is out × in; the base stores in × out or is an embedding)."""

    name: str  # the base checkpoint's tensor name
    module: str
    rank: int
    alpha: float
    scaling: float
    transposed: bool

    def to_dict(self) -> dict:
        return {"module": self.module, "rank": self.rank, "alpha": self.alpha, "scaling": self.scaling}


def is_adapter_folder(path) -> bool:
    """A folder holding adapter_config.json and adapter weights (PEFT's save_pretrained layout)."""
    folder = Path(str(path))
    return folder.is_dir() and (folder / ADAPTER_CONFIG).is_file() and any(
        (folder / name).is_file() for name in ADAPTER_WEIGHTS)


def has_base_weights(path) -> bool:
    """The adapter folder also holds the base model it adapts (a weights file that is not the adapter's)."""
    folder = Path(str(path))
    return folder.is_dir() and any(p.is_file() and p.name not in ADAPTER_WEIGHTS
                                   and p.suffix in (".safetensors", ".bin", ".pt", ".pth")
                                   and not p.name.endswith(".index.json") for p in folder.iterdir())


def load_adapter(folder, *, max_bytes: int | None = None) -> Adapter:
    """Read a PEFT LoRA adapter folder; `CheckpointError` (one line) for anything unreadable or unsupported."""
    folder = Path(str(folder))
    label = str(folder)
    weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if not folder.is_dir() or weights is None:
        raise CheckpointError(label, f"not a LoRA adapter folder: expected {ADAPTER_CONFIG} and "
                                     f"{' or '.join(ADAPTER_WEIGHTS)}")
    checkpoint = load_checkpoint(weights, max_bytes=max_bytes)
    return adapter_from(checkpoint, checkpoint.side_file(ADAPTER_CONFIG), label)


def adapter_from(checkpoint: Checkpoint, config_raw: bytes | None, label: str) -> Adapter:
    """An adapter from its weights, already opened by the loader (a folder, a server-folder entry or an upload),
    and the bytes of its adapter_config.json."""
    if config_raw is None:
        raise CheckpointError(label, f"no {ADAPTER_CONFIG} beside the adapter weights")
    config = _parse_config(f"{label}/{ADAPTER_CONFIG}", config_raw)
    modules, replaced, warnings = _modules(label, config, checkpoint)
    if not modules and not replaced:
        raise CheckpointError(label, "no LoRA factors (lora_A/lora_B) in the adapter weights")
    return Adapter(label, config, checkpoint, modules, replaced, warnings)


def _parse_config(label: str, raw: bytes) -> dict:
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(label, f"not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(label, "expected a JSON object")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise CheckpointError(label, f"peft_type {kind} is not LoRA; only LoRA adapters are merged")
    if config.get("use_dora"):
        raise CheckpointError(label, "DoRA adapters (use_dora) rescale the merged weight's columns; not supported")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not _is_number(r) or int(r) != r or r < 1 or not _is_number(alpha):
        raise CheckpointError(label, f"r must be a positive integer and lora_alpha a number (got r={r!r}, "
                                     f"lora_alpha={alpha!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise CheckpointError(label, f"{key} must be an object mapping module patterns to numbers")
    return config


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: the first key that matches the end of the module path at a '.' boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module) and _is_number(value):
            return value
    return default


def _modules(label: str, config: dict, checkpoint: Checkpoint) -> tuple[dict, dict, list[str]]:
    """LoRA modules (A/B pairs with rank, α, s), whole replaced tensors, and warnings for what is left out."""
    pairs: dict[tuple[str, bool], dict[str, str]] = {}
    replaced: dict[str, str] = {}
    warnings: list[str] = []
    for name in checkpoint.names():
        short = name.removeprefix(PEFT_PREFIX)
        for marker, what in _REFUSED.items():
            if marker in short:
                raise CheckpointError(label, f"{what} are not supported ({name})")
        if m := _LORA_KEY.match(short):
            pairs.setdefault((m["module"], False), {})[m["kind"][-1]] = name
        elif m := _EMBEDDING_KEY.match(short):
            pairs.setdefault((m["module"], True), {})[m["kind"][-1]] = name
        elif "modules_to_save" in short:
            replaced[_SAVED_MODULE.sub("", short)] = name
        elif _BASE_LAYER.search(short):
            replaced[_BASE_LAYER.sub("", short)] = name
        else:
            warnings.append(f"{label}: tensor {name} is not a LoRA factor; left out")
    modules = {}
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for (module, embedding), found in pairs.items():
        if set(found) != {"A", "B"}:
            raise CheckpointError(label, f"module {module} has lora_{next(iter(found))} without its partner")
        a_shape, b_shape = checkpoint.shapes[found["A"]], checkpoint.shapes[found["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise CheckpointError(label, f"module {module}: LoRA on convolutions ({len(a_shape)}-D factors) is not "
                                         "supported")
        rank = int(a_shape[0])
        if b_shape[1] != rank:
            raise CheckpointError(label, f"module {module}: lora_A is {a_shape[0]}×{a_shape[1]} but lora_B is "
                                         f"{b_shape[0]}×{b_shape[1]}; their inner sizes differ")
        expected = _pattern_value(rank_pattern, module, config.get("r", 8))
        if int(expected) != rank:
            warnings.append(f"{label}: module {module} has rank {rank} in its factors but {expected} in the config; "
                            "the factors' rank is used")
        alpha = float(_pattern_value(alpha_pattern, module, config.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[module] = LoraModule(module, found["A"], found["B"], rank, alpha, scaling, embedding)
    return modules, replaced, warnings


# ----------------------------------------------------------------------------------------------------- merging

def _base_tensor_for(module_tensor: str, base: Checkpoint) -> str | None:
    """The base tensor a PEFT path names: the same name, or the one it ends with (or that ends with it) at a '.'
    boundary (PEFT wraps GPT2LMHeadModel, a base saved from GPT2Model lacks 'transformer.'); None unless unique."""
    if module_tensor in base.shapes:
        return module_tensor
    found = [n for n in base.shapes if module_tensor.endswith("." + n) or n.endswith("." + module_tensor)]
    return found[0] if len(found) == 1 else None


def delta_weight(adapter: Adapter, module: str, stored_shape: tuple[int, ...], *, fan_in_fan_out: bool) -> tuple[
        torch.Tensor, bool]:
    """(ΔW in the base's stored layout (float32), transposed?) for one module: s·B·A, or its transpose where the base
    stores in × out (Conv1D) or for an embedding, as PEFT's `get_delta_weight`."""
    m = adapter.modules[module]
    A, B = adapter.factors(module)
    delta = (B @ A) * m.scaling  # out × in (embeddings: dim × vocab)
    shape = tuple(stored_shape)
    if tuple(delta.shape) == shape and tuple(delta.T.shape) == shape:  # square: the module type decides
        transposed = m.embedding or fan_in_fan_out
    elif tuple(delta.shape) == shape:
        transposed = False
    elif tuple(delta.T.shape) == shape:
        transposed = True
    else:
        raise CheckpointError(adapter.source, f"module {module}: B·A is {delta.shape[0]}×{delta.shape[1]} but the "
                                              f"base tensor is {'×'.join(map(str, shape))}")
    return (delta.T.contiguous() if transposed else delta), transposed


@dataclass(eq=False)
class MergedCheckpoint(Checkpoint):
    """A base checkpoint with a LoRA adapter merged in: adapted tensors read as W + ΔW (float32), tensors the adapter
    saves whole (modules_to_save, save_embedding_layers) as the adapter's copy (plus ΔW where also adapted), the rest
    as stored in the base.

    `files` is empty, so a Ray map sends the merged tensors themselves rather than opening the base's files."""

    base: Checkpoint | None = None
    adapter: Adapter | None = None
    adapted: dict[str, AdaptedMatrix] = field(default_factory=dict)  # base tensor name -> what changed it
    _modules: dict[str, str] = field(default_factory=dict, repr=False)  # base tensor name -> LoRA module
    _replaced: dict[str, str] = field(default_factory=dict, repr=False)  # base tensor name -> adapter tensor

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._modules and name not in self._replaced:
            return self.base.tensor(name)
        if name in self._replaced:
            stored = self.adapter.checkpoint.tensor(self._replaced[name]).float()
        else:
            stored = self.base.tensor(name).float()
        if name in self._modules:
            fan_in_fan_out = bool(self.adapter.config.get("fan_in_fan_out", False))
            delta, _ = delta_weight(self.adapter, self._modules[name], tuple(stored.shape),
                                    fan_in_fan_out=fan_in_fan_out)
            stored = stored + delta
        return stored


def merge_adapter(base: Checkpoint, adapter: Adapter) -> MergedCheckpoint:
    """The base with the adapter merged (see `MergedCheckpoint`); `CheckpointError` when a module names no base
    tensor or shapes disagree."""
    modules: dict[str, str] = {}
    replaced: dict[str, str] = {}
    adapted: dict[str, AdaptedMatrix] = {}
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out", False))
    for module, m in adapter.modules.items():
        name = _base_tensor_for(module + ".weight", base) or _base_tensor_for(module, base)
        if name is None:
            raise CheckpointError(adapter.source, f"module {module} matches no tensor of the base {base.source}")
        factors_shape = (adapter.checkpoint.shapes[m.b_name][0], adapter.checkpoint.shapes[m.a_name][1])
        shape = tuple(base.shapes[name])
        if factors_shape not in (shape, shape[::-1]):
            raise CheckpointError(adapter.source, f"module {module}: B·A is {factors_shape[0]}×{factors_shape[1]} but "
                                                  f"the base's {name} is {'×'.join(map(str, shape))}")
        square = factors_shape == shape and factors_shape == shape[::-1]
        transposed = (m.embedding or fan_in_fan_out) if square else factors_shape != shape
        modules[name] = module
        adapted[name] = AdaptedMatrix(name, module, m.rank, m.alpha, m.scaling, transposed)
    for path, saved in adapter.replaced.items():
        name = _base_tensor_for(path, base)
        if name is None or tuple(base.shapes[name]) != tuple(adapter.checkpoint.shapes[saved]):
            raise CheckpointError(adapter.source, f"saved module tensor {saved} matches no tensor of the same shape in "
                                                  f"the base {base.source}")
        replaced[name] = saved
    kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(Checkpoint) if f.init}
    changed = set(modules) | set(replaced)
    kwargs.update(
        source=f"{base.source} + {adapter.source}", format="lora",
        sha256=hashlib.sha256(f"{base.sha256}+lora:{adapter.sha256}".encode()).hexdigest(),
        dtypes={n: ("float32" if n in changed else d) for n, d in base.dtypes.items()},
        # a tie is kept only if the adapter changed none or all of its names
        tied_groups=[g for g in base.tied_groups if not (changed & set(g)) or set(g) <= changed],
        files=[], warnings=list(base.warnings) + list(adapter.warnings), quantization={})
    return MergedCheckpoint(**kwargs, base=base, adapter=adapter, adapted=adapted, _modules=modules,
                            _replaced=replaced)


def open_adapter_pair(folder, *, max_bytes: int | None = None) -> tuple[Checkpoint, MergedCheckpoint]:
    """A folder holding a base model and an adapter beside it -> (base, base with the adapter merged)."""
    base = load_checkpoint(str(folder), max_bytes=max_bytes)
    return base, merge_adapter(base, load_adapter(folder, max_bytes=max_bytes))
