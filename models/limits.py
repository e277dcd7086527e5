"""Sizes a config declares, checked against the tensors actually stored and against a memory budget before anything
is allocated (issue 17: a config.json saying `n_layer: 1e9` beside 2 MB of weights made the server allocate until
the machine died).

Three checks, in the order a build meets them:
1. `check_layer_count`: the config's layer count may not exceed `LAYER_REUSE` times the layers the tensor names hold
   (one more than the largest index in any name; ALBERT runs one stored layer 12 to 24 times), so a lying config
   cannot make the build, or a forward pass through shared layers, loop a billion times;
2. `module_count_limit`: while the model is built on the meta device (no storage), the number of modules created is
   bounded by the number of stored tensors, which catches any other count (experts, blocks) that a config inflates;
3. `check_memory`: the meta model's parameters and buffers, in float32, must fit the memory budget, and its buffers
   (which no stored tensor vouches for) may not exceed the weights by much.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterable

import torch
from torch import nn

from models.contract import NotRunnable

MODULES_PER_TENSOR = 32  # modules a build may create per stored tensor (norms, dropouts, activations, rotary, ...)
MODULE_SLACK = 1024  # plus this many, for parameter-free scaffolding
BUFFER_SLACK = 256 << 20  # buffers (causal masks, rotary tables) may take this much beyond the weights' size
BUDGET_FRACTION = 0.75  # of physical memory, when no budget is given
LAYER_REUSE = 64  # times a stored layer may be run (weight-shared stacks: ALBERT-xxlarge runs one layer 12 times)
_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def default_budget() -> int | None:
    """Bytes a built model may take: `BUDGET_FRACTION` of physical memory (None where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * BUDGET_FRACTION)
    except (ValueError, OSError, AttributeError):
        return None


def stored_layer_count(names: Iterable[str]) -> int:
    """One more than the largest integer path component of any tensor name (`model.layers.29.mlp...` -> 30): an
    upper bound on the length of any module list the stored tensors fill."""
    return 1 + max((int(m) for name in names for m in _INDEX.findall(name)), default=-1)


def check_layer_count(source: str, declared, names: Iterable[str], key: str = "num_hidden_layers") -> None:
    """`NotRunnable` unless `declared` (the config's layer count) is a non-negative integer the stored tensors can
    back: at most `LAYER_REUSE` runs of each stored layer (a model without numbered layers counts as one)."""
    if declared is None:
        return
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 0:
        raise NotRunnable(source, f"config.json says {key}={declared!r}: not a layer count")
    stored = stored_layer_count(names)
    if declared > LAYER_REUSE * max(stored, 1):
        raise NotRunnable(source, f"config.json says {key}={declared} but the weights hold {stored} "
                                  f"layer{'s' if stored != 1 else ''}; refused before building anything")


_COUNT = threading.local()


def _count_module(module, name, submodule):
    left = getattr(_COUNT, "left", None)
    if left is None:
        return
    if left <= 0:
        _COUNT.left = None  # once: the error unwinds through more registrations
        raise NotRunnable(_COUNT.source, f"the config builds more than {_COUNT.limit} modules for {_COUNT.tensors} "
                                         "stored tensors; refused before allocating anything")
    _COUNT.left = left - 1
    return


@contextlib.contextmanager
def module_count_limit(source: str, n_tensors: int):
    """Within the block, this thread may create at most `MODULES_PER_TENSOR * n_tensors + MODULE_SLACK` submodules;
    past that the build stops with `NotRunnable` (a config whose counts the stored tensors cannot back)."""
    _COUNT.limit = MODULES_PER_TENSOR * max(n_tensors, 0) + MODULE_SLACK
    _COUNT.left, _COUNT.source, _COUNT.tensors = _COUNT.limit, source, n_tensors
    handle = nn.modules.module.register_module_module_registration_hook(_count_module)
    try:
        yield
    finally:
        handle.remove()
        _COUNT.left = None


def _nbytes(t: torch.Tensor, float32: bool) -> int:
    size = 4 if float32 and t.is_floating_point() else t.element_size()
    return t.numel() * size


def check_memory(source: str, meta_model: nn.Module, budget: int | None) -> int:
    """Bytes the model will take once built in float32 (parameters + buffers, counted on the meta model, tied
    parameters once); `NotRunnable` when over `budget`, or when buffers exceed the weights by more than
    `BUFFER_SLACK`. Returns the byte count."""
    params = {id(p): p for p in meta_model.parameters()}
    param_bytes = sum(_nbytes(p, True) for p in params.values())
    buffers = [(n, b) for n, b in meta_model.named_buffers() if b is not None]
    buffer_bytes = sum(_nbytes(b, True) for _, b in buffers)
    if buffer_bytes > param_bytes + BUFFER_SLACK:
        name, largest = max(buffers, key=lambda nb: nb[1].numel())
        raise NotRunnable(source, f"the config implies {_mb(buffer_bytes)} of buffers (largest {name} "
                                  f"{list(largest.shape)}) beside {_mb(param_bytes)} of weights; refused")
    total = param_bytes + buffer_bytes
    if budget is not None and total > budget:
        raise NotRunnable(source, f"the model needs {_mb(total)} in float32, over the memory budget of "
                                  f"{_mb(budget)}; spectra only (the analysis reads one matrix at a time)")
    return total


def _mb(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"
