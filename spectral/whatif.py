"""The what-if session: one user's cut model against the untouched one. One slider move is one `run(choice)`.

A `WhatIfSession` holds this user's working copy of the cut matrices (a `Pruner`) and shares everything else with
other sessions on the same checkpoint through the `ModelRuntime` (spectral/runtime.py): the workspace's spectra and
SVD factors, the runnable model and the `Evaluator` of the chosen evaluation text. `run(choice, settings, progress)`
plans (spectral/pruning.py `make_plan`), computes only the SVD factors the plan needs (reporting progress), rebuilds
only the matrices whose cut changed, and evaluates against the reference outputs (spectral/evaluation.py).

The reference strategies (`REFERENCE`: the PhotonicGPT study's rows) are one list here, used by the Pruning and
Report pages, by the CLI (`prune --reference`) and by bench/demo_tables.py. `scan` is the sensitivity scan: one
matrix (or one role) cut at a time.
"""
from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from spectral.analysis import Settings
from spectral.evaluation import EvalBatch, EvalMetrics, Evaluator
from spectral.heap import release_freed_memory
from spectral.pruning import (
    DEFAULT_VALUES,
    Plan,
    Pruner,
    PruneResult,
    Strategy,
    in_scope,
    make_plan,
    save_pruned,
)
from spectral.runtime import BatchSpec, ModelRuntime

Progress = Callable[[int, int, str], None]
METRICS_CACHE = 64  # results remembered per session (a slider moved back to a value seen costs the rebuild only)

STRATEGY_LABELS = {
    "mp": "MP z-score (keep z > threshold)",
    "energy": "Energy (keep a fraction of Σs²)",
    "rank": "Rank fraction",
    "optimal": "Gavish-Donoho optimal threshold",
    "band": "Remove one decile of the spectrum",
    "rank1": "Replace by rank-1 part",
    "random": "Replace by random (same norm)",
    "zero": "Replace by zeros",
    "none": "No cut (precision only)",
}
SPECTRAL_STRATEGIES = frozenset({"mp", "optimal", "energy"})  # strategies whose cut reads the spectra
SCOPE_LABELS = {"all": "All matrices", "attention": "Attention", "mlp": "MLP", "embedding": "Embedding / head"}


@dataclass(frozen=True)
class Choice:
    """What the user chose: a strategy with its value, the scope, the precision, and per-matrix overrides
    ((matrix name, strategy, value) triples, which ignore the scope)."""

    strategy: str = "none"
    value: float | None = None
    scope: str = "all"
    precision: str = "fp32"
    overrides: tuple[tuple[str, str, float | None], ...] = ()

    @property
    def label(self) -> str:
        """'MP z > 2', 'energy 99.9%, int8, mlp', ... (the default value where none is given)."""
        v = self.value if self.value is not None else DEFAULT_VALUES.get(self.strategy)
        text = {"mp": f"MP z > {v:g}" if v is not None else "MP",
                "energy": f"energy {100 * v:g}%" if v is not None else "energy",
                "rank": f"rank {100 * v:g}%" if v is not None else "rank",
                "optimal": "Gavish-Donoho", "band": f"decile {int(v)} removed" if v is not None else "band",
                "rank1": "rank-1", "random": f"random (seed {int(v)})" if v is not None else "random",
                "zero": "zeros", "none": "no cut"}.get(self.strategy, self.strategy)
        if self.precision != "fp32":
            text = self.precision if self.strategy == "none" else f"{text}, {self.precision}"
        if self.scope != "all":
            text += f", {self.scope}"
        if self.overrides:
            text += f", {len(self.overrides)} override{'s' if len(self.overrides) > 1 else ''}"
        return text

    @property
    def reads_spectra(self) -> bool:
        """The plan reads singular values (MP, Gavish-Donoho, energy), of the chosen strategy or an override."""
        return bool({self.strategy, *(o[1] for o in self.overrides)} & SPECTRAL_STRATEGIES)

    def plan(self, workspace, settings: Settings = Settings()) -> Plan:
        """The `Plan` of this choice on a workspace (PlanError when a value, scope or override cannot be used)."""
        overrides = {name: Strategy(strategy, value, self.precision) for name, strategy, value in self.overrides}
        return make_plan(workspace, Strategy(self.strategy, self.value, self.precision), scope=self.scope,
                         overrides=overrides, settings=settings)


@dataclass(frozen=True)
class Reference:
    """One reference strategy: its label in figures, the choice, and the line it belongs to (None: a point)."""

    label: str
    short: str
    strategy: str
    value: float | None = None
    precision: str = "fp32"
    group: str | None = None

    def choice(self, scope: str = "all") -> Choice:
        return Choice(self.strategy, self.value, scope, self.precision)


REFERENCE = (  # the PhotonicGPT study's rows; one group is one line in the compression-vs-KL chart
    Reference("MP z>2", "MP z>2", "mp", 2.0234),
    Reference("Gavish-Donoho", "Gavish-Donoho", "optimal"),
    Reference("fp16", "fp16", "none", precision="fp16"),
    Reference("bf16", "bf16", "none", precision="bf16"),
    Reference("int8", "int8", "none", precision="int8"),
    Reference("energy 99.9%", "99.9%", "energy", 0.999, group="energy rank"),
    Reference("energy 99.5%", "99.5%", "energy", 0.995, group="energy rank"),
    Reference("energy 99%", "99%", "energy", 0.99, group="energy rank"),
    Reference("energy 98%", "98%", "energy", 0.98, group="energy rank"),
    Reference("energy 95%", "95%", "energy", 0.95, group="energy rank"),
)


@dataclass
class WhatIfResult:
    """One what-if: the plan, its storage effect and its output metrics (DESIGN.md `prune` JSON via `to_dict`)."""

    plan: Plan
    prune: PruneResult
    metrics: EvalMetrics
    batch: EvalBatch
    kind: str = "causal_lm"
    timings: dict = field(default_factory=dict)
    label: str = ""
    estimate: EvalMetrics | None = None  # the quick estimate on the fixed subset that preceded these numbers

    def to_dict(self) -> dict:
        s, m = self.plan.strategy, self.metrics
        return {
            "strategy": s.name, "value": s.value, "scope": self.plan.scope, "precision": s.precision,
            "agreement": m.agreement, "kl": m.kl,
            "perplexity_before": m.perplexity_before, "perplexity_after": m.perplexity_after,
            "params_before": self.prune.params_before, "params_after": self.prune.params_after,
            "compression": self.prune.compression,
            "eval": self.batch.to_dict(),
            "matrices": [r.to_dict() for r in self.prune.matrices],
            # additions beyond DESIGN.md's keys
            "label": self.label,
            "estimate": None if self.estimate is None else {
                "agreement": self.estimate.agreement, "agreement_se": self.estimate.agreement_se,
                "kl": self.estimate.kl, "kl_se": self.estimate.kl_se,
                "perplexity_after": self.estimate.perplexity_after, "perplexity_se": self.estimate.perplexity_se,
                "positions": self.estimate.positions, "seconds": self.estimate.seconds},
            "metric": "kl" if self.kind == "causal_lm" else "cosine",
            "cosine": m.cosine,
            "bytes_before": self.prune.bytes_before, "bytes_after": self.prune.bytes_after,
            "overrides": {name: {"strategy": o.name, "value": o.value, "precision": o.precision}
                          for name, o in self.plan.overrides.items()},
            "warnings": list(self.plan.warnings),
            "seconds": self.timings,
        }

    def point(self, label: str | None = None, short: str | None = None, group: str | None = None) -> dict:
        """This result as a point of the compression-vs-damage chart (spectral/figures.py `compression_vs_kl`)."""
        m = self.metrics
        return {"label": label or self.label, "short": short or label or self.label,
                "compression": self.prune.compression, "kl": m.kl, "agreement": m.agreement, "cosine": m.cosine,
                "params_after": self.prune.params_after, "group": group, "perplexity_after": m.perplexity_after}


class WhatIfSession:
    """One user's what-ifs on one checkpoint: its own working copy of the cut matrices, everything else shared.

    Not thread-safe (one per browser session or CLI run); forward passes take the runtime's lock, so sessions on the
    same checkpoint take turns on the shared model."""

    def __init__(self, runtime: ModelRuntime, spec: BatchSpec = BatchSpec(), *, evaluator: Evaluator | None = None):
        self.runtime = runtime
        self.workspace = runtime.workspace
        self.spec = spec
        self.evaluator = evaluator or runtime.evaluator(spec)
        self.runnable = self.evaluator.runnable
        self.generation = runtime.generation
        self.pruner = Pruner(self.workspace, self.runnable)
        self._metrics: OrderedDict[frozenset, EvalMetrics] = OrderedDict()  # by the plan's cuts
        self._reference: dict[tuple, list[dict]] = {}  # chart points by (scope, settings)
        self._scans: OrderedDict[tuple, list[dict]] = OrderedDict()  # scans by (choice, by, settings)

    @classmethod
    def open(cls, source, *, text: str | None = None, positions: int | None = None, seed: int = 0,
             hyperparameters: Mapping | None = None) -> WhatIfSession:
        """A session on a path, "demo", `Workspace` or `ModelRuntime` (NotRunnable when it cannot run)."""
        runtime = source if isinstance(source, ModelRuntime) else ModelRuntime.open(source,
                                                                                   hyperparameters=hyperparameters)
        spec = BatchSpec(text, positions or BatchSpec.positions, seed)
        return cls(runtime, spec)

    @property
    def kind(self) -> str:
        return self.runnable.kind

    @property
    def stale(self) -> bool:
        """The runtime's model was rebuilt (new hyperparameters) since this session was made."""
        return self.generation != self.runtime.generation

    # -------------------------------------------------------------------------------------------------- moves

    def run(self, choice: Choice, settings: Settings = Settings(), progress: Progress | None = None,
            on_estimate: Callable[[WhatIfResult], None] | None = None) -> WhatIfResult:
        """One slider move: plan, compute the SVD factors the plan needs, rebuild, evaluate. `progress(i, n, label)`
        reports the factors and then each evaluation chunk; `on_estimate` receives the quick estimate on the fixed
        subset (`Evaluator.estimate`) before the full batch runs, when there is one and the move is not cached."""
        t0 = time.perf_counter()
        if choice.reads_spectra:  # and it truncates: both from one eigendecomposition per matrix
            self.workspace.spectra_with_truncations(progress)
        plan = choice.plan(self.workspace, settings)
        result = self.run_plan(plan, progress=progress, on_estimate=on_estimate, plan_seconds=time.perf_counter() - t0,
                               label=choice.label)
        return result

    def run_plan(self, plan: Plan, *, progress: Progress | None = None,
                 on_estimate: Callable[[WhatIfResult], None] | None = None, plan_seconds: float = 0.0,
                 label: str = "") -> WhatIfResult:
        """A plan made elsewhere (research views build their own) on this session's working copy."""
        self.prepare(plan, progress)
        t0 = time.perf_counter()
        prune = self.pruner.apply(plan)
        t1 = time.perf_counter()
        key = frozenset(plan.cuts.items())
        metrics = self._metrics.get(key)
        timings = {"plan": plan_seconds, "rebuild": t1 - t0}
        estimate = None
        if metrics is None:
            overrides = self.pruner.overrides()
            if on_estimate is not None:
                with self.runtime.lock:
                    estimate = self.evaluator.estimate(overrides)
                if estimate is not None:
                    timings["estimate"] = estimate.seconds
                    on_estimate(WhatIfResult(plan, prune, estimate, self.evaluator.batch, self.kind,
                                             dict(timings, total=plan_seconds + time.perf_counter() - t0), label))
            with self.runtime.lock:
                metrics = self.evaluator.evaluate(overrides, progress)
            self._metrics[key] = metrics
            while len(self._metrics) > METRICS_CACHE:
                self._metrics.popitem(last=False)
        else:
            self._metrics.move_to_end(key)
        t2 = time.perf_counter()
        timings.update(evaluate=t2 - t1, total=plan_seconds + t2 - t0)
        release_freed_memory()  # what the rebuild and the evaluation freed (spectral/heap.py)
        return WhatIfResult(plan, prune, metrics, self.evaluator.batch, self.kind, timings, label, estimate)

    def prepare(self, plan: Plan, progress: Progress | None = None) -> None:
        """Compute (once, shared) the truncation factors of every matrix the plan truncates, reporting progress."""
        todo = [name for name, cut in plan.cuts.items()
                if cut.needs_factors and not self.workspace.has_truncation(name)]
        for i, name in enumerate(todo):
            if progress:
                progress(i, len(todo), name)
            self.workspace.truncation(name)
        if todo:
            release_freed_memory()
        if progress and todo:
            progress(len(todo), len(todo), "")

    def reference(self, scope: str = "all", settings: Settings = Settings(),
                  progress: Progress | None = None) -> list[dict]:
        """Chart points of every `REFERENCE` strategy in `scope`, on a private working copy (this session's cut is
        left as it is); remembered per (scope, settings) by the runtime for every session on the same evaluator,
        since they depend on nothing a session sets (on SmolLM2 the ten evaluations take over a minute)."""
        key = (scope, settings)
        shared = self.runtime.reference_points(self.evaluator)
        if key in shared:
            self._reference[key] = shared[key]
        if key in self._reference:
            return self._reference[key]
        private = WhatIfSession(self.runtime, self.spec, evaluator=self.evaluator)
        points = []
        for i, ref in enumerate(REFERENCE):
            if progress:
                progress(i, len(REFERENCE), ref.label)
            result = private.run(ref.choice(scope), settings)
            points.append(result.point(ref.label, ref.short, ref.group))
        if progress:
            progress(len(REFERENCE), len(REFERENCE), "")
        self._reference[key] = shared[key] = points
        return points

    def reference_results(self, scope: str = "all", settings: Settings = Settings()) -> list[WhatIfResult]:
        """The `REFERENCE` strategies as full results (the CLI's `prune --reference`), on a private working copy."""
        private = WhatIfSession(self.runtime, self.spec, evaluator=self.evaluator)
        results = []
        for ref in REFERENCE:
            result = private.run(ref.choice(scope), settings)
            result.label = ref.label
            results.append(result)
        return results

    def scan(self, choice: Choice, by: str = "matrix", settings: Settings = Settings(),
             progress: Progress | None = None) -> list[dict]:
        """The sensitivity scan of `choice` (see `sensitivity_scan`), on a private working copy; the last few are
        remembered."""
        key = (choice, by, settings)
        if key not in self._scans:
            plan = choice.plan(self.workspace, settings)
            self._scans[key] = sensitivity_scan(self.workspace, self.evaluator, plan, by=by, lock=self.runtime.lock,
                                                progress=progress)
            while len(self._scans) > 4:
                self._scans.popitem(last=False)
        return self._scans[key]

    def last_scan(self) -> tuple[Choice, str, list[dict]] | None:
        """(choice, by, rows) of the most recent scan, or None (the Report page draws it)."""
        if not self._scans:
            return None
        (choice, by, _), rows = next(reversed(self._scans.items()))
        return choice, by, rows

    def save(self, path=None) -> bytes | None:
        """The current cut checkpoint as safetensors: written to `path`, or returned as bytes."""
        return save_pruned(self.pruner, path)


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def sensitivity_scan(workspace, evaluator: Evaluator, plan: Plan, *, by: str = "matrix", lock=None,
                     progress: Progress | None = None) -> list[dict]:
    """Apply the cuts of `plan` to one matrix (by="matrix") or every matrix of one role (by="role") at a time and
    report the KL (and agreement) each causes alone, for a heatmap of where the model breaks.

    Rows: unit (matrix name or role), role, layer (first integer in the name, None otherwise), matrices, rank,
    kept_rank, relative_error, params_before, params_after, kl, agreement, cosine. Matrices the plan leaves uncut get
    kl 0 without a forward pass. A cut in block L re-runs blocks L.. only (cached activations; from L − 1 where the
    evaluator keeps no input for block L)."""
    if by not in ("matrix", "role"):
        raise ValueError(f"by must be 'matrix' or 'role', got {by!r}")
    units: dict[str, list] = {}
    for info in workspace.matrices:
        if in_scope(info.role, plan.scope) or info.name in plan.overrides:
            units.setdefault(info.name if by == "matrix" else info.role, []).append(info)
    pruner = Pruner(workspace, evaluator.runnable)
    spectra = workspace.spectra() if by == "role" else {}
    encoder = evaluator.kind == "encoder"
    rows = []
    for i, (unit, infos) in enumerate(units.items()):
        if progress:
            progress(i, len(units), unit)
        cuts = {info.name: plan.cuts[info.name] for info in infos if info.name in plan.cuts}
        prune = pruner.apply(Plan(plan.strategy, plan.scope, cuts))
        metrics = None
        if cuts:
            if lock is None:
                metrics = evaluator.evaluate(pruner.overrides())
            else:
                with lock:
                    metrics = evaluator.evaluate(pruner.overrides())
        names = {info.name for info in infos}
        mine = [r for r in prune.matrices if r.name in names]
        layer = _LAYER.search(unit) if by == "matrix" else None
        rows.append({
            "unit": unit, "role": infos[0].role, "layer": int(layer.group(1)) if layer else None,
            "matrices": [info.name for info in infos],
            "rank": sum(r.rank for r in mine), "kept_rank": sum(r.kept_rank for r in mine),
            "relative_error": _pooled_error(mine, spectra) if by == "role" else mine[0].relative_error,
            "params_before": sum(r.params_before for r in mine), "params_after": sum(r.params_after for r in mine),
            "kl": metrics.kl if metrics else (None if encoder else 0.0),
            "agreement": metrics.agreement if metrics else 1.0,
            "cosine": metrics.cosine if metrics else (1.0 if encoder else None),
        })
    if progress:
        progress(len(units), len(units), "")
    return rows


def _pooled_error(rows, spectra) -> float:
    """sqrt(Σ ‖W − W'‖² / Σ ‖W‖²) over the matrices of a role: the relative error of the role as one block."""
    num = den = 0.0
    for r in rows:
        sq = float((spectra[r.name].singular_values ** 2).sum()) if r.name in spectra else float(r.params_before)
        num += r.relative_error**2 * sq
        den += sq
    return math.sqrt(num / den) if den > 0 else 0.0
