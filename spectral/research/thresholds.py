"""Threshold quality (Nishikawa et al., arXiv 2512.12911; ../shared/papers 002): Ave_w(φ) and the signal count ŝ
as the Tracy-Widom confidence slides, for BEMA and Gaussian broadening side by side, beside measured agreement/KL.

For each estimator e and confidence c on a grid, and each matrix:
  σ̂_e (fitted once per matrix and estimator: it does not depend on c),
  γ₊(c) = σ̂²[(1+√q)² + t_c N^{−2/3} q^{−1/6} (1+√q)^{4/3}]   (RMT.md §2.3),
  ŝ = #{λ_i > γ₊},  Ave_w(φ) = Σ_{i≤ŝ} φ(θ̂_i)(λ_i − γ₊) / Σ_{i≤ŝ}(λ_i − γ₊)   (RMT.md §6.5, side "product").
Measured:
  model-wide: every matrix truncated to its ŝ(e, c) at once (the paper compresses the whole network), agreement and
  KL against the untouched model, and the Pearson correlation over the grid between the mean Ave_w of the matrices
  and agreement (the paper reports 0.85-0.98 with test accuracy);
  per chosen matrix: that matrix alone truncated to ŝ(e, c) (one forward pass per distinct ŝ).
A matrix with ŝ = 0 is replaced by zeros in the model-wide cut, as the `mp` pruning strategy does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from spectral import mp, noise, spikes
from spectral.pruning import Cut, Plan, Strategy
from spectral.research.common import Outcome, Progress, ResearchError, _json, pearson
from spectral.research.context import ResearchContext
from spectral.tracy_widom import tw1_ppf

CONFIDENCES = (0.5, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999)
ESTIMATORS = ("bema", "broadening")


@dataclass
class MatrixThresholds:
    """Per matrix: σ̂ per estimator and (ŝ, γ₊ edge, Ave_w) per (estimator, confidence)."""

    name: str
    role: str
    shape: list[int]
    sigma: dict[str, float]
    points: list[dict]  # estimator, confidence, edge_upper (singular-value units), n_signal, ave_w_phi
    measured: dict[int, Outcome] = field(default_factory=dict)  # kept rank -> outcome of cutting this matrix alone

    def to_dict(self) -> dict:
        pts = []
        for p in self.points:
            d = dict(p)
            o = self.measured.get(p["n_signal"])
            if self.measured:
                d.update(o.to_dict() if o is not None else {})
            pts.append(d)
        return {"name": self.name, "role": self.role, "shape": self.shape,
                "sigma": {k: _json(v) for k, v in self.sigma.items()}, "measured": bool(self.measured),
                "points": pts}


@dataclass
class ThresholdsResult:
    header: dict
    confidences: list[float]
    estimators: list[str]
    model: list[dict]
    matrices: list[MatrixThresholds]
    chosen: list[str]
    notes: list[str] = field(default_factory=list)

    def correlation(self) -> dict:
        out = {}
        for e in self.estimators:
            rows = [r for r in self.model if r["estimator"] == e]
            ave = [r["ave_w_mean"] for r in rows]
            out[e] = {"ave_w_vs_agreement": pearson(ave, [r.get("agreement") for r in rows]),
                      "ave_w_vs_kl": pearson(ave, [r.get("kl") for r in rows]),
                      "ave_w_vs_cosine": pearson(ave, [r.get("cosine") for r in rows])}
        return out

    def to_dict(self) -> dict:
        return {**self.header, "confidences": self.confidences, "estimators": self.estimators,
                "side": "product", "model": self.model, "correlation": self.correlation(), "chosen": self.chosen,
                "matrices": [m.to_dict() for m in self.matrices], "notes": self.notes}


def matrix_thresholds(spectrum, estimators=ESTIMATORS, confidences=CONFIDENCES) -> MatrixThresholds:
    """σ̂, ŝ and Ave_w(φ) of one cached spectrum over the grid (arithmetic only: no SVD)."""
    s = np.asarray(spectrum.singular_values, dtype=np.float64)
    N, M, q = spectrum.N, spectrum.M, spectrum.q
    lam = s * s / N
    sigmas, points = {}, []
    for e in estimators:
        sigma = float(noise.make_estimator(e).fit(s, spectrum.shape).sigma_)
        sigmas[e] = sigma
        for c in confidences:
            if sigma > 0:
                gamma = mp.upper_threshold(N, M, sigma * sigma, c)
                n_signal = int(np.count_nonzero(lam > gamma))
                ave_w = float(spikes.ave_w_phi(lam, gamma, sigma * sigma, q, side="product")) if n_signal else None
                edge = math.sqrt(N * gamma)
            else:
                n_signal, ave_w, edge = int(np.count_nonzero(s > 0)), None, 0.0
            points.append({"estimator": e, "confidence": c, "t": float(tw1_ppf(c)), "edge_upper": edge,
                           "n_signal": n_signal, "ave_w_phi": _json(ave_w)})
    return MatrixThresholds(spectrum.name, spectrum.role, list(spectrum.shape), sigmas, points)


def default_matrix(workspace) -> str:
    """The matrix a view shows first: the first one inside a block (not an embedding or head)."""
    for info in workspace.matrices:
        if info.role not in ("embedding", "head"):
            return info.name
    return workspace.matrices[0].name


def thresholds(ctx: ResearchContext, *, confidences=CONFIDENCES, estimators=ESTIMATORS,
               matrices: list[str] | None = None, measure_model: bool = True,
               progress: Progress | None = None) -> ThresholdsResult:
    """The grid for every matrix; the model-wide cut at each grid point and, for `matrices` (default: the first
    matrix inside a block), that matrix cut alone. Without a forward pass, the spectral part only."""
    confidences = sorted({float(c) for c in confidences})
    if not confidences or any(not 0.0 < c < 1.0 for c in confidences):
        raise ResearchError("confidences must lie strictly between 0 and 1")
    for e in estimators:
        if e not in noise.ESTIMATORS:
            raise ResearchError(f"unknown estimator {e!r}; choose from {', '.join(noise.ESTIMATORS)}")
    ws = ctx.workspace
    spectra = ws.spectra(progress)
    rows = [matrix_thresholds(sp, estimators, confidences) for sp in spectra.values()]
    by_name = {r.name: r for r in rows}
    chosen = [ws.info(n).name for n in matrices] if matrices is not None else [default_matrix(ws)]
    for n in chosen:
        if n not in by_name:
            raise ResearchError(f"{n} has no spectrum (non-finite values?)")
    notes = []
    if not ctx.runs:
        notes.append(f"no forward pass ({ctx.why_not}): agreement and KL are not measured")

    model = []
    jobs = [(e, c) for e in estimators for c in confidences] if (ctx.runs and measure_model) else []
    per_matrix = {n: sorted({p["n_signal"] for p in by_name[n].points}) for n in chosen} if ctx.runs else {}
    total = len(jobs) + sum(len(v) for v in per_matrix.values())
    step = 0
    for e in estimators:
        for c in confidences:
            entries = [next(p for p in r.points if p["estimator"] == e and p["confidence"] == c) for r in rows]
            aves = [p["ave_w_phi"] for p in entries if p["ave_w_phi"] is not None]
            row = {"estimator": e, "confidence": c, "t": float(tw1_ppf(c)),
                   "n_signal_total": int(sum(p["n_signal"] for p in entries)),
                   "ave_w_mean": float(np.mean(aves)) if aves else None,
                   "matrices_with_signal": len(aves)}
            if (e, c) in jobs:
                if progress:
                    progress(step, total, f"{e} c={c:g}")
                step += 1
                cuts = {}
                for r, p in zip(rows, entries):
                    if p["n_signal"] < min(r.shape):
                        cuts[r.name] = Cut(kept_rank=p["n_signal"])
                prune, outcome = ctx.run_plan(Plan(Strategy("mp", float(tw1_ppf(c))), "all", cuts))
                row.update({"params_after": prune.params_after, "compression": _json(prune.compression),
                            **outcome.to_dict()})
            model.append(row)
    for n, ranks in per_matrix.items():
        r = by_name[n]
        full = min(r.shape)
        for k in ranks:
            if progress:
                progress(step, total, f"{n} rank {k}")
            step += 1
            if k >= full:
                r.measured[k] = Outcome(1.0, 0.0 if ctx.metric == "kl" else None,
                                        None if ctx.metric == "kl" else 1.0,
                                        ctx.evaluator.perplexity_before, ctx.evaluator.perplexity_before)
                continue
            _, outcome = ctx.run_plan(Plan(Strategy("mp"), "all", {n: Cut(kept_rank=k)}))
            r.measured[k] = outcome
    if progress:
        progress(total, total, "")
    return ThresholdsResult(ctx.header("thresholds"), confidences, list(estimators), model, rows, chosen, notes)
