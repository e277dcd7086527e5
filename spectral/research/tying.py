"""Weight-tying amplification (PhotonicGPT study §3.3, ../shared/papers 000): is a tied matrix fragile because it
is used twice?

For every matrix the module reads at two places (a token embedding tied to the LM head), the view truncates it to
its energy rank r_p for a sweep of energy levels p, and measures the model's outputs in three conditions:

- `tied`: the truncated matrix at both uses (what a plain SVD cut of the checkpoint does);
- `input`: only the input use (the embedding lookup) truncated, the output use untouched;
- `output`: only the output use (the LM head) truncated.

The two uses are untied functionally (per-stage overrides, or `functional_call(tie_weights=False)`): the cached
original and the runnable module are never modified. For each point: the relative reconstruction error
ε = ‖W − W_k‖_F/‖W‖_F, KL, agreement, and the relative logit error ‖Δz‖_F/‖z‖_F (position-centred logits).

Amplification, decided here (issue 7 leaves the choice open):

- `amplification` (the headline) = geometric mean over the sweep of KL(tied) / [KL(input) + KL(output)]: how the
  two uses combine. 1: the damage of the two uses adds up as if they were independent matrices; > 1: they compound
  (tying amplifies); < 1: the damage overlaps or cancels. It is dimensionless, needs no model of the ε-dependence, and
  isolates the tying itself. (A linear tied bigram model, logits = E Eᵀ x, gives exactly 0.5: truncating E at one
  use or at both changes the logits identically, E E_kᵀ = E_k Eᵀ = E_k E_kᵀ; tests/test_research.py checks it.)
- `fits[condition]`: least squares KL ≈ a·ε^b on log-log axes over the sweep (b ≈ 2 in the small-error regime,
  where KL is quadratic in the logit change), with `kl_at_1pct` = a·0.01^b, to compare the three conditions at
  equal weight error.
- `gain[condition]`: median relative logit error / ε: how much a relative weight error is magnified at the output,
  the study's "0.5% error amplified ~20×".
- `cliff`: the smallest ε (largest energy kept) where agreement in the tied condition falls below `cliff_agreement`
  (default 0.9), interpolated linearly in log ε between the sweep points around it; None when it never does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from spectral.metrics import energy_rank
from spectral.pruning import low_rank, relative_error_from_spectrum
from spectral.research.activations import module_uses
from spectral.research.common import Outcome, Progress, ResearchError, _json
from spectral.research.context import ResearchContext

ENERGY_LEVELS = (0.99999, 0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9)
CONDITIONS = ("tied", "input", "output")
KL_MEANINGFUL = 1e-9  # KL below this is float noise: left out of ratios and fits
CLIFF_AGREEMENT = 0.9


def amplification_ratio(kl_tied: float, kl_input: float, kl_output: float) -> float | None:
    """KL(tied) / [KL(input only) + KL(output only)]; None when the parts are too small to divide by."""
    parts = kl_input + kl_output
    if kl_tied is None or parts is None or parts < KL_MEANINGFUL or kl_tied < KL_MEANINGFUL:
        return None
    return kl_tied / parts


def power_fit(errors, kls) -> dict | None:
    """Least-squares fit log KL = log a + b log ε over points with ε > 0 and KL > KL_MEANINGFUL (≥ 2 distinct ε)."""
    pts = [(math.log(e), math.log(k)) for e, k in zip(errors, kls)
           if e is not None and k is not None and e > 0 and k > KL_MEANINGFUL]
    if len({p[0] for p in pts}) < 2:
        return None
    x, y = np.array(pts).T
    b, log_a = np.polyfit(x, y, 1)
    resid = y - (log_a + b * x)
    return {"a": float(math.exp(log_a)), "b": float(b), "kl_at_1pct": float(math.exp(log_a) * 0.01**b),
            "points": len(pts), "rms_log_residual": float(np.sqrt(np.mean(resid**2)))}


def find_cliff(errors, agreements, energies, level: float = CLIFF_AGREEMENT) -> dict | None:
    """Where agreement first drops below `level` as ε grows, interpolated in log ε; None if it never does."""
    pts = sorted((e, a, p) for e, a, p in zip(errors, agreements, energies) if e is not None and a is not None)
    prev = None
    for e, a, p in pts:
        if a < level:
            if prev is None or prev[0] <= 0 or e <= 0:
                return {"agreement_level": level, "relative_error": e, "energy": p, "bracket": [None, p]}
            e0, a0, p0 = prev
            t = (a0 - level) / (a0 - a) if a0 != a else 1.0
            err = math.exp(math.log(e0) + t * (math.log(e) - math.log(e0)))
            return {"agreement_level": level, "relative_error": err, "energy": None, "bracket": [p0, p]}
        prev = (e, a, p)
    return None


@dataclass
class TyingPoint:
    energy: float
    kept_rank: int
    relative_error: float
    outcomes: dict[str, Outcome]

    @property
    def ratio(self) -> float | None:
        o = self.outcomes
        if any(o[c].damage is None for c in CONDITIONS):
            return None
        return amplification_ratio(o["tied"].damage, o["input"].damage, o["output"].damage)

    def to_dict(self) -> dict:
        d = {"energy": self.energy, "kept_rank": self.kept_rank, "relative_error": _json(self.relative_error),
             "ratio": _json(self.ratio)}
        for c in CONDITIONS:
            o = self.outcomes[c]
            d[c] = {**o.to_dict(), "logit_error": _json(o.logit_error),
                    "gain": _json(o.logit_error / self.relative_error)
                    if o.logit_error is not None and self.relative_error > 0 else None}
        return d


@dataclass
class TiedMatrixResult:
    name: str
    shape: list[int]
    tied_with: list[str]
    uses: list[dict]
    points: list[TyingPoint]
    cliff_agreement: float = CLIFF_AGREEMENT

    def _series(self, condition: str, key: str):
        return [getattr(p.outcomes[condition], key) for p in self.points]

    @property
    def amplification(self) -> float | None:
        ratios = [p.ratio for p in self.points if p.ratio is not None]
        return float(math.exp(np.mean(np.log(ratios)))) if ratios else None

    def fits(self) -> dict:
        errors = [p.relative_error for p in self.points]
        return {c: power_fit(errors, [p.outcomes[c].damage for p in self.points]) for c in CONDITIONS}

    def gains(self) -> dict:
        out = {}
        for c in CONDITIONS:
            g = [p.outcomes[c].logit_error / p.relative_error for p in self.points
                 if p.outcomes[c].logit_error is not None and p.relative_error > 0]
            out[c] = float(np.median(g)) if g else None
        return out

    def cliff(self) -> dict | None:
        return find_cliff([p.relative_error for p in self.points], self._series("tied", "agreement"),
                          [p.energy for p in self.points], self.cliff_agreement)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": self.shape, "tied_with": self.tied_with, "uses": self.uses,
                "amplification": _json(self.amplification), "fits": self.fits(), "gain": self.gains(),
                "cliff": self.cliff(), "points": [p.to_dict() for p in self.points]}


@dataclass
class TyingResult:
    header: dict
    energies: list[float]
    matrices: list[TiedMatrixResult]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.header, "energies": self.energies, "conditions": list(CONDITIONS),
                "definitions": {
                    "amplification": "geometric mean over the sweep of KL(tied) / [KL(input only) + KL(output only)]",
                    "fits": "least squares KL = a * relative_error^b on log-log axes",
                    "gain": "median of relative logit error / relative weight error",
                    "cliff": "relative error where tied agreement first falls below agreement_level"},
                "matrices": [m.to_dict() for m in self.matrices], "notes": self.notes}


def tied_matrices(ctx: ResearchContext) -> list[str]:
    """Matrices the module reads at two or more places (weight tying)."""
    runnable = ctx.require_forward("tying")
    return [info.name for info in ctx.workspace.matrices if len(module_uses(runnable, info)) >= 2]


def tying(ctx: ResearchContext, energies=ENERGY_LEVELS, *, names: list[str] | None = None,
          cliff_agreement: float = CLIFF_AGREEMENT, progress: Progress | None = None) -> TyingResult:
    """The three-condition sweep for every tied matrix (or `names`)."""
    ctx.require_forward("tying")
    energies = sorted({float(p) for p in energies}, reverse=True)
    if not energies or any(not 0.0 < p <= 1.0 for p in energies):
        raise ResearchError("energy levels must lie in (0, 1]")
    names = names if names is not None else tied_matrices(ctx)
    notes = []
    if not names:
        notes.append("no matrix is read at two places in this model (no weight tying): nothing to compare")
    results = []
    total = len(names) * len(energies)
    step = 0
    for name in names:
        info = ctx.workspace.info(name)
        uses = ctx.uses(name)
        if len(uses) < 2:
            raise ResearchError(f"{name} is read at only one place; the tying view needs a tied matrix")
        inp, out = uses[0], uses[-1]
        U, S, Vh = ctx.workspace.factors(info.name)
        s = S.double().numpy()
        points = []
        for p in energies:
            if progress:
                progress(step, total, f"{name} energy {p:g}")
            step += 1
            k = int(energy_rank(s, p))
            if k >= len(s):
                points.append(TyingPoint(p, k, 0.0, {c: _no_change(ctx) for c in CONDITIONS}))
                continue
            cut = low_rank(U, S, Vh, k)
            error = relative_error_from_spectrum(S, slice(k, None))
            outcomes = {
                "tied": ctx.compare(ctx.forward_per_use(name, {u.path: cut for u in uses})),
                "input": ctx.compare(ctx.forward_per_use(name, {inp.path: cut})),
                "output": ctx.compare(ctx.forward_per_use(name, {out.path: cut})),
            }
            points.append(TyingPoint(p, k, error, outcomes))
        results.append(TiedMatrixResult(info.name, list(info.shape), list(info.tied_with),
                                        [u.to_dict() for u in uses], points, cliff_agreement))
    if progress:
        progress(total, total, "")
    return TyingResult(ctx.header("tying"), energies, results, notes)


def _no_change(ctx: ResearchContext) -> Outcome:
    before = ctx.evaluator.perplexity_before
    if ctx.metric == "kl":
        return Outcome(1.0, 0.0, None, before, before, 0.0)
    return Outcome(1.0, None, 1.0, None, None, 0.0)
