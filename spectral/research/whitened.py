"""Activation-aware (whitened) SVD against plain SVD at equal compression: beyond the studies (SVD-LLM, ASVD).

Plain truncation keeps the top singular components of W, which minimises ‖W − W'‖_F but ignores which input
directions the data actually uses. What the next layer sees is W x, so the error that matters is
‖(W − W') Xᵀ‖_F over the layer's inputs X (T × n). With C = XᵀX/T + εI = S Sᵀ (Cholesky, S lower triangular):

  ‖(W − W') Xᵀ‖_F² ≈ T ‖(W − W') S‖_F²,

so the best rank-k W' is W'_k = [W S]_k S⁻¹ (Eckart-Young applied to W S; SVD-LLM, Wang et al. 2024, "truncation-
aware data whitening"). It is stored as the same two factors as a plain rank-k cut, (U_k Σ_k) and (V_kᵀ S⁻¹), so
both methods have identical parameter counts at every k.

The compression grid: for a kept parameter fraction ρ of every matrix in scope, k = max(1, ⌊ρ·m·n/(m+n)⌋) (a rank-k
factorisation stores k(m+n) numbers). Matrices in scope are those whose every use multiplies an input activation
(attention and MLP projections; a tied embedding, read by index at the input, is left out of both methods).
Calibration activations come from the first half of the evaluation text, the comparison from the second half
(`spectral.research.calibration_split`), so the whitened cut is not scored on the tokens it was fitted to.

Reported per grid point and method: model-level compression (parameters before / after, tied tensors once), KL,
agreement, perplexity and the pooled layer-output error on the calibration data, sqrt(Σ tr(D C Dᵀ) / Σ tr(W C Wᵀ))
with D = W − W' (= ‖D Xᵀ‖_F/‖W Xᵀ‖_F summed over the layers), the quantity the whitening minimises.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.linalg import solve_triangular

from spectral.pruning import in_scope
from spectral.research.activations import collect_input_moments, module_uses
from spectral.research.common import Outcome, Progress, ResearchError, _json, blas_single_thread
from spectral.research.context import ResearchContext

KEPT_FRACTIONS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
DAMPING = 1e-5  # ε = DAMPING · tr(C)/n added to C before the Cholesky factorisation
METHODS = ("plain", "whitened")


def whitening_factor(covariance, damping: float = DAMPING) -> np.ndarray:
    """Lower-triangular S with S Sᵀ = C + εI, ε = damping·tr(C)/n (raised ×10 until Cholesky succeeds)."""
    C = np.asarray(covariance.numpy() if torch.is_tensor(covariance) else covariance, dtype=np.float64)
    n = C.shape[0]
    scale = float(np.trace(C)) / n if n else 1.0
    eps = damping * (scale if scale > 0 else 1.0)
    for _ in range(8):
        try:
            return np.linalg.cholesky(C + eps * np.eye(n))
        except np.linalg.LinAlgError:
            eps *= 10.0
    raise ResearchError("the activation second moment is not positive definite even with damping")


def _whitened_svd(W: np.ndarray, S: np.ndarray):
    """SVD of W S (numpy float64: LAPACK on one BLAS thread, fast and predictable on small shared machines)."""
    return np.linalg.svd(W @ S, full_matrices=False)


def _unwhiten(S: np.ndarray, Vh_k: np.ndarray) -> np.ndarray:
    """V_kᵀ S⁻¹ by a triangular solve: X S = V_kᵀ  ⇔  Sᵀ Xᵀ = V_k."""
    return solve_triangular(S, Vh_k.T, trans="T", lower=True).T


def whitened_factors(W, S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with W'_k = A @ B = [W S]_k S⁻¹: A = U_k Σ_k (m × k), B = V_kᵀ S⁻¹ (k × n)."""
    W = np.asarray(W.numpy() if torch.is_tensor(W) else W, dtype=np.float64)
    U, sv, Vh = _whitened_svd(W, S)
    return U[:, :k] * sv[:k], _unwhiten(S, Vh[:k])


def whitened_truncation(W, covariance, k: int, damping: float = DAMPING) -> np.ndarray:
    """The rank-k matrix minimising ‖(W − W') S‖_F, S Sᵀ = C + εI (float64)."""
    A, B = whitened_factors(W, whitening_factor(covariance, damping), k)
    return A @ B


def kept_rank_for(shape, fraction: float) -> int:
    """k = max(1, ⌊ρ·m·n/(m+n)⌋), capped at min(m, n): the rank whose factors store a fraction ρ of m·n."""
    m, n = shape
    return int(min(min(m, n), max(1, math.floor(fraction * m * n / (m + n) + 1e-9))))


@dataclass
class WhitenedPoint:
    kept_fraction: float
    compression: float
    matrix_compression: float
    params_after: int
    output_error: float
    outcome: Outcome

    def to_dict(self) -> dict:
        return {"kept_fraction": self.kept_fraction, "compression": _json(self.compression),
                "matrix_compression": _json(self.matrix_compression), "params_after": self.params_after,
                "output_error": _json(self.output_error), **self.outcome.to_dict()}


@dataclass
class WhitenedResult:
    header: dict
    grid: list[float]
    matrices: list[str]
    curves: dict[str, list[WhitenedPoint]]
    calibration: dict
    damping: float
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.header, "grid": self.grid, "damping": self.damping, "calibration": self.calibration,
                "matrices": self.matrices, "skipped": self.skipped,
                **{m: [p.to_dict() for p in self.curves[m]] for m in METHODS}, "notes": self.notes}


def whitened(ctx: ResearchContext, *, fractions=KEPT_FRACTIONS, scope: str = "all", damping: float = DAMPING,
             progress: Progress | None = None) -> WhitenedResult:
    """Compression-vs-KL curves of plain and whitened SVD over the same grid of kept parameter fractions."""
    runnable = ctx.require_forward("whitened")
    fractions = sorted({float(f) for f in fractions}, reverse=True)
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise ResearchError("kept fractions must lie in (0, 1]")
    if damping <= 0:
        raise ResearchError("damping must be positive")
    in_scope("", scope)
    ws = ctx.workspace
    candidates, skipped = [], []
    for info in ws.matrices:
        if not in_scope(info.role, scope):
            continue
        uses = module_uses(runnable, info)
        if not uses:
            skipped.append({"name": info.name, "reason": "not used by the runnable module"})
        elif any(u.kind != "linear" for u in uses):
            skipped.append({"name": info.name, "reason": "read by index (embedding lookup): no input activations"})
        else:
            candidates.append(info.name)
    calib, evaluator = ctx.calibration()
    moments, missing = collect_input_moments(runnable, ws, candidates, calib.input_ids)
    skipped += [{"name": k, "reason": v} for k, v in missing.items()]
    names = [n for n in candidates if n in moments]
    if not names:
        raise ResearchError("no matrix in scope multiplies input activations; nothing to whiten")

    with blas_single_thread():
        return _whitened_curves(ctx, ws, names, moments, fractions, damping, calib, evaluator, skipped, progress)


def _whitened_curves(ctx, ws, names, moments, fractions, damping, calib, evaluator, skipped, progress
                     ) -> WhitenedResult:
    factors = {}
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names) + 2 * len(fractions), f"whitening {name}")
        W = ws.weight(name).to(torch.float64).numpy()
        S = whitening_factor(moments[name].covariance, damping)
        U, sv, Vh = _whitened_svd(W, S)
        plain = [t.double().numpy() for t in ws.factors(name)]
        factors[name] = (W, S, U, sv, Vh, plain, moments[name].covariance)

    params_before = _total_params(ws)
    curves: dict[str, list[WhitenedPoint]] = {m: [] for m in METHODS}
    step = len(names)
    total = len(names) + 2 * len(fractions)
    for f in fractions:
        ranks = {n: kept_rank_for(ws.info(n).shape, f) for n in names}
        saved = sum(max(0, ws.info(n).shape[0] * ws.info(n).shape[1] - k * sum(ws.info(n).shape))
                    for n, k in ranks.items())
        dense = sum(ws.info(n).shape[0] * ws.info(n).shape[1] for n in names)
        params_after = params_before - saved
        for method in METHODS:
            if progress:
                progress(step, total, f"{method} {f:g}")
            step += 1
            overrides, num, den = {}, 0.0, 0.0
            for n, k in ranks.items():
                W, S, U, sv, Vh, (Up, Sp, Vp), C = factors[n]
                if method == "plain":
                    cut = (Up[:, :k] * Sp[:k]) @ Vp[:k]
                else:
                    cut = (U[:, :k] * sv[:k]) @ _unwhiten(S, Vh[:k])
                D = W - cut
                num += float(np.sum((D @ C) * D))  # tr(D C Dᵀ) = ‖D Xᵀ‖²/T on the calibration data
                den += float(np.sum((W @ C) * W))
                overrides.update(ctx.matrix_overrides(n, torch.from_numpy(cut).to(torch.float32)))
            outcome = Outcome.from_metrics(evaluator.evaluate(overrides))
            curves[method].append(WhitenedPoint(f, params_before / params_after, dense / max(dense - saved, 1),
                                                params_after, math.sqrt(num / den) if den > 0 else 0.0, outcome))
    if progress:
        progress(total, total, "")
    header = {"view": "whitened", "checkpoint": ws.checkpoint_summary(), "metric": ctx.metric,
              "eval": evaluator.batch.to_dict(), "perplexity_before": _json(evaluator.perplexity_before)}
    calibration = {**calib.to_dict(), "detail": calib.detail}
    notes = [f"evaluation: {evaluator.batch.detail}"] if evaluator.batch.detail else []
    widest = max(ws.info(n).shape[1] for n in names)
    if calib.positions < widest:
        notes.append(f"calibration has {calib.positions} activation vectors for inputs up to {widest} wide: the "
                     "second moments are rank-deficient and only the damping fills them; give more text "
                     "(--positions)")
    return WhitenedResult(header, fractions, names, curves, calibration, damping, skipped, notes)


def _total_params(workspace) -> int:
    """Every parameter of the checkpoint, tied tensors once (as `spectral.pruning.PruneResult.params_before`)."""
    ckpt = workspace.checkpoint
    aliases = {n for group in ckpt.tied_groups for n in group[1:]}
    return int(sum(int(np.prod(shape)) if len(shape) else 1 for name, shape in ckpt.shapes.items()
                   if name not in aliases))
