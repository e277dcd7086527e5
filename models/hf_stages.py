"""Staged forwards for Hugging Face models, found generically: embedding, each layer of the model's layer list, then
the rest (final norm, head, logit soft-capping), so a cut in layer L re-runs layers L.. only.

No family code: the stages drive the model's own `forward`.
- Embedding stage: the whole model runs with every layer switched to pass its input through; each layer's call
  (positional and keyword arguments: attention masks, position embeddings, ALiBi biases, which may differ per layer)
  is recorded, and the run stops at the last layer. Output: `Hidden` (the first layer's input plus every call).
- Layer stage i: the real layer on the hidden states with its recorded arguments.
- Head stage: the whole model runs again with every layer returning the given hidden states, so everything the
  model does after its stack runs on them; its input is blank (zeros) and what comes before the stack is discarded.
The switch is thread-local (`_STATE`): other threads using the same module meanwhile run it normally.

`stage_runnable` probes the model once: each layer must be called exactly once, in order; the parameters each stage
reads are recorded from the modules it calls (parameters read outside any call are given to both the embedding and
the head stage); the staged output must equal the plain forward on a probe input. A model that fails any of these
keeps the unstaged path (and the runnable says so in its notes).
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from models.contract import Overrides, Stage, locked_functional_call, swap_lock

_STATE = threading.local()  # .mode: _Capture | _Inject | None; .seen: list of modules called (probe only)


class NotStageable(Exception):
    """The model's forward does not fit embedding -> layers -> head (the reason is the message)."""


class _StopAfterLayers(Exception):
    """Raised once the last layer's call is recorded: the rest of the forward is not needed."""


@dataclass(frozen=True)
class LayerCall:
    """The arguments of one layer call, without the hidden states."""

    args: tuple
    kwargs: dict
    keyword: bool  # the hidden states came as `hidden_states=`, not as the first positional argument

    def arguments(self, states: torch.Tensor) -> tuple[tuple, dict]:
        if self.keyword:
            return self.args, {**self.kwargs, "hidden_states": states}
        return (states, *self.args), self.kwargs


@dataclass(frozen=True)
class Hidden:
    """Between layer stages: hidden states (B, T, C) and every layer's recorded call."""

    states: torch.Tensor
    calls: tuple[LayerCall, ...]


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    if args and torch.is_tensor(args[0]):
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs), False)
    if not args and torch.is_tensor(kwargs.get("hidden_states")):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], LayerCall((), rest, True)
    raise NotStageable("a layer is called without its hidden states first")


class _Switch:
    """Installed as `layer.forward`: the class's forward, unless this thread is capturing or injecting. (It holds
    the layer itself, not a bound method, so a deep copy of the model gets switches on its own layers.)"""

    def __init__(self, layer: nn.Module, index: int, returns: int | None):
        self.layer = layer
        self.index = index
        self.returns = returns  # None: the layer returns a tensor; n: a tuple of n with the hidden states first

    def __call__(self, *args, **kwargs):
        mode = getattr(_STATE, "mode", None)
        if mode is None:
            return type(self.layer).forward(self.layer, *args, **kwargs)
        return mode(self, args, kwargs)

    def output(self, states: torch.Tensor):
        return states if self.returns is None else (states,) + (None,) * (self.returns - 1)


class _Capture:
    def __init__(self, n: int):
        self.calls: list[LayerCall | None] = [None] * n
        self.first: torch.Tensor | None = None

    def __call__(self, switch: _Switch, args, kwargs):
        i = switch.index
        if self.calls[i] is not None or (i and self.calls[i - 1] is None):
            raise NotStageable(f"layer {i} is called out of order")
        states, call = _split(args, kwargs)
        if i == 0:
            self.first = states
        self.calls[i] = call
        if i == len(self.calls) - 1:
            _STATE.after = True
            raise _StopAfterLayers
        return switch.output(states)


class _Inject:
    def __init__(self, states: torch.Tensor, n: int):
        self.states = states
        self.n = n

    def __call__(self, switch: _Switch, args, kwargs):
        if switch.index == self.n - 1:
            _STATE.after = True  # from here on, modules called belong to the head
        return switch.output(self.states)


def _record(module, args):
    seen = getattr(_STATE, "seen", None)
    if seen is not None:
        seen.append((getattr(_STATE, "after", False), module))


class Stack:
    """The staged pieces of one Hugging Face model (`model`, a submodule of the runnable's module at `path`)."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, layers_path: str, canonical: dict[str, str],
                 path: str, returns: list[int | None]):
        self.model = model
        self.layers = layers
        self.layers_path = layers_path  # e.g. "model.layers", relative to `model`
        self.n = len(layers)
        self.prefix = f"{path}." if path else ""
        self.local_of = {c: local for local, c in
                         ((local, canonical[self.prefix + local])
                          for local, _ in model.named_parameters(remove_duplicate=False))}
        self.layer_local = []
        for i, layer in enumerate(layers):
            names = {canonical[f"{self.prefix}{layers_path}.{i}.{local}"]: local
                     for local, _ in layer.named_parameters(remove_duplicate=False)}
            self.layer_local.append(names)
        layer_params = {c for names in self.layer_local for c in names}
        self.outside = frozenset(self.local_of) - layer_params
        self.embed_params = self.head_params = self.outside  # narrowed by `assign_params`
        for i, layer in enumerate(layers):
            layer.forward = _Switch(layer, i, returns[i])

    # ------------------------------------------------------------------------------------------------- pieces

    def embed(self, overrides: Overrides, inputs: dict) -> Hidden:
        """Run the model up to its first layer; record every layer's call."""
        capture = _Capture(self.n)
        _STATE.mode, _STATE.after = capture, False
        try:
            self._call(overrides, self.embed_params, inputs)
        except _StopAfterLayers:
            pass
        finally:
            _STATE.mode = None
        if any(call is None for call in capture.calls):
            raise NotStageable("not every layer was called")
        return Hidden(capture.first, tuple(capture.calls))

    def layer(self, i: int, overrides: Overrides, x: Hidden) -> Hidden | torch.Tensor:
        """Layer i on the hidden states; the last layer hands over a plain tensor."""
        layer = self.layers[i]
        swapped = {local: overrides[c] for c, local in self.layer_local[i].items() if c in overrides}
        args, kwargs = x.calls[i].arguments(x.states)
        with swap_lock(layer):
            out = functional_call(layer, swapped, args, kwargs, strict=False) if swapped else layer(*args, **kwargs)
        states = out[0] if isinstance(out, tuple) else out
        return Hidden(states, x.calls) if i < self.n - 1 else states

    def head(self, overrides: Overrides, states: torch.Tensor, inputs: dict):
        """The model's output with `states` as the last layer's output (`inputs`: blank inputs of the same batch)."""
        _STATE.mode, _STATE.after = _Inject(states, self.n), False
        try:
            return self._call(overrides, self.head_params, inputs)
        finally:
            _STATE.mode = None

    def _call(self, overrides: Overrides, params: frozenset[str], inputs: dict):
        local = {self.local_of[c]: t for c, t in overrides.items() if c in params}
        if local:
            return locked_functional_call(self.model, local, (), tie_weights=True, kwargs=inputs)
        with swap_lock(self.model):
            return self.model(**inputs)

    # ------------------------------------------------------------------------------------------------ the probe

    def assign_params(self, embed_seen: list, head_seen: list) -> None:
        """Which parameters outside the layers the embedding and the head stage read: the direct parameters of the
        modules each called (`recording`; the head's: those called after the last layer). Parameters read without a
        module call stay with both."""
        canonical_of = {id(self.model.get_parameter(local)): c for c, local in self.local_of.items()}

        def read(seen, after_only):
            return {canonical_of[id(p)] for after, m in seen if after or not after_only
                    for p in m.parameters(recurse=False) if id(p) in canonical_of}

        embed, head = read(embed_seen, False), read(head_seen, True)
        unread = self.outside - embed - head
        self.embed_params = frozenset((embed & self.outside) | unread)
        self.head_params = frozenset((head & self.outside) | unread)


@contextlib.contextmanager
def recording():
    """Within the block, this thread's module calls are listed (as (after the last layer, module)) in the list
    yielded."""
    seen: list = []
    _STATE.seen = seen
    hook = nn.modules.module.register_module_forward_pre_hook(_record)
    try:
        yield seen
    finally:
        hook.remove()
        _STATE.seen = None


# ------------------------------------------------------------------------------------------------ finding the stack

def find_layers(model: nn.Module, n_layers: int | None) -> tuple[str, nn.ModuleList]:
    """The model's layer list: the first ModuleList of modules of one class holding parameters, `n_layers` long
    where the config says how many."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or not any(True for _ in module[0].parameters()):
            continue
        if n_layers is None or len(module) == n_layers:
            return name, module
    raise NotStageable("no list of layers found")


class ModelDoesNotRun(Exception):
    """The plain forward fails on the probe input (the cause is chained)."""


def _plain_run(module: nn.Module, layers: nn.ModuleList | None, probe: torch.Tensor):
    """(what each layer returns, the output): the module run once, plainly, on `probe`; with `layers`, each must be
    called once, in order, returning a tensor or a tuple with the hidden states first (else `returns` is None)."""
    order: list[int] = []
    returns: list[int | None] = [None] * (len(layers) if layers is not None else 0)
    shape_ok = [True]

    def hook(i):
        def after(module, args, out):
            order.append(i)
            if isinstance(out, tuple):
                returns[i] = len(out)
                shape_ok[0] &= bool(out) and torch.is_tensor(out[0])
            elif not torch.is_tensor(out):
                shape_ok[0] = False
        return after

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers or [])]
    try:
        output = module(probe)
    except Exception as e:
        raise ModelDoesNotRun(" ".join(str(e).split())[:200] or type(e).__name__) from e
    finally:
        for h in handles:
            h.remove()
    fits = layers is not None and shape_ok[0] and order == list(range(len(layers)))
    return (returns if fits else None), output


def _uninstall(layers: nn.ModuleList) -> None:
    for layer in layers:
        if isinstance(layer.__dict__.get("forward"), _Switch):
            del layer.__dict__["forward"]


# ------------------------------------------------------------------------------------------------ stages by kind

@dataclass(frozen=True)
class Group:
    """Encoders: rows of the batch run together (similar lengths), their attention mask, and their activations."""

    rows: torch.Tensor
    mask: torch.Tensor
    x: object  # Hidden, or the last layer's output tensor


def _stages(stack: Stack, embed: Callable, each: Callable, head: Callable) -> list[Stage]:
    stages = [Stage("embedding", stack.embed_params, embed)]
    for i in range(stack.n):
        stages.append(Stage(f"{stack.prefix}{stack.layers_path}.{i}", frozenset(stack.layer_local[i]),
                            functools.partial(_layer_stage, each, i)))
    stages.append(Stage("head", stack.head_params, head))
    return stages


def _layer_stage(each: Callable, i: int, overrides: Overrides, x):
    return each(i, overrides, x)


def causal_lm_stages(stack: Stack) -> list[Stage]:
    """input_ids (B, T) -> ... -> logits (B, T, vocab); the head stage's input is the last hidden states (B, T, C)."""
    def embed(overrides, ids):
        return stack.embed(overrides, {"input_ids": ids, "use_cache": False})

    def head(overrides, states):
        blank = torch.zeros(states.shape[:2], dtype=torch.long, device=states.device)
        return stack.head(overrides, states, {"input_ids": blank, "use_cache": False}).logits

    return _stages(stack, embed, stack.layer, head)


def image_classifier_stages(stack: Stack, pixel_shape: tuple[int, ...]) -> list[Stage]:
    """pixel_values (B, 3, H, W) -> ... -> logits (B, classes)."""
    def embed(overrides, pixels):
        return stack.embed(overrides, {"pixel_values": pixels})

    def head(overrides, states):
        blank = torch.zeros((states.shape[0], *pixel_shape), dtype=states.dtype, device=states.device)
        return stack.head(overrides, states, {"pixel_values": blank}).logits

    return _stages(stack, embed, stack.layer, head)


def encoder_stages(stack: Stack, embedder) -> list[Stage]:
    """input_ids (B, T) -> sentence embeddings (B, C), in the row groups of `models.hf.SentenceEmbedder`."""
    def embed(overrides, ids):
        groups = []
        for rows, width, mask in embedder.groups(ids):
            inputs = {"input_ids": ids[rows, :width], "attention_mask": mask.long()}
            groups.append(Group(rows, mask, stack.embed(overrides, inputs)))
        return (ids.shape[0], groups)

    def each(i, overrides, x):
        n, groups = x
        return (n, [Group(g.rows, g.mask, stack.layer(i, overrides, g.x)) for g in groups])

    def head(overrides, x):
        n, groups = x
        out = None
        for g in groups:
            blank = torch.zeros(g.mask.shape, dtype=torch.long, device=g.mask.device)
            hidden = stack.head(overrides, g.x, {"input_ids": blank, "attention_mask": g.mask.long()})
            pooled = embedder.pool(hidden.last_hidden_state, g.mask)
            if out is None:
                out = pooled.new_empty((n, pooled.shape[1]))
            out[g.rows] = pooled
        return out

    return _stages(stack, embed, each, head)


# ------------------------------------------------------------------------------------------------------ entry point

@torch.inference_mode()
def stage_runnable(module: nn.Module, kind: str, canonical: dict[str, str], probe: torch.Tensor,
                   n_layers: int | None) -> list[Stage]:
    """Stages for `module` (a models.hf wrapper whose `.model` is the transformers model) of this kind, checked on
    `probe` (a small input) against the plain forward. `ModelDoesNotRun` when the plain forward fails on the probe;
    `NotStageable` saying why when it runs but not in stages (the layers are then left as they were)."""
    model = module.model
    try:
        path, layers = find_layers(model, n_layers)
    except NotStageable:
        path, layers = "", None
    returns, plain = _plain_run(module, layers, probe)
    if layers is None:
        raise NotStageable("no list of layers found")
    if returns is None:
        raise NotStageable("the layers are not called once each, in order, returning their hidden states first")
    stack = Stack(model, layers, path, canonical, "model", returns)
    try:
        if kind == "causal_lm":
            stages = causal_lm_stages(stack)
        elif kind == "image_classifier":
            stages = image_classifier_stages(stack, tuple(probe.shape[1:]))
        elif kind == "encoder":
            stages = encoder_stages(stack, module)
        else:
            raise NotStageable(f"no stages for kind {kind!r}")
        with recording() as embed_seen:
            x = stages[0].run({}, probe)
        for stage in stages[1:-1]:
            x = stage.run({}, x)
        with recording() as head_seen:
            staged = stages[-1].run({}, x)
        stack.assign_params(embed_seen, head_seen)
        stages[0] = Stage("embedding", stack.embed_params, stages[0].run)
        stages[-1] = Stage("head", stack.head_params, stages[-1].run)
        if staged.shape != plain.shape or not torch.allclose(staged, plain, rtol=1e-4, atol=1e-5):
            raise NotStageable("the staged forward differs from the plain one on a probe input")
    except Exception:
        _uninstall(layers)
        raise
    return stages
