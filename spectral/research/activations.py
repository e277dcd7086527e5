"""Where a model reads a matrix (`module_uses`: the input and output uses of a tied embedding) and the second moments
of the activations its linear uses multiply (`collect_input_moments`), for the tying, overlap and whitened views."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from models.contract import swap_lock
from spectral.research.common import Progress, blas_single_thread


@dataclass(frozen=True)
class Use:
    """One place the module reads a matrix: the submodule holding its parameter."""

    path: str  # submodule path ("tok_emb", "lm_head", "blocks.0.attn.c_attn")
    alias: str  # the parameter's full name under that submodule ("lm_head.weight")
    kind: str  # "lookup" (nn.Embedding: reads rows by index) or "linear" (multiplies an input activation)
    stage: int | None  # index of the runnable's stage that runs this submodule (None without stages)
    role: str  # "input" (first use in forward order), "output" (last use) or "only"

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "role": self.role}


def module_uses(runnable, info) -> list[Use]:
    """The submodules that hold the parameter of a matrix, in forward order (stage order, then registration order).

    A matrix read at two places (a tied embedding and LM head) has an "input" and an "output" use."""
    refs = runnable.params_for([info.name, *info.tied_with])
    if not refs:
        return []
    target = runnable.parameter(refs[0].name)
    found = []
    for path, sub in runnable.module.named_modules(remove_duplicate=False):
        for local, p in sub.named_parameters(recurse=False, remove_duplicate=False):
            if p is target:
                alias = f"{path}.{local}" if path else local
                kind = "lookup" if isinstance(sub, torch.nn.Embedding) else "linear"
                stage = _stage_of(runnable, path)
                found.append((path, alias, kind, stage))
    seen, unique = set(), []
    for item in found:
        if item[0] not in seen:
            seen.add(item[0])
            unique.append(item)
    unique.sort(key=lambda u: (u[3] if u[3] is not None else 0, u[2] == "linear"))
    uses = []
    for i, (path, alias, kind, stage) in enumerate(unique):
        role = "only" if len(unique) == 1 else ("input" if i == 0 else "output" if i == len(unique) - 1 else "middle")
        uses.append(Use(path, alias, kind, stage, role))
    return uses


def _stage_of(runnable, path: str) -> int | None:
    """Which stage runs submodule `path`: the stage named by a prefix of it, or, for the standard GPT stages, the
    embedding/head stages by the parameters they read."""
    if not runnable.stages:
        return None
    for i, stage in enumerate(runnable.stages):
        if path == stage.name or path.startswith(stage.name + "."):
            return i
    sub = runnable.module.get_submodule(path)
    ids = {id(p) for p in sub.parameters(recurse=True)}
    canonical = dict(runnable.module.named_parameters())
    matches = [i for i, stage in enumerate(runnable.stages)
               if any(id(canonical[n]) in ids for n in stage.params if n in canonical)]
    if len(matches) == 1:
        return matches[0]
    # a tied parameter is read by several stages: the submodule's own non-shared parameters decide, else its
    # kind: lookups are the first stage that reads it, linear maps the last
    if matches:
        return matches[0] if isinstance(sub, torch.nn.Embedding) else matches[-1]
    return None


# ----------------------------------------------------------------------------------------- activation statistics

@dataclass
class ActivationMoments:
    """Uncentred second moment C = (1/T) Σ_t x_t x_tᵀ of the inputs x ∈ R^n of a matrix's linear uses (RMT.md §7)."""

    name: str
    sum_xxT: np.ndarray  # (n, n) float64, Σ_t x_t x_tᵀ
    count: int  # T: activation vectors summed
    uses: list[str] = field(default_factory=list)  # submodule paths whose inputs were collected

    @property
    def covariance(self) -> np.ndarray:
        return self.sum_xxT / max(self.count, 1)


@torch.inference_mode()
def collect_input_moments(runnable, workspace, names: Iterable[str], input_ids: torch.Tensor, *,
                          batch_size: int = 8, progress: Progress | None = None
                          ) -> tuple[dict[str, ActivationMoments], dict[str, str]]:
    """Input-activation second moments of the linear uses of each matrix, from forward hooks on the untouched model.

    A matrix of analysed shape (rows, cols) is fed activations x ∈ R^cols wherever a submodule holding its parameter
    multiplies them (nn.Linear, Hugging Face Conv1D); embedding lookups read rows by index and contribute nothing.
    Returns (moments by name, reason by name for the matrices without any linear use). The hooks are removed before
    returning; run this while no other thread runs the same module."""
    names = list(names)
    moments: dict[str, ActivationMoments] = {}
    skipped: dict[str, str] = {}
    handles = []

    def hook_for(acc: ActivationMoments, cols: int):
        def hook(_module, args, _output):
            if not args or not torch.is_tensor(args[0]) or not torch.is_floating_point(args[0]):
                return
            x = args[0]
            if x.shape[-1] != cols:
                return
            x = x.reshape(-1, cols).detach().to(torch.float64).numpy()
            acc.sum_xxT += x.T @ x  # numpy: one BLAS thread (spectral/__init__.py), no pool contention
            acc.count += x.shape[0]
        return hook

    try:
        for name in names:
            info = workspace.info(name)
            linear = [u for u in module_uses(runnable, info) if u.kind == "linear"]
            if not linear:
                skipped[info.name] = "no linear use (an embedding lookup reads rows by index: no input activations)"
                continue
            cols = info.shape[1]
            acc = ActivationMoments(info.name, np.zeros((cols, cols)), 0,
                                    [u.path for u in linear])
            moments[info.name] = acc
            for use in linear:
                sub = runnable.module.get_submodule(use.path)
                handles.append(sub.register_forward_hook(hook_for(acc, cols)))
        n = input_ids.shape[0]
        with blas_single_thread():
            for a in range(0, n, batch_size):
                if progress:
                    progress(a, n, "activations")
                with swap_lock(runnable.module):  # the plain forward: staged heads may re-run early modules on blanks
                    runnable.module(input_ids[a:a + batch_size])
        if progress:
            progress(n, n, "")
    finally:
        for h in handles:
            h.remove()
    for name, acc in list(moments.items()):
        if acc.count == 0:
            del moments[name]
            skipped[name] = "its linear uses saw no input of matching width during the forward pass"
    return moments, skipped
