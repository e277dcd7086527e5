"""Does the i.i.d. noise model behind Marchenko-Pastur describe this matrix? Cheap per-matrix diagnostics (RMT.md §11).

Two kinds, both O(mn) or O(M):
- `EntryStats` from the entries of W (computed once, where the singular values are): the spread of row and of
  column mean squares, and the excess kurtosis of the entries;
- `spectrum_fit` from the eigenvalues and the fitted σ̂: the fraction of eigenvalues outside the fitted bulk
  [λ₋, λ₊] on each side, and the KS distance of the whole spectrum (outliers included) to MP(q, σ̂²).

`null_failures` turns them into one-line reasons why a null does not fit; an empty list means the null holds as far
as these diagnostics can tell. Each threshold is a stated floor or a multiple of the statistic's i.i.d. Gaussian
sampling spread, whichever is larger, calibrated by simulation (bench/bench_nulls.py `calibrate` prints the numbers):
at every shape simulated, no i.i.d. Gaussian matrix, with or without planted spikes, crossed any of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from spectral.mp import MarchenkoPastur, has_lower_edge, upper_threshold
from spectral.noise import BEMA
from spectral.spikes import signal_strength

__all__ = [
    "KURTOSIS_FLOOR",
    "LEFT_OUTLIERS_FLOOR",
    "SHAPE_KS_FLOOR",
    "SPREAD_FLOOR",
    "EntryStats",
    "SpectrumFit",
    "detected_theta4",
    "entry_statistics",
    "kurtosis_limit",
    "left_outlier_limit",
    "null_failures",
    "shape_ks_limit",
    "signal_spread",
    "spectrum_fit",
    "spread_limit",
]

# Heavy tails: excess kurtosis of the entries above max(KURTOSIS_FLOOR, 8 sd), sd = sqrt(24/(mn)) its i.i.d. Gaussian
# sampling spread (i.i.d. Gaussian: at most 3.3 sd in 1200 simulated matrices from 50×200 to 500×1000). Measured at
# 512×2048, c = 0.99 (100 seeds each): Student-t df 6-8 (kurtosis 1.5-3) keep MP's nominal 1% false-positive rate,
# df 5 (kurtosis 6; sample values 4.2-14 over 300 seeds) gives 10-19%, df 3 100% (RMT.md §11). The floor sits
# between: no t5 matrix passes, t8 and lighter pass.
KURTOSIS_FLOOR = 2.0
# Variance profile: the spread of row (column) mean squares relative to what exchangeable entries with the same
# marginal law give, sqrt(Var_rows(r_i) / (Var(x²)/n)) (the square root of a one-way ANOVA F ratio of the squared
# entries by row, 1 under i.i.d. entries whatever their tails); flagged above max(SPREAD_FLOOR, 1 + 6/sqrt(2(m−1))),
# 6 sd of its i.i.d. Gaussian sampling spread (simulated maxima: 1.25 at 50 rows, 1.09 at 500). Low-rank signal
# spreads it too, by 2Σθ⁴N²/((κ+2)·n·m²) in the square (three planted spikes at up to 3.5× the BBP threshold: to 1.2
# at M = 500, 2 at M = 100); `signal_spread` computes that share from the detected components, and it is taken off
# before the comparison. Signal concentrated in a few rows is not distinguishable from a profile there.
SPREAD_FLOOR = 1.5
# Left outliers: eigenvalues below the fitted bulk's lower edge λ₋ = σ̂²(1−√q)² (only where `has_lower_edge`).
# Additive low-rank signal creates none (RMT.md §2.5, T14); i.i.d. noise leaves its TW-sized fluctuation: at most 2
# in every simulation (50×200 to 500×2000, with and without planted spikes).
LEFT_OUTLIERS_FLOOR = 4  # more than max(4, 0.5% of M) eigenvalues below λ₋ fails
# Shape: the KS distance of the whole spectrum minus the fraction above λ₊ (the part possible signal explains).
SHAPE_KS_FLOOR = 0.02  # above max(0.02, 6/M) fails (i.i.d. Gaussian: M·KS ≤ 4.2 in every simulation)


@dataclass(frozen=True)
class EntryStats:
    """Moments of the entries of one matrix (rows × cols as analysed), from one O(mn) pass (RMT.md §11)."""

    rows: int
    cols: int
    mean_square: float  # ‖W‖_F²/(mn)
    row_cv: float  # coefficient of variation of the row mean squares r_i = Σ_j W_ij²/cols
    col_cv: float  # coefficient of variation of the column mean squares c_j = Σ_i W_ij²/rows
    row_spread: float  # sd(r_i) / sqrt(Var(W_ij²)/cols): 1 for exchangeable entries
    col_spread: float  # sd(c_j) / sqrt(Var(W_ij²)/rows)
    excess_kurtosis: float  # E(x−μ)⁴/(E(x−μ)²)² − 3 over all entries; 0 for Gaussian entries

    def to_dict(self) -> dict:
        return {"row_cv": self.row_cv, "col_cv": self.col_cv, "row_spread": self.row_spread,
                "col_spread": self.col_spread, "excess_kurtosis": self.excess_kurtosis}


def entry_statistics(matrix: torch.Tensor | np.ndarray, chunk_elements: int = 1 << 15) -> EntryStats:
    """Row/column mean-square spread and entry kurtosis of a 2-D matrix in float64, `chunk_elements` at a time
    (memory stays O(chunk) beyond the input). 2¹⁵ entries (256 KiB of float64) stay in cache, 2.5-3× faster than 2²²
    on GPT-2's matrices, and under torch's parallel grain (32,768), so each sum is taken in the same order on any
    number of threads (for rows of up to 32,768 entries): the statistics do not depend on who computed them. A
    non-finite entry makes them nan or inf."""
    w = torch.as_tensor(matrix).detach()
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(w.shape)}")
    rows, cols = (int(d) for d in w.shape)
    step = max(1, chunk_elements // max(cols, 1))
    row_ms = torch.empty(rows, dtype=torch.float64)
    col_sum = torch.zeros(cols, dtype=torch.float64)
    raw = torch.zeros(2, dtype=torch.float64)  # Σx², Σx⁴
    shifted = torch.zeros(4, dtype=torch.float64)  # Σy, Σy², Σy³, Σy⁴ of y = x − K
    shift = None  # K: the first block's mean, so the central moments need no cancellation against a large mean
    for start in range(0, rows, step):
        x = w[start:start + step].to(device="cpu", dtype=torch.float64).reshape(-1)
        x2 = x * x
        block = x2.view(-1, cols)
        row_sums = block.sum(dim=1)
        row_ms[start:start + step] = row_sums / cols
        col_sum += block.sum(dim=0)
        raw += torch.stack([row_sums.sum(), torch.dot(x2, x2)])  # dots: no temporaries
        if shift is None:
            shift = float(x.mean()) if x.numel() else 0.0
        y = x - shift
        y2 = y * y
        shifted += torch.stack([y.sum(), y2.sum(), torch.dot(y2, y), torch.dot(y2, y2)])
    n = float(rows * cols)
    m2, m4 = (float(v) / n for v in raw)
    c1, c2, c3, c4 = (float(v) / n for v in shifted)
    col_ms = col_sum / rows
    var_x2 = max(m4 - m2 * m2, 0.0)  # variance of the squared entries
    central2 = max(c2 - c1 * c1, 0.0)
    central4 = c4 - 4 * c1 * c3 + 6 * c1 * c1 * c2 - 3 * c1**4
    kurtosis = central4 / central2**2 - 3.0 if central2 > 0 else float("nan")

    def spread(ms: torch.Tensor, per: int) -> tuple[float, float]:
        values = ms.numpy()  # numpy's pairwise sums: one order on any number of threads
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite matrix: nan statistics, no warning
            mean, sd = float(values.mean()), float(values.std()) if values.size > 1 else 0.0
        cv = sd / mean if mean > 0 else float("nan")
        ratio = sd / math.sqrt(var_x2 / per) if var_x2 > 0 else float("nan")
        return cv, ratio

    row_cv, row_spread = spread(row_ms, cols)
    col_cv, col_spread = spread(col_ms, rows)
    return EntryStats(rows, cols, m2, row_cv, col_cv, row_spread, col_spread, kurtosis)


@dataclass(frozen=True)
class SpectrumFit:
    """Where the spectrum sits against the fitted MP bulk [λ₋, λ₊] = σ̂²(1 ∓ √q)² (RMT.md §1.1, §11)."""

    frac_above: float  # fraction of eigenvalues above λ₊
    frac_below: float  # fraction below λ₋ (0 where there is no soft lower edge)
    n_below: int  # their count
    ks_whole: float  # KS distance of all M eigenvalues to MP(q, σ̂²)


def spectrum_fit(eigenvalues: np.ndarray, N: int, M: int, sigma2: float) -> SpectrumFit:
    """Fractions outside the fitted bulk and the whole-spectrum KS distance (no trimming)."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    if lam.size == 0 or not sigma2 > 0:
        return SpectrumFit(float("nan"), float("nan"), 0, float("nan"))
    law = MarchenkoPastur(M / N, math.sqrt(sigma2))
    above = int(np.count_nonzero(lam > law.upper))
    below = int(np.count_nonzero(lam < law.lower)) if has_lower_edge(N, M) else 0
    F = law.cdf(lam)
    k = np.arange(1, lam.size + 1) / lam.size
    ks = float(max(np.max(k - F), np.max(F - (k - 1.0 / lam.size))))
    return SpectrumFit(above / lam.size, below / lam.size, below, ks)


def kurtosis_limit(rows: int, cols: int) -> float:
    """Excess kurtosis above which the entries count as heavy-tailed: max(KURTOSIS_FLOOR, 8·sqrt(24/(mn)))."""
    return max(KURTOSIS_FLOOR, 8.0 * math.sqrt(24.0 / max(rows * cols, 1)))


def spread_limit(count: int) -> float:
    """Spread ratio above which `count` row (column) mean squares show a variance profile."""
    return max(SPREAD_FLOOR, 1.0 + 6.0 / math.sqrt(2.0 * max(count - 1, 1)))


def left_outlier_limit(M: int) -> int:
    """Eigenvalues below λ₋ tolerated before the noise counts as structured."""
    return max(LEFT_OUTLIERS_FLOOR, int(0.005 * M))


def shape_ks_limit(M: int) -> float:
    """Whole-spectrum KS distance (minus the fraction above λ₊) tolerated."""
    return max(SHAPE_KS_FLOOR, 6.0 / max(M, 1))


def signal_spread(entries: EntryStats, theta4: float, N: int) -> tuple[float, float]:
    """(rows, columns): how much low-rank signal with delocalised singular vectors adds to the squared spread.

    A component d·u·vᵀ with |u_i|² ≈ χ²₁/count on a side of `count` lines, each a mean over `per` entries, adds
    d²u_i²/per to line i's mean square, of variance 2d⁴/(per·count)²; the noise gives Var(x²)/per ≈ (κ+2)σ⁴/per.
    With d = θσ√N (RMT.md §0) the ratio is 2θ⁴N²/((κ+2)·per·count²), summed over the components (θ̂ from the
    BGN inverse map, RMT.md §6.3). Localised signal spreads more than this and still counts as a profile."""
    k2 = entries.excess_kurtosis + 2.0
    if not theta4 > 0 or not _finite(k2) or k2 <= 0:
        return 0.0, 0.0
    rows, cols = entries.rows, entries.cols
    return (2.0 * theta4 * N * N / (k2 * cols * rows * rows), 2.0 * theta4 * N * N / (k2 * rows * cols * cols))


def detected_theta4(singular_values: np.ndarray, shape: tuple[int, int], confidence: float = 0.99) -> float:
    """Σθ̂⁴ over the singular values above the MP/TW edge at `confidence` (BEMA σ̂; θ̂ by the BGN inverse map,
    RMT.md §6.3): the input of `signal_spread` when no analysis row is at hand."""
    s = np.asarray(singular_values, dtype=np.float64)
    big, small = max(shape), min(shape)
    sigma2 = BEMA().fit(s, shape).sigma2_
    if not sigma2 > 0:
        return 0.0
    lam = np.sort(s)[::-1] ** 2 / big
    above = lam[lam > upper_threshold(big, small, sigma2, confidence)]
    theta = signal_strength(np.sqrt(above / sigma2), small / big)
    return float(np.nansum(np.asarray(theta) ** 4))


def _finite(v: float) -> bool:
    return v is not None and math.isfinite(v)


def null_failures(entries: EntryStats | None, fit: SpectrumFit | None, M: int, *, tails: bool = True,
                  profile: bool = True, shape: bool = True, signal: tuple[float, float] = (0.0, 0.0)) -> list[str]:
    """One line per diagnostic that says the null does not describe the matrix, with the value and its limit.

    tails: the null assumes light-tailed (finite-kurtosis, near-Gaussian) entries (MP/TW, biwhitened MP);
    profile: it assumes exchangeable entries, no row or column variance profile (every null here);
    shape: it predicts the MP bulk, so no left outliers and an MP-shaped spectrum (MP, biwhitened MP).
    signal: the squared spread (rows, columns) that the detected signal explains (`signal_spread`), taken off
    before the spread is compared with its limit.
    """
    failures = []
    if entries is not None:
        if tails and _finite(entries.excess_kurtosis):
            limit = kurtosis_limit(entries.rows, entries.cols)
            if entries.excess_kurtosis > limit:
                failures.append(f"heavy-tailed entries: excess kurtosis {entries.excess_kurtosis:.3g} > {limit:.3g}")
        if profile:
            for side, ratio, cv, count, explained in (
                    ("row", entries.row_spread, entries.row_cv, entries.rows, signal[0]),
                    ("column", entries.col_spread, entries.col_cv, entries.cols, signal[1])):
                limit = spread_limit(count)
                if not _finite(ratio):
                    continue
                beyond = math.sqrt(max(ratio * ratio - explained, 0.0))
                if beyond > limit:
                    share = f", {beyond:.3g}x beyond what the signal explains" if explained > 0 else ""
                    failures.append(f"{side} variance profile: {side} mean squares spread {ratio:.3g}x what "
                                    f"i.i.d. entries give{share} (CV {cv:.3g}; limit {limit:.3g}x; signal "
                                    f"concentrated in few {side}s does this too)")
    if fit is not None and shape:
        limit = left_outlier_limit(M)
        if fit.n_below > limit:
            failures.append(f"left outliers: {fit.n_below} eigenvalues ({fit.frac_below:.1%}) below the fitted "
                            f"bulk's lower edge (limit {limit}); additive low-rank signal creates none, unless it "
                            f"is so strong that σ̂ itself is biased up")
        excess = fit.ks_whole - fit.frac_above
        limit = shape_ks_limit(M)
        if _finite(excess) and excess > limit:
            failures.append(f"bulk shape: whole-spectrum KS {fit.ks_whole:.3g} ({fit.ks_whole - fit.frac_above:.3g} "
                            f"beyond the {fit.frac_above:.1%} above the edge) > {limit:.3g}")
    return failures
