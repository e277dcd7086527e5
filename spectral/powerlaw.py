"""WeightWatcher-style power-law fit of an empirical spectral density (RMT.md §7, "WeightWatcher α").

Continuous maximum-likelihood α with the lower cut-off x_min chosen by minimising the Kolmogorov–Smirnov distance,
as in Clauset, Shalizi & Newman 2009 (SIAM Rev. 51:661) and the `powerlaw` package / WeightWatcher `WWFit`.
The scan over every candidate x_min is vectorised: α for all candidates from one reversed cumulative sum of ln x,
the KS distances in row blocks of the (candidate × tail point) triangle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["PowerLawFit", "fit_power_law"]

# Number of matrix elements (candidates × tail points) evaluated per block of the KS scan; small enough to stay in
# cache, large enough that numpy's per-call overhead is negligible.
_BLOCK_ELEMENTS = 1 << 17
_LOG_TINY = -700.0


@dataclass(frozen=True)
class PowerLawFit:
    """Result of `fit_power_law`; every float is nan and ``n_tail`` is 0 when no x_min candidate exists."""

    alpha: float  # MLE exponent of the tail density p(x) ∝ x^(−α), x ≥ x_min
    xmin: float  # selected lower cut-off (a data value)
    ks_distance: float  # KS distance D between the tail's empirical CDF and the fitted power law
    sigma_alpha: float  # standard error (α − 1)/sqrt(n_tail)
    n_tail: int  # number of data points ≥ x_min

    @property
    def D(self) -> float:
        """Alias of ``ks_distance`` in CSN's notation."""
        return self.ks_distance


_NO_FIT = PowerLawFit(alpha=math.nan, xmin=math.nan, ks_distance=math.nan, sigma_alpha=math.nan, n_tail=0)


def fit_power_law(esd, xmin_range: tuple[float | None, float | None] | None = None) -> PowerLawFit:
    """CSN continuous power-law fit with KS-selected x_min (Clauset–Shalizi–Newman 2009; RMT.md §7).

    With the data sorted ascending x_1 ≤ … ≤ x_n, for each candidate x_min = x_j (distinct values except the largest)
    and tail size k = #{x ≥ x_j}:
        α_j = 1 + k / Σ_{x_i ≥ x_j} ln(x_i / x_j)
        D_j = max_{x_i ≥ x_j} |1 − (x_i/x_j)^{1−α_j} − #{tail points < x_i}/k|     (`powerlaw` convention)
    and the fit is the candidate with the smallest D (the smallest x_min on ties), σ_α = (α − 1)/√k.

    ``esd`` is any 1-D array-like, e.g. the eigenvalues s_i² (α is scale-free). Non-finite and non-positive values
    are dropped (ln x is undefined there). ``xmin_range = (lo, hi)`` restricts the candidates to lo ≤ x_min ≤ hi
    (either end may be None), e.g. WeightWatcher's ``xmin_peak`` window. Returns a fit of nan (n_tail 0) when fewer
    than two distinct positive values remain or no candidate lies in the range.
    """
    x = np.asarray(esd, dtype=np.float64).ravel()
    x = np.sort(x[np.isfinite(x) & (x > 0)])
    n = x.size
    if n < 2:
        return _NO_FIT

    log_x = np.log(x)
    # Index of the first occurrence of each value: #{points < x_i} = first[i] (handles ties as `powerlaw` does).
    first = np.searchsorted(x, x, side="left")
    is_first = first == np.arange(n)
    candidates = np.flatnonzero(is_first & (x < x[-1]))  # every distinct value except the largest
    if xmin_range is not None:
        lo, hi = xmin_range
        keep = np.ones(candidates.size, dtype=bool)
        if lo is not None:
            keep &= x[candidates] >= lo
        if hi is not None:
            keep &= x[candidates] <= hi
        candidates = candidates[keep]
    if candidates.size == 0:
        return _NO_FIT

    # α_j from a reversed cumulative sum: Σ_{i≥j} ln x_i − k_j ln x_j. Logs are taken relative to the largest value
    # and summed from the top, so short tails (where the difference is small) carry only their own rounding.
    shifted = log_x - log_x[-1]
    tail_log_sum = np.cumsum(shifted[::-1])[::-1]  # Σ_{i≥j} shifted_i
    k = (n - candidates).astype(np.float64)
    log_ratio_sum = tail_log_sum[candidates] - k * shifted[candidates]
    alpha = 1.0 + k / log_ratio_sum

    ks = _ks_distances(log_x, first.astype(np.float64), candidates, alpha, k)

    best = int(np.argmin(ks))
    a, kk = float(alpha[best]), int(k[best])
    return PowerLawFit(alpha=a, xmin=float(x[candidates[best]]), ks_distance=float(ks[best]),
                       sigma_alpha=(a - 1.0) / math.sqrt(kk), n_tail=kk)


def _ks_distances(log_x: np.ndarray, first: np.ndarray, candidates: np.ndarray, alpha: np.ndarray,
                  k: np.ndarray) -> np.ndarray:
    """D_j for every candidate j, evaluated block by block over the triangle {(j, i) : i ≥ j}.

    With k_j = n − j, |F_fit − F_emp| = |1 − (x_i/x_j)^{1−α_j} − (first_i − j)/k_j| = |(x_i/x_j)^{1−α_j} − c_i/k_j|
    where c_i = n − first_i, so the empirical part is an outer product and each element costs one exp.
    """
    n = log_x.size
    remaining = n - first  # c_i = #{points ≥ x_i}
    ks = np.empty(candidates.size)
    start = 0
    with np.errstate(over="ignore", invalid="ignore"):
        while start < candidates.size:
            width = n - int(candidates[start])
            rows = max(8, _BLOCK_ELEMENTS // width)
            block = slice(start, min(start + rows, candidates.size))
            cj = candidates[block]
            exponent = (1.0 - alpha[block])[:, None]  # < 0
            inv_k = (1.0 / k[block])[:, None]
            # Rectangle: columns i ≥ the block's last candidate, in every row's tail.
            j_last = int(cj[-1])
            ks[block] = _abs_gap(log_x[j_last:], remaining[j_last:], log_x[cj], exponent, inv_k).max(axis=1)
            # Triangle: columns between the block's first and last candidate, masked to each row's own tail.
            j_first = int(cj[0])
            if j_last > j_first:
                gap = _abs_gap(log_x[j_first:j_last], remaining[j_first:j_last], log_x[cj], exponent, inv_k)
                gap[np.arange(j_first, j_last)[None, :] < cj[:, None]] = 0.0
                np.maximum(ks[block], gap.max(axis=1), out=ks[block])
            start = block.stop
    return ks


def _abs_gap(log_xi: np.ndarray, remaining_i: np.ndarray, log_xj: np.ndarray, exponent: np.ndarray,
             inv_k: np.ndarray) -> np.ndarray:
    """|(x_i/x_j)^{1−α_j} − c_i/k_j| for rows j (column vectors) and columns i."""
    t = np.subtract(log_xi[None, :], log_xj[:, None])
    np.multiply(t, exponent, out=t)
    np.maximum(t, _LOG_TINY, out=t)  # exp underflows to subnormals ~10x slower; exp(−700) is 0 here anyway
    np.exp(t, out=t)
    t -= remaining_i[None, :] * inv_k
    return np.abs(t, out=t)

