"""What-if cuts: strategies turn an analysis into a `Plan` (one `Cut` per matrix); a `Pruner` applies plans.

Strategies (issue 4, item 1; DESIGN.md `prune`):

| strategy  | value (default)        | kept rank k of each matrix in scope                                          |
|-----------|------------------------|------------------------------------------------------------------------------|
| `none`    | -                      | all (with a precision: quantisation alone)                                   |
| `mp`      | z threshold (2.0234)   | #{i : z_i > value}, z_i the MP z-scores of RMT.md §2.4                       |
| `energy`  | fraction p (0.999)     | energy rank r_p = min{k : Σ_{i≤k} s_i² ≥ p Σ s_i²} (RMT.md §7)               |
| `rank`    | fraction f (0.5)       | ceil(f · min(m, n))                                                          |
| `optimal` | -                      | Gavish-Donoho hard-threshold rank (RMT.md §5)                                |
| `band`    | decile d (0)           | all but the singular values of decile d (0 = the largest tenth) removed      |
| `rank1`   | -                      | 1: the matrix replaced by its rank-1 part (crystallization study)            |
| `random`  | seed (0)               | the matrix replaced by Gaussian noise of the same Frobenius norm             |
| `zero`    | -                      | 0: the matrix replaced by zeros                                              |

Precision (fp32 = unchanged, fp16, bf16, int8 symmetric per output channel) applies to the matrices in scope after
the cut. Scopes: all, attention (roles attn_*), mlp (roles mlp_*), embedding (embedding and head). Per-matrix
overrides give any matrix its own strategy, in scope or not. A tied matrix is one entry, cut once, and every name
it has gets the same cut values.

Applying a plan (`Pruner.apply`) rebuilds only the matrices whose cut changed since the previous plan, from the
truncation factors (singular values and the short side's singular vectors, spectral/factors.py) that
`Workspace.truncation` computes lazily (only for matrices a plan truncates), into buffers owned by the
pruner: cached originals are never written. A truncation to rank k whose factors cost less than the dense matrix
and half the projection below (k ≤ M/2, M the short side: `cheaper_factorised`) is not rebuilt at all: the pruner
keeps its factors and hands the model a `LowRankWeight`, which runs as two thin matmuls, so a heavily cut model
evaluates faster than the untouched one (spectral/lowrank.py). Any other truncation (or band cut) of a plain matrix is a `ProjectedWeight`: the model's own
untouched weight projected onto its kept singular directions or off its removed ones (whichever are fewer), read
through columns of the factors' Q. It holds nothing beyond what the workspace and the model hold already, and a
slider move only re-slices Q. Cuts the model cannot read implicitly (a precision, noise, zeros, or a matrix stored
with more than two dimensions, such as a convolution kernel) are dense buffers; a truncation there is built the
cheapest of three exact ways: from the head
(cost ∝ k), as W minus the tail (∝ r − k), or from the previous W_k' by adding or subtracting the components between
k and k' (∝ |k − k'|, what a slider move needs); the incremental route is re-based by a full rebuild every
`MAX_INCREMENTS` moves so float error cannot accumulate.
"""
from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import save, save_file

from models.registry import gpt_metadata
from spectral.analysis import Settings, factorised_params
from spectral.factors import HeldComponents
from spectral.lowrank import ImplicitWeight, LowRankWeight, ProjectedWeight, cheaper_factorised, most_factorised
from spectral.matrices import to_analysed, to_stored
from spectral.metrics import energy_rank

STRATEGIES = ("none", "mp", "energy", "rank", "optimal", "band", "rank1", "random", "zero")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
SCOPES = ("all", "attention", "mlp", "embedding")
DEFAULT_VALUES = {"mp": 2.0234, "energy": 0.999, "rank": 0.5, "band": 0, "random": 0}
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}
INT8_LEVELS = 127  # symmetric int8: q ∈ [−127, 127]
MAX_INCREMENTS = 32  # incremental rank changes before a matrix is rebuilt from scratch


class PlanError(ValueError):
    """A strategy, value, scope, precision or override that cannot be used; the message says which and why."""


# ---------------------------------------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class Strategy:
    """A strategy with its value and the precision applied after the cut."""

    name: str = "none"
    value: float | None = None  # None: the strategy's default (DEFAULT_VALUES), or no value at all
    precision: str = "fp32"

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise PlanError(f"unknown strategy {self.name!r}; choose one of {', '.join(STRATEGIES)}")
        if self.precision not in PRECISIONS:
            raise PlanError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        value = self.value
        if self.name not in DEFAULT_VALUES:
            value = None
        elif value is None:
            value = DEFAULT_VALUES[self.name]
        else:
            value = float(value)
            if not math.isfinite(value):
                raise PlanError(f"{self.name}: value must be a finite number, got {value}")
            if self.name == "energy" and not 0.0 < value <= 1.0:
                raise PlanError(f"energy: the kept fraction of energy must be in (0, 1], got {value:g}")
            if self.name == "rank" and not 0.0 <= value <= 1.0:
                raise PlanError(f"rank: the kept fraction of the rank must be in [0, 1], got {value:g}")
            if self.name == "band" and (value != int(value) or not 0 <= value <= 9):
                raise PlanError(f"band: the removed decile must be an integer 0..9 (0 = largest), got {value:g}")
            if self.name == "random" and (value != int(value) or value < 0):
                raise PlanError(f"random: the seed must be a non-negative integer, got {value:g}")
        object.__setattr__(self, "value", value)


@dataclass(frozen=True)
class Cut:
    """How one matrix is changed. The identity cut (the default) leaves it as it is."""

    kept_rank: int | None = None  # keep the top kept_rank singular components (None: all); 0 = zeros
    removed: tuple[int, int] | None = None  # singular values [start, stop) removed (a spectrum band)
    random_seed: int | None = None  # replaced by seeded Gaussian noise of the same Frobenius norm
    precision: str = "fp32"  # storage precision after the cut

    @property
    def is_identity(self) -> bool:
        return self.kept_rank is None and self.removed is None and self.random_seed is None \
            and self.precision == "fp32"

    @property
    def needs_factors(self) -> bool:
        return (self.kept_rank is not None and self.kept_rank > 0) or self.removed is not None


IDENTITY = Cut()


@dataclass(frozen=True)
class Plan:
    """One `Cut` per matrix (by canonical name) and how it was chosen."""

    strategy: Strategy
    scope: str
    cuts: Mapping[str, Cut]
    overrides: Mapping[str, Strategy] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def cut(self, name: str) -> Cut:
        return self.cuts.get(name, IDENTITY)


def in_scope(role: str, scope: str) -> bool:
    """Whether a matrix of this role belongs to a scope (attention = attn_*, mlp = mlp_*, embedding = embedding
    and head: the vocabulary matrices)."""
    if scope == "all":
        return True
    if scope == "attention":
        return role.startswith("attn")
    if scope == "mlp":
        return role.startswith("mlp")
    if scope == "embedding":
        return role in ("embedding", "head")
    raise PlanError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")


def band_bounds(decile: int, rank: int) -> tuple[int, int]:
    """Indices [start, stop) of decile d of `rank` singular values sorted descending (d = 0: the largest tenth)."""
    return (decile * rank) // 10, ((decile + 1) * rank) // 10


def make_plan(workspace, strategy: Strategy | str = "none", value: float | None = None, *, scope: str = "all",
              precision: str | None = None, overrides: Mapping[str, Strategy] | None = None,
              settings: Settings = Settings()) -> Plan:
    """The plan of a strategy over the matrices in scope, plus per-matrix overrides (which ignore the scope).

    `mp` and `optimal` read the analysis at `settings` (cached in the workspace: no SVD is recomputed); `energy`
    reads the cached spectra; `rank`, `band` and the replacements need only shapes."""
    if not isinstance(strategy, Strategy):
        strategy = Strategy(strategy, value, precision or "fp32")
    elif precision is not None and precision != strategy.precision:
        strategy = Strategy(strategy.name, strategy.value, precision)
    in_scope("", scope)  # validates the scope
    resolved: dict[str, Strategy] = {}
    for name, override in (overrides or {}).items():
        try:
            canonical = workspace.info(name).name
        except KeyError:
            raise PlanError(f"override names {name!r}, which is not a weight matrix of this checkpoint") from None
        resolved[canonical] = override if isinstance(override, Strategy) else Strategy(*override)

    needed = {s.name for s in [strategy, *resolved.values()]}
    analysis = workspace.analyze(settings) if needed & {"mp", "optimal"} else None
    spectra = workspace.spectra() if "energy" in needed else None
    skipped = {item["name"] for item in getattr(workspace, "skipped", [])}
    cuts: dict[str, Cut] = {}
    warnings: list[str] = []
    for info in workspace.matrices:
        chosen = resolved.get(info.name)
        if chosen is None:
            if not in_scope(info.role, scope):
                continue
            chosen = strategy
        if info.name in skipped:
            if chosen.name != "none" or chosen.precision != "fp32":
                warnings.append(f"{info.name}: not cut (non-finite values)")
            continue
        cut = _cut_for(info, chosen, analysis, spectra)
        if not cut.is_identity:
            cuts[info.name] = cut
    return Plan(strategy, scope, cuts, resolved, tuple(warnings))


def _cut_for(info, strategy: Strategy, analysis, spectra) -> Cut:
    rank = min(info.shape)
    name, value = strategy.name, strategy.value
    kept, removed, seed = None, None, None
    if name == "mp":
        z = np.asarray(analysis.row(info.name).z_scores)
        kept = int(np.count_nonzero(z > value))
    elif name == "energy":
        kept = int(energy_rank(spectra[info.name].singular_values, value))
    elif name == "rank":
        kept = min(rank, math.ceil(value * rank - 1e-9))
    elif name == "optimal":
        kept = int(analysis.row(info.name).n_optimal)
    elif name == "band":
        start, stop = band_bounds(int(value), rank)
        removed = (start, stop) if stop > start else None
    elif name == "rank1":
        kept = min(1, rank)
    elif name == "zero":
        kept = 0
    elif name == "random":
        seed = int(value)
    if kept is not None and kept >= rank:
        kept = None  # keeping every component is no cut
    return Cut(kept_rank=kept, removed=removed, random_seed=seed, precision=strategy.precision)


# ------------------------------------------------------------------------------------------------------- numerics

def low_rank(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> torch.Tensor:
    """W_k = (U[:, :k] · S[:k]) @ Vh[:k], the best rank-k approximation (Eckart-Young; RMT.md §6.6)."""
    return (U[:, :k] * S[:k]) @ Vh[:k]


def quantize(w: torch.Tensor, precision: str) -> torch.Tensor:
    """w rounded to `precision` and back to float32 (what a forward pass at that storage precision sees).

    int8 is symmetric per output channel (row): scale_r = max_j |w_rj| / 127, q = round(w / scale_r) clipped to
    ±127, so |w − q·scale_r| ≤ scale_r / 2 elementwise."""
    if precision == "fp32":
        return w.to(torch.float32)
    if precision == "fp16":
        return w.to(torch.float16).to(torch.float32)
    if precision == "bf16":
        return w.to(torch.bfloat16).to(torch.float32)
    if precision == "int8":
        return quantize_int8_(w.to(torch.float32).clone())
    raise PlanError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-row scales max_j |w_rj| / 127 (rows of all zeros get scale 1, harmlessly)."""
    scale = w.abs().amax(dim=1, keepdim=True) / INT8_LEVELS
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int8_(w: torch.Tensor) -> torch.Tensor:
    """In-place symmetric per-row int8 round trip of a float32 2-D tensor; returns it."""
    scale = int8_scales(w)
    return w.div_(scale).round_().clamp_(-INT8_LEVELS, INT8_LEVELS).mul_(scale)


def _quantize_(buf: torch.Tensor, precision: str) -> None:
    if precision == "fp32":
        return
    if precision == "int8":
        quantize_int8_(buf)
    else:
        buf.copy_(quantize(buf, precision))


def relative_error_from_spectrum(S: torch.Tensor, removed: slice) -> float:
    """‖W − W'‖_F / ‖W‖_F when W' drops the singular components `removed`: sqrt(Σ_removed s² / Σ s²) (RMT.md §6.6)."""
    e = S.to(torch.float64) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(min(float(e[removed].sum()) / total, 1.0))


def stored_params(shape, kept_rank: int | None) -> int:
    """Parameters stored: dense m·n, or k·(m+n) for a rank-k factorisation when that is smaller (DESIGN.md)."""
    m, n = shape
    return m * n if kept_rank is None else factorised_params(shape, kept_rank)


def stored_bytes(shape, kept_rank: int | None, element_bytes: int, precision: str) -> int:
    """Bytes of the stored matrix: params × element size, plus one float32 scale per stored row for int8."""
    m, n = shape
    params = stored_params(shape, kept_rank)
    if precision == "fp32":
        return params * element_bytes
    size = min(element_bytes, PRECISION_BYTES[precision])
    scales = 0
    if precision == "int8":
        factorised = kept_rank is not None and kept_rank * (m + n) < m * n
        scales = 4 * ((m + kept_rank) if factorised else m)
    return params * size + scales


def _random_like(name: str, seed: int, shape, norm: float) -> torch.Tensor:
    """Gaussian noise of Frobenius norm `norm`, seeded by (seed, matrix name) so every matrix gets its own draw."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    r = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    rn = float(torch.linalg.vector_norm(r))
    return r.mul_(norm / rn) if rn > 0 else r


# -------------------------------------------------------------------------------------------------------- results

@dataclass
class MatrixResult:
    """What a plan did to one matrix (DESIGN.md `matrices`: name, rank, kept_rank, relative_error)."""

    name: str
    role: str
    shape: list[int]
    tied_with: list[str]
    rank: int  # min(shape): the full rank
    kept_rank: int  # singular components of the original kept (rank when uncut; 0 for zeros and random)
    relative_error: float  # ‖W − W'‖_F / ‖W‖_F
    params_before: int
    params_after: int
    precision: str
    cut: str  # "none", "truncate", "band", "random", "zero", "precision"

    def to_dict(self) -> dict:
        return {"name": self.name, "rank": self.rank, "kept_rank": self.kept_rank,
                "relative_error": self.relative_error, "role": self.role, "shape": self.shape,
                "tied_with": self.tied_with, "params_before": self.params_before, "params_after": self.params_after,
                "precision": self.precision, "cut": self.cut}


@dataclass
class PruneResult:
    """The whole-model effect of a plan on storage, and per matrix."""

    matrices: list[MatrixResult]
    params_before: int  # every parameter of the checkpoint, tied ones once
    params_after: int
    bytes_before: int
    bytes_after: int
    rebuilt: list[str]  # matrices rebuilt by this apply (the others were unchanged since the previous plan)
    seconds: float

    @property
    def compression(self) -> float:
        """Storage before / after, in bytes (so precision counts; equals params_before / params_after at fp32)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")


# --------------------------------------------------------------------------------------------------------- pruner

@dataclass
class _Working:
    """The pruner's copy of one cut matrix (analysed layout, float32): a dense buffer, or, for a truncation, an
    implicit weight (spectral/lowrank.py): its factors, or the model's weight projected onto its kept components or
    off its removed ones."""

    buffer: torch.Tensor | None = None  # allocated on the first dense cut
    implicit: ImplicitWeight | None = None  # while the cut is a truncation held without a dense buffer
    cut: Cut = IDENTITY
    exact_rank: int | None = None  # the buffer holds exactly the rank-k truncation (no quantisation), k = this
    increments: int = 0
    active: bool = False
    relative_error: float = 0.0
    held: HeldComponents | None = None  # the long side of a factorised cut, kept across moves

    def dense(self) -> torch.Tensor:
        """The cut matrix as one dense tensor (the buffer, or the implicit weight's product)."""
        return self.buffer if self.implicit is None else self.implicit.dense()


class Pruner:
    """One working copy of the cut matrices of a checkpoint; `apply(plan)` updates it, `overrides()` hands it out.

    Not thread-safe: one pruner per user session. The workspace (and its cached factors) and the runnable model are
    shared and only read."""

    def __init__(self, workspace, runnable=None):
        self.workspace = workspace
        self.runnable = runnable
        self._working: dict[str, _Working] = {}
        self._originals: dict[str, torch.Tensor] = {}
        self._overrides: dict[str, torch.Tensor] = {}
        self.rebuild_count = 0  # matrices rebuilt over the pruner's life (tests count them)
        self.last_rebuilt: list[str] = []
        self.plan: Plan | None = None
        self._base = self._base_counts()

    # ------------------------------------------------------------------------------------------- the public face

    def apply(self, plan: Plan) -> PruneResult:
        """Bring the working copy to `plan`, rebuilding only matrices whose cut changed; returns the storage report."""
        start = time.perf_counter()
        rebuilt = []
        for info in self.workspace.matrices:
            cut = plan.cut(info.name)
            state = self._working.get(info.name)
            current = state.cut if state is not None and state.active else IDENTITY
            if cut == current:
                continue
            if cut.is_identity:
                self._deactivate(state)
            else:
                self._rebuild(info, cut)
                rebuilt.append(info.name)
        self.plan = plan
        self.last_rebuilt = rebuilt
        self.rebuild_count += len(rebuilt)
        self._overrides = self._module_overrides()
        return self._report(rebuilt, time.perf_counter() - start)

    def overrides(self) -> dict[str, torch.Tensor]:
        """Module parameter name -> cut tensor, for every active cut (needs a runnable); pass to `Runnable.forward`."""
        return dict(self._overrides)

    def matrix(self, name: str) -> torch.Tensor:
        """The matrix as the current plan leaves it (analysed layout, float32): the working buffer or the original.
        Read-only: it may be a buffer the pruner will overwrite at the next `apply`."""
        info = self.workspace.info(name)
        state = self._working.get(info.name)
        if state is not None and state.active:
            return state.dense()
        return self._original(info)

    def cut_tensors(self) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor name whose values the plan changes -> its new values in the stored layout and
        shape (float32), tied names included. What `--save` writes over the original tensors."""
        return {name: stored for info, stored in self._active_stored() for name in (info.name, *info.tied_with)}

    def _active_stored(self, factorised: bool = False):
        """(matrix, its cut values in the stored layout) for every matrix the current plan changes; with
        `factorised`, truncations held implicitly come as their `ImplicitWeight` (spectral/lowrank.py)."""
        for info in self.workspace.matrices:
            state = self._working.get(info.name)
            if state is None or not state.active:
                continue
            if factorised and state.implicit is not None:
                yield info, state.implicit.transposed() if info.transposed else state.implicit
            else:
                yield info, to_stored(state.dense(), info)

    # -------------------------------------------------------------------------------------------------- rebuild

    def _original(self, info) -> torch.Tensor:
        """The untouched matrix, analysed layout, float32, on the CPU (where the factors and the pruner's work are;
        the evaluator moves cut matrices to the model's device), without copying when the runnable holds it there."""
        if info.name in self._originals:
            return self._originals[info.name]
        w = None
        if self.runnable is not None:
            refs = self.runnable.params_for([info.name, *info.tied_with])
            if refs and self.runnable.parameter(refs[0].name).device.type == "cpu":
                param = self.runnable.parameter(refs[0].name)
                stored = param.T if refs[0].transposed else param
                w = to_analysed(stored, info)
        if w is None:
            w = self.workspace.weight(info.name).to(torch.float32)
        self._originals[info.name] = w
        return w

    def _rebuild(self, info, cut: Cut) -> None:
        W = self._original(info)
        state = self._working.setdefault(info.name, _Working())
        k = cut.kept_rank
        shape = tuple(info.shape)
        removed = (k, min(info.shape)) if k is not None and k > 0 else cut.removed
        plain = cut.precision == "fp32" and len(info.source_shape) == 2 and cut.random_seed is None
        if plain and k is not None and cheaper_factorised(shape, k):
            f = self._held(state, info, W).factors
            # one side a view of what is held, the other a view of Q
            state.implicit = LowRankWeight(*state.held.components(0, k, most_factorised(shape)))
            self._drop_buffer(state)
            state.cut, state.active = cut, True
            state.relative_error = relative_error_from_spectrum(f.S, slice(k, None))
            return
        if plain and removed is not None:
            f = self.workspace.truncation(info.name)
            lo, hi = removed
            keep = hi == min(shape) and lo < hi - lo  # onto the kept head when it is the smaller set
            q = f.Q[:, :lo] if keep else f.Q[:, lo:hi]
            state.implicit, state.held = ProjectedWeight(W, q, "left" if f.left else "right", keep), None
            self._drop_buffer(state)
            state.cut, state.active = cut, True
            state.relative_error = relative_error_from_spectrum(f.S, slice(lo, hi))
            return
        state.implicit, state.held = None, None
        if state.buffer is None:
            state.buffer = torch.empty(W.shape, dtype=torch.float32)
        buf = state.buffer
        previous_exact = state.exact_rank  # the buffer is left alone while inactive, so it still holds this
        error = None
        exact = None
        if cut.random_seed is not None:
            norm = float(torch.linalg.vector_norm(W))
            buf.copy_(_random_like(info.name, cut.random_seed, W.shape, norm))
        elif k is not None:
            f = self.workspace.truncation(info.name) if k > 0 else None
            if k == 0:
                buf.zero_()
                error = 1.0 if float(torch.linalg.vector_norm(W)) > 0 else 0.0
            else:
                r = f.rank
                error = relative_error_from_spectrum(f.S, slice(k, None))
                if previous_exact is not None and state.increments < MAX_INCREMENTS \
                        and abs(k - previous_exact) < min(k, r - k):
                    lo, hi = sorted((k, previous_exact))
                    buf.addmm_(*f.components(W, lo, hi), alpha=1.0 if k > previous_exact else -1.0)
                    state.increments += 1
                elif k <= r - k:
                    torch.mm(*f.components(W, 0, k), out=buf)
                    state.increments = 0
                else:
                    torch.addmm(W, *f.components(W, k, r), alpha=-1.0, out=buf)
                    state.increments = 0
            exact = k
        elif cut.removed is not None:
            f = self.workspace.truncation(info.name)
            lo, hi = cut.removed
            torch.addmm(W, *f.components(W, lo, hi), alpha=-1.0, out=buf)
            error = relative_error_from_spectrum(f.S, slice(lo, hi))
        else:
            buf.copy_(W)
            error = 0.0
        if cut.precision != "fp32":
            _quantize_(buf, cut.precision)
            exact, error = None, None
        if error is None:
            norm = float(torch.linalg.vector_norm(W))
            error = float(torch.linalg.vector_norm(W - buf)) / norm if norm > 0 else 0.0
        state.cut, state.exact_rank, state.active, state.relative_error = cut, exact, True, error

    def _held(self, state: _Working, info, W: torch.Tensor) -> HeldComponents:
        """The matrix's held components (made on its first factorised cut)."""
        if state.held is None:
            state.held = HeldComponents(self.workspace.truncation(info.name), W)
        return state.held

    @staticmethod
    def _deactivate(state: _Working) -> None:
        """The matrix is back to its original: its held components go, with the factors that view them (they would
        keep that memory alive); a dense buffer stays as it is, so a later dense cut can resume from `exact_rank`."""
        state.active, state.implicit, state.held = False, None, None

    @staticmethod
    def _drop_buffer(state: _Working) -> None:
        """An implicit cut needs no dense buffer: free it (the memory bound of what-ifs counts it)."""
        state.buffer, state.exact_rank, state.increments = None, None, 0

    def _module_overrides(self) -> dict[str, torch.Tensor]:
        if self.runnable is None:
            return {}
        out = {}
        for info, stored in self._active_stored(factorised=True):
            for ref in self.runnable.params_for([info.name, *info.tied_with]):
                if not ref.transposed:
                    out[ref.name] = stored
                else:
                    out[ref.name] = stored.transposed() if isinstance(stored, ImplicitWeight) else stored.T
        return out

    # --------------------------------------------------------------------------------------------------- report

    def _base_counts(self) -> tuple[int, int, dict[str, int]]:
        """(params, bytes) of the whole checkpoint, tied tensors once, and each matrix's element size."""
        ckpt = self.workspace.checkpoint
        aliases = {n for group in ckpt.tied_groups for n in group[1:]}
        params = bytes_ = 0
        for name, shape in ckpt.shapes.items():
            if name in aliases:
                continue
            n = int(np.prod(shape)) if len(shape) else 1
            params += n
            bytes_ += n * DTYPE_BYTES.get(ckpt.dtypes.get(name, "float32"), 4)
        element = {info.name: DTYPE_BYTES.get(ckpt.dtypes.get(info.name, "float32"), 4)
                   for info in self.workspace.matrices}
        return params, bytes_, element

    def _report(self, rebuilt: list[str], seconds: float) -> PruneResult:
        params_before, bytes_before, element = self._base
        params_after, bytes_after = params_before, bytes_before
        rows = []
        for info in self.workspace.matrices:
            shape = tuple(info.shape)
            rank = min(shape)
            dense = shape[0] * shape[1]
            state = self._working.get(info.name)
            if state is None or not state.active:
                rows.append(MatrixResult(info.name, info.role, list(shape), list(info.tied_with), rank, rank, 0.0,
                                         dense, dense, "fp32", "none"))
                continue
            cut = state.cut
            if cut.random_seed is not None:
                kept, stored_rank, kind = 0, None, "random"
            elif cut.kept_rank is not None:
                kept, stored_rank = cut.kept_rank, cut.kept_rank
                kind = "zero" if kept == 0 else "truncate"
            elif cut.removed is not None:
                kept = rank - (cut.removed[1] - cut.removed[0])
                stored_rank, kind = kept, "band"
            else:
                kept, stored_rank, kind = rank, None, "precision"
            after = stored_params(shape, stored_rank)
            params_after += after - dense
            bytes_after += stored_bytes(shape, stored_rank, element[info.name], cut.precision) \
                - dense * element[info.name]
            rows.append(MatrixResult(info.name, info.role, list(shape), list(info.tied_with), rank, kept,
                                     state.relative_error, dense, after, cut.precision, kind))
        return PruneResult(rows, params_before, params_after, bytes_before, bytes_after, rebuilt, seconds)


# ------------------------------------------------------------------------------------------------------- saving

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pruned_state(pruner: Pruner) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint with the current plan's cuts applied, in stored names, layouts and dtypes.

    Cut matrices are written dense (the loader and the runnable models read dense weights; the parameter counts of
    `PruneResult` describe a factorised storage). fp16/bf16 cuts are stored in that dtype; int8 cuts are stored as
    their dequantised values in the original dtype. Tied names each get their own copy (safetensors refuses shared
    memory), as the demo itself is saved."""
    ckpt = pruner.workspace.checkpoint
    cut = pruner.cut_tensors()
    precision = {}
    for info in pruner.workspace.matrices:
        state = pruner._working.get(info.name)
        if state is not None and state.active:
            for name in (info.name, *info.tied_with):
                precision[name] = state.cut.precision
    out = {}
    for name in ckpt.names():
        if name in cut:
            dtype = SAVE_DTYPES.get(precision[name], getattr(torch, ckpt.dtypes.get(name, "float32")))
            out[name] = cut[name].to(dtype).contiguous().clone()
        else:
            out[name] = ckpt.tensor(name).contiguous()
    return out


def pruned_metadata(pruner: Pruner, plan: Plan | None = None) -> dict[str, str]:
    """safetensors metadata: the original's, what the runnable needs to rebuild the model, the tied groups, and
    the plan that made the file."""
    ckpt = pruner.workspace.checkpoint
    meta = {str(k): str(v) for k, v in (ckpt.metadata or {}).items()}
    if pruner.runnable is not None:
        meta.update(gpt_metadata(pruner.runnable))
    if ckpt.config is not None:  # e.g. a Hugging Face config.json: the saved file rebuilds the same model
        meta.setdefault("config", json.dumps(ckpt.config))
    if ckpt.tied_groups:
        meta["tied"] = ";".join(",".join(group) for group in ckpt.tied_groups)
    plan = plan or pruner.plan
    if plan is not None:
        meta["spectra_prune"] = json.dumps({
            "source_sha256": ckpt.sha256, "strategy": plan.strategy.name, "value": plan.strategy.value,
            "scope": plan.scope, "precision": plan.strategy.precision,
            "overrides": {k: [v.name, v.value, v.precision] for k, v in plan.overrides.items()}})
    return meta


def save_pruned(pruner: Pruner, path=None) -> bytes | None:
    """Write the cut checkpoint as safetensors to `path` (returns None), or return its bytes when path is None
    (the dashboard's download button). `spectral.checkpoint.load_checkpoint` reads it back."""
    tensors, meta = pruned_state(pruner), pruned_metadata(pruner)
    if path is None:
        return save(tensors, metadata=meta)
    save_file(tensors, str(path), metadata=meta)
    return None
