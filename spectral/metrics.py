"""Per-matrix metrics computed from the singular values alone (RMT.md §7).

Every function takes the singular values ``s`` of one matrix in raw weight units, in any order, as a 1-D array-like
of finite, non-negative numbers (a ``ValueError`` otherwise), and sorts internally where order matters. The energy
of component i is e_i = s_i².

The all-zero (or empty) spectrum has no energy. Norms and rank-like counts are 0 there (the zero matrix has rank 0):
``spectral_norm``, ``frobenius_norm``, ``energy_rank``, ``utilization``, ``participation_ratio``, ``stable_rank``,
``entropy_effective_rank``. Quantities that are ratios of energies are undefined and return nan:
``cumulative_energy`` (an array of nan), ``ww_matrix_entropy``, ``truncation_relative_error``. ``utilization`` of an
empty spectrum (M = 0) is nan.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "ENERGY_RTOL",
    "cumulative_energy",
    "energy_rank",
    "entropy_effective_rank",
    "frobenius_norm",
    "participation_ratio",
    "spectral_norm",
    "stable_rank",
    "truncation_relative_error",
    "utilization",
    "ww_matrix_entropy",
]

# A cumulative energy fraction within this relative distance of p counts as reaching p. It absorbs the rounding of
# a cumulative sum over a few thousand terms (~M·eps), so p = 1 and exact ties (e.g. s = [1, 1], p = 0.5) give the
# rank a hand computation gives; energy differences below 1e-12 of the total are not meaningful in float64 anyway.
ENERGY_RTOL = 1e-12


def _singular_values(s) -> np.ndarray:
    """Validate and return ``s`` as a float64 1-D array sorted descending."""
    arr = np.asarray(s, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"singular values must be a 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("singular values must be finite (found NaN or Inf)")
    if np.any(arr < 0):
        raise ValueError(f"singular values must be non-negative (min {arr.min():g})")
    return np.sort(arr)[::-1]


def _energies(s) -> np.ndarray:
    """e_i = s_i², sorted descending; computed on s scaled by s_1 so that tiny or huge weights neither under- nor
    overflow (every metric below that uses energies is scale-free or rescaled back)."""
    sv = _singular_values(s)
    if sv.size == 0 or sv[0] == 0.0:
        return np.zeros_like(sv)
    x = sv / sv[0]
    return x * x


def spectral_norm(s) -> float:
    """‖W‖₂ = s₁ (RMT.md §7)."""
    sv = _singular_values(s)
    return float(sv[0]) if sv.size else 0.0


def frobenius_norm(s) -> float:
    """‖W‖_F = sqrt(Σ s_i²) (RMT.md §7)."""
    sv = _singular_values(s)
    if sv.size == 0 or sv[0] == 0.0:
        return 0.0
    return float(sv[0] * np.sqrt(np.sum((sv / sv[0]) ** 2)))


def cumulative_energy(s) -> np.ndarray:
    """C_k = Σ_{i≤k} s_i² / Σ_i s_i², k = 1..M, s sorted descending (RMT.md §7, energy rank); the last entry is
    exactly 1. All-nan for the zero spectrum."""
    e = _energies(s)
    c = np.cumsum(e)
    if c.size == 0 or c[-1] == 0.0:
        return np.full(e.shape, np.nan)
    return c / c[-1]


def energy_rank(s, p: float = 0.999) -> int:
    """r_p = min{k : Σ_{i≤k} s_i² ≥ p Σ_i s_i²}, 0 < p ≤ 1 (RMT.md §7; default p = 0.999 [D]).

    Fractions within ``ENERGY_RTOL`` of p count as reaching it, so ties and p = 1 are exact; components holding less
    than 1e-12 of the energy are therefore not counted at p = 1. Returns 0 for the zero spectrum.
    """
    p = float(p)
    if not (0.0 < p <= 1.0):
        raise ValueError(f"energy fraction p must be in (0, 1], got {p}")
    c = cumulative_energy(s)
    if c.size == 0 or np.isnan(c[-1]):
        return 0
    # c is non-decreasing and c[-1] == 1 >= p - tol, so the search always lands inside the array.
    return int(np.searchsorted(c, p - ENERGY_RTOL, side="left")) + 1


def utilization(s, p: float = 0.999) -> float:
    """r_p / M, the fraction of the rank needed to hold the fraction p of the energy (RMT.md §7); M = len(s).
    0 for the zero spectrum, nan for an empty one."""
    sv = _singular_values(s)
    if sv.size == 0:
        return float("nan")
    return energy_rank(sv, p) / sv.size


def participation_ratio(s) -> float:
    """PR = (Σ e_i)² / Σ e_i², e_i = s_i² (RMT.md §7). Scale-free; 1 ≤ PR ≤ M, 0 for the zero spectrum."""
    e = _energies(s)
    total = e.sum()
    if total == 0.0:
        return 0.0
    return float(total * total / np.sum(e * e))


def stable_rank(s) -> float:
    """‖W‖_F² / ‖W‖₂² = Σ e_i / e₁ (RMT.md §7; WeightWatcher `RMT_Util.stable_rank`). 0 for the zero spectrum."""
    e = _energies(s)
    if e.size == 0 or e[0] == 0.0:
        return 0.0
    return float(e.sum() / e[0])


def entropy_effective_rank(s) -> float:
    """erank = exp(−Σ p_i ln p_i), p_i = s_i / Σ_j s_j, on s not s² (Roy & Vetterli 2007, EUSIPCO; RMT.md §7).
    0·ln 0 = 0; 1 ≤ erank ≤ rank; 0 for the zero spectrum."""
    sv = _singular_values(s)
    total = sv.sum()
    if total == 0.0:
        return 0.0
    p = sv / total
    p = p[p > 0]  # 0·ln 0 = 0 (also for values that underflow to 0 after division)
    return float(np.exp(-np.sum(p * np.log(p))))


def ww_matrix_entropy(s, n: int | None = None) -> float:
    """WeightWatcher matrix entropy −Σ p_i ln p_i / ln(rank), p_i = s_i²/Σ s_j² (WW `RMT_Util.matrix_entropy`;
    RMT.md §7).

    rank = #{s_i > s₁ · n · eps} as in WW `matrix_rank`, where WW's n is the larger matrix dimension N; pass it for
    exact parity (default len(s)). 0·ln 0 = 0. A rank-≤1 spectrum has entropy 0 and returns 0.0 (WW divides by
    ln 1.000001 instead). nan for the zero spectrum.
    """
    sv = _singular_values(s)
    if sv.size == 0 or sv[0] == 0.0:
        return float("nan")
    n_dim = sv.size if n is None else int(n)
    rank = int(np.count_nonzero(sv > sv[0] * n_dim * np.finfo(np.float64).eps))
    if rank <= 1:
        return 0.0
    e = _energies(sv)
    p = e / e.sum()
    p = p[p > 0]  # 0·ln 0 = 0
    return float(-np.sum(p * np.log(p)) / np.log(rank))


def truncation_relative_error(s, k: int) -> float:
    """‖W − W_k‖_F / ‖W‖_F = sqrt(Σ_{i>k} s_i² / Σ_i s_i²) for the best rank-k approximation W_k (Eckart–Young;
    RMT.md §6.6). k ≥ M gives 0; nan for the zero spectrum."""
    k = int(k)
    if k < 0:
        raise ValueError(f"kept rank k must be non-negative, got {k}")
    e = _energies(s)
    total = e.sum()
    if total == 0.0:
        return float("nan")
    # Sum the discarded tail directly (smallest first) rather than 1 − C_k, which cancels catastrophically.
    tail = np.sum(e[k:][::-1])
    return float(np.sqrt(min(tail / total, 1.0)))
