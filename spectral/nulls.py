"""Which noise model "signal" is measured against: the i.i.d. MP null and two that survive its failures (RMT.md §11).

- `mp`: W's own spectrum against Marchenko-Pastur with Tracy-Widom edges (RMT.md §2). Assumes i.i.d. light-tailed
  entries.
- `biwhitened`: D₁WD₂, with positive diagonal D₁, D₂ found by Sinkhorn-Knopp on the entry squares so that every row
  and every column of D₁WD₂ has the same mean square (Landa, Zhang & Kluger 2022, SIAM J. Math. Data Sci. 4:1420),
  against MP/TW. Removes row and column variance profiles; keeps low-rank signal (rank is invariant under diagonal
  scaling). Heavy tails remain.
- `permutation`: seeded shuffles of W's own entries (keeps the entry law, heavy tails included, destroys all
  structure). Each shuffle's spectrum is rescaled so that its bulk matches W's (both σ̂² by BEMA), which removes the
  inflation of the shuffles' scale by W's own signal energy ("shadowing", Dobriban & Owen 2019, JRSS-B 81:163); the
  rescaled largest eigenvalues give an empirical upper edge and a p-value per singular value. Handles heavy tails,
  not variance profiles (a shuffle destroys the profile too).

The functions here are pure (same inputs, same outputs, any machine), so a distributed map can call them on workers:
`biwhitened_spectrum(matrix)`, `permutation_null(matrix, singular_values)`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from spectral.diagnostics import EntryStats, detected_theta4, entry_statistics, signal_spread
from spectral.noise import BEMA
from spectral.spectra import singular_values as _singular_values
from spectral.tracy_widom import tw1_mean, tw1_std

__all__ = [
    "DEFAULT_SHUFFLES",
    "NULLS",
    "Biwhitened",
    "PermutationNull",
    "biwhitened_spectrum",
    "permutation_null",
    "shrink_scaling",
    "sinkhorn_scaling",
]

NULLS = ("mp", "biwhitened", "permutation")
# Shuffles of the permutation null. With B shuffles the fitted 99% edge behaves like a prediction bound from B
# draws (for normal maxima P(exceed) = P(t_{B−1} > 2.55/sqrt(1 + 1/B)) ≈ 0.9% at B = 32, 1.3% at B = 16); the
# simulated rates are in bench/bench_nulls.py. Each shuffle costs one permutation of the entries and one Gram
# eigendecomposition: 32 shuffles of a 768×3072 matrix took 7.6 s on 2 busy cores, 2.5× one float64
# torch.linalg.svdvals of it (3.1 s) and 55× the Gram-route singular values the analysis uses.
DEFAULT_SHUFFLES = 32
SINKHORN_TOL = 1e-6  # stop when every row and column mean square is within this relative distance of the target
SINKHORN_MAX_ITER = 1000

Fraction = Callable[[float], None]


# ------------------------------------------------------------------------------------------------------ biwhitened

def sinkhorn_scaling(matrix: torch.Tensor, *, tol: float = SINKHORN_TOL, max_iter: int = SINKHORN_MAX_ITER
                     ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """(d₁, d₂, iterations, converged): positive scalings with D₁WD₂ having every row and column mean square equal to
    W's overall mean square ‖W‖_F²/(mn). Sinkhorn-Knopp on A = W∘W (Landa, Zhang & Kluger 2022, with the entry
    squares as the variance estimate): x ← r/(Ay), y ← c/(Aᵀx), d₁ = √x, d₂ = √y. Rows or columns that are
    entirely zero get scale 0 and are left out of the targets."""
    w = matrix.detach().to(device="cpu", dtype=torch.float64)
    rows, cols = w.shape
    a = w * w
    live_rows = a.sum(dim=1) > 0
    live_cols = a.sum(dim=0) > 0
    n_rows, n_cols = int(live_rows.sum()), int(live_cols.sum())
    mean_square = float(a.sum()) / max(n_rows * n_cols, 1)
    x = torch.zeros(rows, dtype=torch.float64)
    y = torch.zeros(cols, dtype=torch.float64)
    if n_rows == 0 or n_cols == 0 or mean_square == 0.0:
        return x, y, 0, True
    a = a[live_rows][:, live_cols]
    row_target = n_cols * mean_square  # row sums of squares of D₁WD₂
    col_target = n_rows * mean_square
    xs = torch.ones(n_rows, dtype=torch.float64)
    ys = torch.ones(n_cols, dtype=torch.float64)
    converged, iteration = False, 0
    for iteration in range(1, max_iter + 1):
        xs = row_target / (a @ ys)
        ys = col_target / (a.T @ xs)
        # column sums are now exact; the row sums say how far the scaling still is from balanced
        error = float(torch.max(torch.abs(xs * (a @ ys) / row_target - 1.0)))
        if error < tol:
            converged = True
            break
    x[live_rows] = xs
    y[live_cols] = ys
    return x.sqrt(), y.sqrt(), iteration, converged


@dataclass(frozen=True)
class Biwhitened:
    """The spectrum of D₁WD₂ (biwhitened null) and what the scaling did."""

    singular_values: np.ndarray  # of D₁WD₂, descending, float64; in W's units (same overall mean square)
    entries: EntryStats  # of D₁WD₂: row and column spreads near 1 (i.i.d.-like) by construction, kurtosis remains
    iterations: int  # Sinkhorn-Knopp iterations
    converged: bool
    row_scale_ratio: float  # max(d₁)/min(d₁) over live rows: how uneven the rows were
    col_scale_ratio: float
    zero_lines: int  # all-zero rows plus columns, left at zero


def shrink_scaling(d: torch.Tensor, spread: float, explained: float = 0.0) -> torch.Tensor:
    """d^(1 − 1/F) with F = spread² − explained (the ANOVA ratio of `EntryStats`, less the share that detected
    low-rank signal explains, `diagnostics.signal_spread`): the Sinkhorn scaling shrunk towards 1 by the share of
    the line mean squares' spread that their own sampling noise explains (the empirical-Bayes, James-Stein, weight
    of a variance estimate). Landa, Zhang & Kluger scale by a known variance model; estimated from W's own entry
    squares, the full scaling would also remove the natural sampling spread of row norms that MP/TW includes, and
    the spread that the signal itself puts into them, and with both part of weak spikes (three planted spikes at
    1.2-3.5× the BBP threshold in 1000×2000 noise: all found in 86% of seeds with the full scaling, 93% under MP).
    Under i.i.d. entries F ≈ 1 and the scaling vanishes; under a Gamma(4, 1/4) profile F ≈ 30-100 and it is kept
    to within 1-3%."""
    f = spread * spread - explained if math.isfinite(spread) else float("nan")
    if not math.isfinite(f) or f <= 1.0:
        return torch.where(d > 0, torch.ones_like(d), d)
    weight = 1.0 - 1.0 / f
    live = d > 0
    out = d.clone()
    out[live] = d[live] ** weight
    return out


def biwhitened_spectrum(matrix: torch.Tensor, singular_values: np.ndarray | None = None, *,
                        tol: float = SINKHORN_TOL, max_iter: int = SINKHORN_MAX_ITER,
                        progress: Fraction | None = None) -> Biwhitened:
    """Singular values and entry statistics of the biwhitened matrix D₁WD₂ (`sinkhorn_scaling`, each scaling shrunk
    by `shrink_scaling`; then one scalar so that D₁WD₂ keeps W's overall mean square). With W's own
    `singular_values`, the spread its detected signal explains is left out of the shrinkage weights."""
    w = matrix.detach().to(device="cpu", dtype=torch.float64)
    d1, d2, iterations, converged = sinkhorn_scaling(w, tol=tol, max_iter=max_iter)
    own = entry_statistics(w)
    explained = (0.0, 0.0)
    if singular_values is not None:
        explained = signal_spread(own, detected_theta4(singular_values, tuple(w.shape)), max(w.shape))
    d1 = shrink_scaling(d1, own.row_spread, explained[0])
    d2 = shrink_scaling(d2, own.col_spread, explained[1])
    if progress:
        progress(0.3)
    scaled = w * d1[:, None] * d2[None, :]
    norm = float((scaled * scaled).sum())
    if norm > 0:
        scaled *= math.sqrt(float((w * w).sum()) / norm)
    entries = entry_statistics(scaled)
    s = _singular_values(scaled)
    if progress:
        progress(1.0)

    def ratio(d: torch.Tensor) -> float:
        live = d[d > 0]
        return float(live.max() / live.min()) if live.numel() else float("nan")

    zero = int((d1 == 0).sum() + (d2 == 0).sum())
    return Biwhitened(s, entries, iterations, converged, ratio(d1), ratio(d2), zero)


# ----------------------------------------------------------------------------------------------------- permutation

@dataclass(frozen=True)
class PermutationNull:
    """Extreme eigenvalues of `shuffles` shuffles of W's entries, each rescaled to W's bulk (σ̂² by BEMA).

    The edge is the Tracy-Widom law fitted to the shuffles by its mean and standard deviation: s₊ = sd(λ₁ᵇ)/sd(TW1),
    μ₊ = mean(λ₁ᵇ) − mean(TW1)·s₊, so z = (λ − μ₊)/s₊ has exactly the form of the MP z-score (RMT.md §2.4) and
    z > t_c means "above the null's c-quantile" as under MP; under i.i.d. Gaussian entries (μ₊, s₊) estimate the
    TW centring and scale. `p_values` are the plain permutation p-values (1 + #{b: λ₁ᵇ ≥ λ})/(B + 1).

    The analysis' edge is the larger of that TW quantile and the largest λ₁ᵇ (the smaller of the lower quantile and
    the smallest λ_Mᵇ): under exchangeable entries W is one more shuffle, so an eigenvalue above every shuffle's is a
    false positive with probability ≤ 1/(B + 1) whatever the entry law, where the two-moment TW fit alone
    under-covers the heavier upper tail of λ₁ under heavy-tailed entries (Student-t, df 3-5: 5-10% instead of 1%).
    """

    shuffles: int
    seed: int
    top: np.ndarray  # λ₁ = s₁²/N of each shuffle, rescaled
    bottom: np.ndarray  # λ_M of each shuffle, rescaled
    scale: np.ndarray  # the rescaling σ̂²(W)/σ̂²(shuffle) applied to each shuffle

    def upper(self) -> tuple[float, float]:
        """(μ₊, s₊) of the fitted TW1 law of the largest eigenvalue under the null."""
        return _tw_fit(self.top, upper=True)

    def lower(self) -> tuple[float, float]:
        """(μ₋, s₋) with (μ₋ − λ_M)/s₋ ~ TW1 fitted to the shuffles' smallest eigenvalues."""
        return _tw_fit(self.bottom, upper=False)

    def p_values(self, eigenvalues: np.ndarray) -> np.ndarray:
        """Permutation p-value of each eigenvalue against the shuffles' largest: (1 + #{λ₁ᵇ ≥ λ})/(B + 1)."""
        top = np.sort(self.top)
        lam = np.asarray(eigenvalues, dtype=np.float64)
        exceed = top.size - np.searchsorted(top, lam, side="left")
        return (1.0 + exceed) / (top.size + 1.0)


def _tw_fit(values: np.ndarray, *, upper: bool) -> tuple[float, float]:
    mean = float(np.mean(values))
    sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    scale = max(sd / tw1_std(), 1e-12 * abs(mean), np.finfo(float).tiny)
    location = mean - tw1_mean() * scale if upper else mean + tw1_mean() * scale
    return location, scale


THREADED_EIG_MIN = 1024  # from this short side up, a shuffle's eigenproblem runs in torch on every core


def _gram_eigenvalues(w: torch.Tensor) -> np.ndarray:
    """s_i² of a float64 matrix, descending, from the M×M Gram (RMT.md §8). The Gram product runs in torch (all
    cores); an eigenproblem below THREADED_EIG_MIN in numpy's LAPACK on one thread, which stays fast when other
    processes load the machine (torch's two-thread eigvalsh of a 768×768 Gram was seen 20× slower than numpy's
    under load), a bigger one in torch, where the threads pay."""
    rows, cols = w.shape
    gram = w @ w.T if rows <= cols else w.T @ w
    if gram.shape[0] >= THREADED_EIG_MIN:
        eig = torch.linalg.eigvalsh(gram).numpy()
    else:
        eig = np.linalg.eigvalsh(gram.numpy())
    return np.clip(eig[::-1], 0.0, None)


def permutation_null(matrix: torch.Tensor, singular_values: np.ndarray, *, shuffles: int = DEFAULT_SHUFFLES,
                     seed: int = 0, progress: Fraction | None = None) -> PermutationNull:
    """The permutation null of one matrix: `shuffles` seeded uniform shuffles of its entries (numpy PCG64 from
    `seed`), each one's eigenvalues by the Gram route, rescaled by σ̂²_BEMA(W)/σ̂²_BEMA(shuffle).
    `singular_values` are W's own (for its σ̂²)."""
    if shuffles < 2:
        raise ValueError(f"the permutation null needs at least 2 shuffles, got {shuffles}")
    w = matrix.detach().to(device="cpu", dtype=torch.float64)
    rows, cols = w.shape
    big = max(rows, cols)
    sigma2_w = BEMA().fit(singular_values, (rows, cols)).sigma2_
    flat = w.reshape(-1).numpy()
    rng = np.random.default_rng(seed)
    top, bottom, scale = np.empty(shuffles), np.empty(shuffles), np.empty(shuffles)
    for b in range(shuffles):
        s2 = _gram_eigenvalues(torch.from_numpy(rng.permutation(flat).reshape(rows, cols)))
        sigma2_b = BEMA().fit(np.sqrt(s2), (rows, cols)).sigma2_
        scale[b] = sigma2_w / sigma2_b if sigma2_b > 0 else 1.0
        top[b] = s2[0] / big * scale[b]
        bottom[b] = s2[-1] / big * scale[b]
        if progress:
            progress((b + 1) / shuffles)
    return PermutationNull(shuffles, seed, top, bottom, scale)

