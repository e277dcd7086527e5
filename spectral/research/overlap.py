"""Overlap of singular vectors with the data (Staats, Thamm & Rosenow, arXiv 2410.17770; RMT.md §7).

For a matrix W (analysed shape out × in) whose module multiplies input activations x ∈ R^in:
  C = (1/T) Σ_t x_t x_tᵀ              uncentred second moment of the inputs over the evaluation batch,
  C = Σ_j c_j e_j e_jᵀ                eigenvectors e_j (c_1 ≥ c_2 ≥ ...),
  O_k = max_j |⟨v_k, e_j⟩|           v_k the k-th right singular vector of W (input space), k = 1..min(out, in).
Baselines for a direction unrelated to the data (v uniform on the sphere, so O = max_j |g_j|/‖g‖, g Gaussian):
  analytic sqrt(2 ln n / n) (the large-n maximum of n Gaussian coordinates), and a seeded Monte Carlo mean and 99th
  percentile (RMT.md §7: means 0.1205 at n = 768, 0.1081 at n = 1000, 0.0589 at n = 4096).
Each singular value is classed by the analysis at the given settings: "signal" (above the TW-corrected upper edge),
"left" (below the lower edge: left outliers, RMT.md §2.5, rectangular matrices only) or "bulk". The paper's
finding: outliers on both sides overlap the activation eigenvectors far above the baseline, the bulk does not.

As RMT.md §10 notes, the max (rather than a sum of squares) and the uncentred C are reconstructed from reviews of
the paper, not checked against its text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from spectral.analysis import Settings
from spectral.research.activations import ActivationMoments, collect_input_moments
from spectral.research.common import Progress, ResearchError, _json, blas_single_thread
from spectral.research.context import ResearchContext

MC_SAMPLES = 2000
CLASSES = ("signal", "bulk", "left")


def analytic_baseline(n: int) -> float:
    """sqrt(2 ln n / n): the typical max_j |⟨v, e_j⟩| of a random unit vector v in R^n, large n (RMT.md §7)."""
    return math.sqrt(2.0 * math.log(n) / n) if n > 1 else 1.0


def monte_carlo_baseline(n: int, samples: int = MC_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """(mean, 99th percentile) of max_j |v_j| over `samples` random unit vectors v ∈ R^n (seeded).

    Any orthonormal basis {e_j} gives the same law (the sphere is rotation invariant), so the basis is the standard
    one."""
    g = np.random.default_rng(seed).standard_normal((samples, n))
    m = np.abs(g).max(axis=1) / np.linalg.norm(g, axis=1)
    return float(m.mean()), float(np.quantile(m, 0.99))


def overlaps(right_vectors: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(O_k, argmax j, eigenvalues c descending) for right singular vectors (rows, k × n) and an n × n PSD matrix."""
    c, e = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
    order = np.argsort(c)[::-1]
    c, e = c[order], e[:, order]
    proj = np.abs(np.asarray(right_vectors, dtype=np.float64) @ e)  # (k, n): |⟨v_k, e_j⟩|
    return proj.max(axis=1), proj.argmax(axis=1), c


@dataclass
class MatrixOverlap:
    name: str
    role: str
    shape: list[int]
    uses: list[str]
    tokens: int
    singular_values: np.ndarray
    overlap: np.ndarray  # O_k, k = 1..min(shape)
    best_component: np.ndarray  # j of the maximising eigenvector (0 = largest activation eigenvalue)
    classes: list[str]
    baseline: float
    mc_mean: float
    mc_q99: float
    activation_eigenvalues: np.ndarray

    def summary(self) -> dict:
        out = {}
        for cls in CLASSES:
            idx = [i for i, c in enumerate(self.classes) if c == cls]
            vals = self.overlap[idx]
            out[cls] = {"count": len(idx), "mean_overlap": _json(vals.mean()) if idx else None,
                        "above_q99": int(np.count_nonzero(vals > self.mc_q99)) if idx else 0}
        return out

    def to_dict(self, vectors: bool = True) -> dict:
        d = {"name": self.name, "role": self.role, "shape": self.shape, "uses": self.uses, "tokens": self.tokens,
             "n": int(self.shape[1]), "baseline": self.baseline, "mc_mean": self.mc_mean, "mc_q99": self.mc_q99,
             "summary": self.summary()}
        if vectors:
            d.update({"singular_values": [float(v) for v in self.singular_values],
                      "overlap": [float(v) for v in self.overlap],
                      "best_component": [int(v) for v in self.best_component], "classes": self.classes,
                      "activation_eigenvalues": [float(v) for v in self.activation_eigenvalues]})
        return d


@dataclass
class OverlapResult:
    header: dict
    settings: Settings
    matrices: list[MatrixOverlap]
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self, vectors: bool = True) -> dict:
        return {**self.header, "settings": {"estimator": self.settings.estimator,
                                            "confidence": self.settings.confidence},
                "definition": "O_k = max_j |<v_k, e_j>|, e_j eigenvectors of the uncentred input second moment",
                "matrices": [m.to_dict(vectors) for m in self.matrices], "skipped": self.skipped,
                "notes": self.notes}


def classify(singular_values: np.ndarray, edge_upper: float, edge_lower: float | None) -> list[str]:
    """'signal' above the upper edge, 'left' below the lower edge (when there is one), else 'bulk'."""
    out = []
    for s in singular_values:
        if s > edge_upper:
            out.append("signal")
        elif edge_lower is not None and s < edge_lower:
            out.append("left")
        else:
            out.append("bulk")
    return out


def matrix_overlap(name: str, role: str, shape, U_S_Vh, moments: ActivationMoments, edge_upper: float,
                   edge_lower: float | None, *, mc_samples: int = MC_SAMPLES, seed: int = 0) -> MatrixOverlap:
    """O_k of one matrix from its SVD factors and collected input moments."""
    _, S, Vh = U_S_Vh
    s = S.double().numpy() if torch.is_tensor(S) else np.asarray(S, dtype=np.float64)
    vh = Vh.double().numpy() if torch.is_tensor(Vh) else np.asarray(Vh, dtype=np.float64)
    cov = moments.covariance
    o, best, c = overlaps(vh, cov)
    n = int(shape[1])
    mc_mean, mc_q99 = monte_carlo_baseline(n, mc_samples, seed)
    return MatrixOverlap(name, role, list(shape), list(moments.uses), moments.count, s, o, best,
                         classify(s, edge_upper, edge_lower), analytic_baseline(n), mc_mean, mc_q99, c)


def overlap(ctx: ResearchContext, settings: Settings | None = None, *, names: list[str] | None = None,
            mc_samples: int = MC_SAMPLES, seed: int = 0, progress: Progress | None = None) -> OverlapResult:
    """O_k for every matrix with a linear use (or `names`), from activations on the evaluation batch."""
    runnable = ctx.require_forward("overlap")
    settings = settings or Settings()
    ws = ctx.workspace
    analysis = ws.analyze(settings)
    wanted = [ws.info(n).name for n in names] if names is not None else [m.name for m in ws.matrices]
    wanted = [n for n in wanted if any(r.name == n for r in analysis.matrices)]
    if not wanted:
        raise ResearchError("no matrix to analyse")
    moments, skipped = collect_input_moments(runnable, ws, wanted, ctx.evaluator.batch.input_ids,
                                             progress=progress)
    rows = []
    with blas_single_thread():
        for i, name in enumerate(n for n in wanted if n in moments):
            if progress:
                progress(i, len(moments), name)
            info = ws.info(name)
            report = analysis.row(name)
            rows.append(matrix_overlap(name, info.role, info.shape, ws.factors(name), moments[name],
                                       report.edge_upper, report.edge_lower, mc_samples=mc_samples, seed=seed))
    notes = []
    short = [r.name for r in rows if r.tokens < r.shape[1]]
    if short:
        notes.append(f"fewer activation vectors than input dimensions for {', '.join(short[:4])}"
                     f"{' ...' if len(short) > 4 else ''}: C is rank-deficient there and its trailing eigenvectors "
                     "are arbitrary; give more text (--positions)")
    return OverlapResult(ctx.header("overlap"), settings, rows,
                         [{"name": k, "reason": v} for k, v in skipped.items()], notes)
