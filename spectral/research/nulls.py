"""Honest nulls (issue 13): per matrix role, the signal counts under each null side by side, with the diagnostics
that say which null describes the matrix (RMT.md §11). No forward pass.

The headline contrast of the dashboard, MP signal rank against energy utilisation, is only as honest as its null.
This view answers how much of the "noise vs signal" picture survives a null that fits: for each matrix the first
null of `NULLS` (mp, biwhitened, permutation) whose diagnostics pass is its "fitting null", and the signal counted
under it is summed per role; matrices that no null fits are counted separately, their signal left out.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from spectral.analysis import Analysis, MatrixReport, Settings
from spectral.nulls import DEFAULT_SHUFFLES, NULLS
from spectral.research.common import jsonable

Progress = Callable[[int, int, str], None]

__all__ = ["MatrixNulls", "NullsResult", "RoleNulls", "nulls"]


@dataclass
class MatrixNulls:
    """One matrix under every null: its signal count and whether the null fits, and the i.i.d. diagnostics."""

    name: str
    role: str
    shape: tuple[int, int]
    n_signal: dict[str, int]  # null -> singular values above that null's edge
    null_ok: dict[str, bool]  # null -> its diagnostics pass
    fitting_null: str | None  # the first null in order that fits, None when none does
    failures: dict[str, list[str]]  # null -> why it does not fit (the row's "... null does not fit" warnings)
    diagnostics: dict[str, float | None]  # of W under the i.i.d. MP fit (mp row): frac_above ... excess_kurtosis

    @property
    def rank(self) -> int:
        return min(self.shape)

    def to_dict(self) -> dict:
        return jsonable({"name": self.name, "role": self.role, "shape": list(self.shape), "n_signal": self.n_signal,
                         "null_ok": self.null_ok, "fitting_null": self.fitting_null, "failures": self.failures,
                         **self.diagnostics})


@dataclass
class RoleNulls:
    """Per role: signal % of the full rank under each null, how many matrices each null fits, and the signal
    under each matrix's fitting null."""

    role: str
    matrices: int
    full_rank: int
    n_signal: dict[str, int]
    signal_pct: dict[str, float]
    null_fits: dict[str, int]  # null -> matrices it fits
    fitting_signal: int  # Σ n_signal under each matrix's fitting null (matrices with one)
    fitting_rank: int  # Σ rank of those matrices
    unfitted: int  # matrices no null fits
    median_kurtosis: float | None
    median_row_spread: float | None
    median_col_spread: float | None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fitting_signal_pct"] = 100.0 * self.fitting_signal / self.fitting_rank if self.fitting_rank else None
        return jsonable(d)


@dataclass
class NullsResult:
    header: dict
    settings: Settings
    nulls: tuple[str, ...]
    shuffles: int
    roles: list[RoleNulls]
    matrices: list[MatrixNulls]
    totals: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        s = self.settings
        return jsonable({**self.header, "settings": {"estimator": s.estimator, "confidence": s.confidence,
                                                     "energy": s.energy},
                         "nulls": list(self.nulls), "shuffles": self.shuffles,
                         "roles": [r.to_dict() for r in self.roles], "totals": self.totals,
                         "matrices": [m.to_dict() for m in self.matrices], "notes": self.notes})


DIAGNOSTIC_KEYS = ("frac_above", "frac_below", "ks_whole", "row_cv", "col_cv", "row_spread", "col_spread",
                   "excess_kurtosis")


def _median(values) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _failures(report: MatrixReport) -> list[str]:
    prefix = f"{report.null} null does not fit: "
    return [w[len(prefix):] for w in report.warnings if w.startswith(prefix)]


def nulls(workspace, settings: Settings | None = None, *, which: tuple[str, ...] = NULLS,
          progress: Progress | None = None) -> NullsResult:
    """Signal counts of every matrix of `workspace` (a spectral.workspace.Workspace) under each null in `which`, at
    `settings` (its `null` is ignored), grouped per role. The permutation null costs `DEFAULT_SHUFFLES` spectra
    per matrix the first time (cached in the workspace after that)."""
    settings = settings or Settings()
    unknown = [n for n in which if n not in NULLS]
    if unknown or not which:
        raise ValueError(f"unknown null(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(NULLS)}")
    order = tuple(n for n in NULLS if n in which)
    analyses: dict[str, Analysis] = {}
    for null in order:
        analyses[null] = workspace.analyze(dataclasses.replace(settings, null=null), progress=progress)
    first = analyses[order[0]]
    matrices = []
    for base in first.matrices:
        rows = {null: analyses[null].row(base.name) for null in order}
        fitting = next((null for null in order if rows[null].null_ok), None)
        reference = rows.get("mp", base)
        matrices.append(MatrixNulls(
            base.name, base.role, tuple(base.shape), {n: r.n_signal for n, r in rows.items()},
            {n: r.null_ok for n, r in rows.items()}, fitting, {n: _failures(r) for n, r in rows.items()},
            {k: getattr(reference, k) for k in DIAGNOSTIC_KEYS}))
    roles = []
    by_role: dict[str, list[MatrixNulls]] = {}
    for m in matrices:
        by_role.setdefault(m.role, []).append(m)
    for role, ms in by_role.items():
        full = sum(m.rank for m in ms)
        fitted = [m for m in ms if m.fitting_null is not None]
        roles.append(RoleNulls(
            role, len(ms), full, {n: sum(m.n_signal[n] for m in ms) for n in order},
            {n: 100.0 * sum(m.n_signal[n] for m in ms) / full for n in order},
            {n: sum(m.null_ok[n] for m in ms) for n in order},
            sum(m.n_signal[m.fitting_null] for m in fitted), sum(m.rank for m in fitted), len(ms) - len(fitted),
            _median(m.diagnostics["excess_kurtosis"] for m in ms),
            _median(m.diagnostics["row_spread"] for m in ms), _median(m.diagnostics["col_spread"] for m in ms)))
    full = sum(m.rank for m in matrices)
    fitted = [m for m in matrices if m.fitting_null is not None]
    fitting_rank = sum(m.rank for m in fitted)
    totals = {
        "matrices": len(matrices), "full_rank": full,
        "n_signal": {n: sum(m.n_signal[n] for m in matrices) for n in order},
        "signal_pct": {n: 100.0 * sum(m.n_signal[n] for m in matrices) / full if full else None for n in order},
        "null_fits": {n: sum(m.null_ok[n] for m in matrices) for n in order},
        "fitting_null": {n: sum(m.fitting_null == n for m in matrices) for n in order},
        "unfitted": len(matrices) - len(fitted),
        "fitting_signal": sum(m.n_signal[m.fitting_null] for m in fitted), "fitting_rank": fitting_rank,
        "fitting_signal_pct": (100.0 * sum(m.n_signal[m.fitting_null] for m in fitted) / fitting_rank
                               if fitting_rank else None),
        "utilization_pct": (100.0 * sum(r.energy_rank for r in first.matrices) / full if full else None),
    }
    notes = []
    if totals["unfitted"]:
        notes.append(f"{totals['unfitted']} of {len(matrices)} matrices fit none of {', '.join(order)}: "
                     "their signal counts are left out of fitting_signal")
    header = {"view": "nulls", "checkpoint": workspace.checkpoint_summary()}
    shuffles = DEFAULT_SHUFFLES if "permutation" in order else 0
    return NullsResult(header, settings, order, shuffles, roles, matrices, totals, notes)
