"""The model contract: what the what-if engine needs from an architecture, and nothing about any architecture.

`models.registry` (dispatch, the demo/nanoGPT GPT) and `models.hf` (Hugging Face families) both build `Runnable`s
from this module, and `spectral/` consumes them; keeping the contract here is what keeps those imports acyclic.

- `Runnable`: a torch module in eval mode, float32, never modified after construction; `param_names` maps every
  checkpoint tensor that feeds it to the module parameters it becomes (tied names map to one parameter), so a cut
  matrix is swapped in without touching the module; `stages` cut the forward pass into consecutive pieces, each
  naming the parameters it reads, so a cut in block 3 re-runs blocks 3..n only (from block 2 when the evaluator
  keeps only every second block's input: spectral/evaluation.py `STAGE_INPUT_STRIDE`).
- `NotRunnable`: the checkpoint can be analysed but not run; `needs` lists hyperparameters (`Need`) that would make
  it runnable if the user gave them.
- The swap lock: `torch.func.functional_call` swaps tensors into a module for the duration of a call, so every
  functional call on a shared module takes the module's lock (`locked_functional_call`, `submodule_call`).
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

Overrides = Mapping[str, torch.Tensor]  # canonical module parameter name -> replacement tensor


@dataclass(frozen=True)
class Need:
    """A hyperparameter the weights do not fix, which the user can give (`config_overrides={name: value}`)."""

    name: str  # the config key, e.g. "n_head", "num_attention_heads", "rope_theta"
    help: str  # what it is, with the usual values of well-known models
    kind: str = "int"  # "int" | "float"
    choices: tuple = ()  # the only values the shapes allow (e.g. the divisors of the width for a head count)
    typical: float | int | None = None  # a value to show as a placeholder; never used unless the user picks it


class NotRunnable(Exception):
    """The checkpoint can be analysed but not run; `str(error)` is one line: "<source>: <reason>".

    `needs` lists hyperparameters that would make it runnable if the user gave them (empty when none would)."""

    def __init__(self, source: str, reason: str, needs: tuple[Need, ...] = ()):
        self.source = str(source)
        self.reason = " ".join(str(reason).split())
        self.needs = tuple(needs)
        super().__init__(f"{self.source}: {self.reason}")


@dataclass(frozen=True)
class ParamRef:
    """One module parameter fed by a checkpoint tensor."""

    name: str  # canonical parameter name in `Runnable.module` (as `named_parameters()` lists it)
    transposed: bool = False  # the parameter is the stored tensor transposed (2-D only)


@dataclass(frozen=True)
class Stage:
    """A consecutive piece of the forward pass: `run(overrides, x)` maps the previous stage's output to the next.

    `x` is the model's input for the first stage; between stages it is whatever the builder chose (a tensor, or an
    object such as `models.hf_stages.Hidden`: hidden states plus the captured arguments of every layer call), which
    the evaluator caches per stage without looking inside. The last stage's output is the model's output; for causal
    LMs its input is a tensor (B, T, C) and it is position-wise (sampling runs it on the last position only)."""

    name: str
    params: frozenset[str]  # canonical parameter names this stage reads
    run: Callable[[Overrides, object], object]


@dataclass
class Runnable:
    """A runnable model built from a checkpoint (see the module docstring)."""

    module: nn.Module
    kind: str  # "causal_lm" (logits over a vocabulary) | "encoder" (sentence embeddings) | "image_classifier"
    # (pixel_values (B, 3, H, W) -> logits over classes (B, classes))
    architecture: str
    param_names: dict[str, list[ParamRef]]  # checkpoint tensor name -> module parameters it feeds
    tokenizer: object | None  # tokenizers.Tokenizer
    eval_text: str | None  # held-out text shipped with the model, if any
    block_size: int  # longest input in tokens
    vocab_size: int | None = None
    stages: list[Stage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things worth telling the user (ignored side files)
    pad_token_id: int | None = None  # encoders: the id that pads sentences to one length (masked out)
    eval_inputs: torch.Tensor | None = None  # fixed evaluation inputs shipped with the runnable (image classifiers:
    # pixel_values (N, 3, H, W), already resized and normalised by the model's image processor); None for text models
    eval_inputs_source: str = ""  # one line saying where `eval_inputs` come from
    _by_name: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def params_for(self, tensor_names) -> list[ParamRef]:
        """Module parameters fed by any of these checkpoint tensors (a matrix and its tied names), de-duplicated."""
        seen: dict[str, ParamRef] = {}
        for name in tensor_names:
            for ref in self.param_names.get(name, []):
                seen.setdefault(ref.name, ref)
        return list(seen.values())

    def parameter(self, name: str) -> torch.Tensor:
        """The untouched module parameter `name` (canonical); read-only by convention."""
        if self._by_name is None:
            self._by_name = dict(self.module.named_parameters())
        return self._by_name[name]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, overrides: Overrides | None = None) -> torch.Tensor:
        """The module's output with some parameters replaced; `module` itself is never changed. `input_ids` is the
        model's input: token ids (B, T), or pixel_values (B, 3, H, W) for an image classifier. Output: logits
        (B, T, vocab) for a causal LM, embeddings (B, C) for an encoder, logits (B, classes) for a classifier."""
        overrides = overrides or {}
        if self.stages:
            x = input_ids
            for stage in self.stages:
                x = stage.run(overrides, x)
            return x
        return locked_functional_call(self.module, overrides, (input_ids,), tie_weights=True)


def canonical_names(module: nn.Module) -> dict[str, str]:
    """Every parameter name, aliases included (`lm_head.weight`), -> the name `named_parameters()` lists."""
    first: dict[int, str] = {}
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


_SWAP_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_SWAP_LOCKS_GUARD = threading.Lock()


def swap_lock(module: nn.Module) -> threading.RLock:
    """The lock every functional call on `module` holds. `functional_call` swaps the given tensors into the module
    for the duration of the call, so two threads (two browser sessions sharing one cached model) must take turns."""
    with _SWAP_LOCKS_GUARD:
        lock = _SWAP_LOCKS.get(module)
        if lock is None:
            lock = _SWAP_LOCKS[module] = threading.RLock()
        return lock


def locked_functional_call(module: nn.Module, params: Mapping[str, torch.Tensor], args: tuple, *,
                           tie_weights: bool, kwargs: dict | None = None):
    """`torch.func.functional_call` under the module's swap lock (never changes the module once it returns)."""
    with swap_lock(module):
        return functional_call(module, dict(params), args, kwargs, tie_weights=tie_weights, strict=False)


def submodule_call(model: nn.Module, path: str, canonical: dict[str, str]):
    """(call, params): call(overrides, *args) runs submodule `path` with its overridden parameters swapped in."""
    sub = model.get_submodule(path)
    local_to_canonical = {local: canonical[f"{path}.{local}"]
                          for local, _ in sub.named_parameters(remove_duplicate=False)}

    def call(overrides: Overrides, *args):
        swapped = {local: overrides[c] for local, c in local_to_canonical.items() if c in overrides}
        if not swapped:
            with swap_lock(sub):  # another thread may have its tensors swapped into `sub` right now
                return sub(*args)
        return locked_functional_call(sub, swapped, args, tie_weights=False)

    return call, frozenset(local_to_canonical.values())
