"""Noise-level (sigma) estimators for W = S + E, E_ij iid with variance sigma^2 (RMT.md §0, §3-§5).

One scikit-learn-like interface: ``est.fit(singular_values, shape)`` returns ``est`` and sets ``sigma_`` (noise std in
raw weight units) and ``sigma2_``. ``singular_values`` are the M = min(shape) singular values of W in any order;
``shape`` is W's (rows, cols). Every estimator is scale-equivariant (sigma(cW) = |c| sigma(W)) and transpose-invariant
(it only sees N = max(shape), M = min(shape)).

* `BEMA`               bulk eigenvalue matching, Ke, Ma & Lin (JASA 2023) Algorithm 1 (RMT.md §3).  Default.
* `GaussianBroadening` least-squares fit of MP to the Gaussian-broadened empirical density (RMT.md §4).
* `MedianMatching`     sigma^2 = median(lambda)/mu_q (Gavish & Donoho 2014; RMT.md §5).

Also the Gavish-Donoho optimal hard threshold (RMT.md §5), implemented from the paper, not from `optht`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy.optimize import minimize_scalar

from spectral.mp import has_lower_edge, lower_threshold, mp_median, mp_quantiles, upper_threshold

__all__ = [
    "BEMA",
    "ESTIMATORS",
    "GaussianBroadening",
    "MedianMatching",
    "NoiseEstimator",
    "gavish_donoho_lambda_star",
    "gavish_donoho_omega",
    "gavish_donoho_rank",
    "gavish_donoho_threshold",
    "make_estimator",
]


def _validate_spectrum(singular_values, shape) -> tuple[np.ndarray, int, int]:
    """Return (s as float64 1-D, N, M) after checking the spectrum against the matrix shape (RMT.md §0)."""
    try:
        rows, cols = (int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be the (rows, cols) of the weight matrix, got {shape!r}") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"matrix dimensions must be positive, got shape {shape!r}")
    big, small = max(rows, cols), min(rows, cols)
    s = np.asarray(singular_values, dtype=np.float64).ravel()
    if s.size != small:
        raise ValueError(
            f"expected min(shape) = {small} singular values for a {rows}x{cols} matrix (economy SVD), got {s.size}"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("singular values contain NaN or infinity")
    if np.any(s < 0.0):
        raise ValueError("singular values must be non-negative")
    return s, big, small


class NoiseEstimator:
    """Base class: ``fit(singular_values, shape) -> self`` sets ``sigma_``, ``sigma2_``, ``q_``, ``n_long_``, ``n_short_``."""

    _param_names: tuple[str, ...] = ()

    def get_params(self) -> dict:
        return {name: getattr(self, name) for name in self._param_names}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def fit(self, singular_values, shape) -> NoiseEstimator:
        """Estimate sigma from the singular values of a weight matrix of the given shape."""
        self._check_params()
        s, big, small = _validate_spectrum(singular_values, shape)
        lam = s * s / big  # canonical spectrum, RMT.md §0
        sigma2 = float(self._fit_sigma2(lam, big, small))
        self.n_long_ = big
        self.n_short_ = small
        self.q_ = small / big
        self.sigma2_ = sigma2
        self.sigma_ = math.sqrt(sigma2)
        return self

    def _check_params(self) -> None:
        pass

    def _fit_sigma2(self, lam: np.ndarray, big: int, small: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def _bema_quantiles(q: float, small: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(k, q_k) for k in K_alpha, q_k = F_MP^{-1}(1 - (k - 1/2)/M; q, 1), cached per (q rounded to 1e-9, M, alpha).

    The k-th largest of M draws sits near the upper (k - 1/2)/M quantile (the midpoint of its probability cell);
    Ke, Ma & Lin's k/M pairing (RMT.md §3, SJD R/BEMA.R) matches every eigenvalue to a quantile half a cell too low,
    which biases sigma^2 up by about 0.8/M relative on pure noise (issue 13; tests/test_noise.py measures it).
    """
    first = max(math.ceil(alpha * small - 1e-9), 1)
    last = math.floor((1.0 - alpha) * small + 1e-9)
    if last < first:
        raise ValueError(f"BEMA needs more singular values: M = {small} leaves no bulk at alpha = {alpha}")
    k = np.arange(first, last + 1)
    quantiles = mp_quantiles(q, 1.0 - (k - 0.5) / small)
    k.setflags(write=False)
    quantiles.setflags(write=False)
    return k, quantiles


class BEMA(NoiseEstimator):
    """Bulk eigenvalue matching, Ke, Ma & Lin 2023 Algorithm 1 (arXiv 2006.00436; code CHuanSite/SJD R/BEMA.R).

    sigma^2 = sum_k q_k lambda_(k) / sum_k q_k^2 over k in [ceil(alpha M), floor((1-alpha) M)], lambda_(k) the
    k-th largest eigenvalue, q_k = F_MP^{-1}(1 - (k - 1/2)/M; q, 1): the paper's algorithm with the midpoint
    quantile pairing instead of its k/M (which biases sigma^2 up by ~0.8/M; RMT.md §3). Also sets the paper's detection threshold
    ``threshold_`` = gamma_+(c = 1 - beta) in lambda units (canonical TW scaling) and ``n_signal_`` = #{lambda > it}.
    """

    _param_names = ("alpha", "beta")

    def __init__(self, alpha: float = 0.2, beta: float = 0.1):
        self.alpha = alpha
        self.beta = beta

    def _check_params(self) -> None:
        if not (0.0 < float(self.alpha) < 0.5):
            raise ValueError(f"BEMA alpha must lie in (0, 0.5), got {self.alpha!r}")
        if not (0.0 < float(self.beta) < 1.0):
            raise ValueError(f"BEMA beta must lie in (0, 1), got {self.beta!r}")

    def _fit_sigma2(self, lam, big, small):
        k, quantiles = _bema_quantiles(round(small / big, 9), small, float(self.alpha))
        descending = np.sort(lam)[::-1]
        matched = descending[k - 1]
        sigma2 = float(quantiles @ matched) / float(quantiles @ quantiles)
        self.threshold_ = upper_threshold(big, small, sigma2, 1.0 - self.beta)
        self.n_signal_ = int(np.count_nonzero(lam > self.threshold_))
        return sigma2


# --------------------------------------------------------------------------------------------------------------
_SQRT_2PI = math.sqrt(2.0 * math.pi)


def _broadened_density(points: np.ndarray, grid: np.ndarray, window: int, total: int) -> np.ndarray:
    """rho_GB(x) = (1/M) sum_i phi((x - b_i)/w_i)/w_i, w_i = (b_{i+a} - b_{i-a})/2 clipped at the ends (RMT.md §4).

    ``points`` sorted ascending; ``total`` = M (not the bulk size, RMT.md §4 step 2).
    """
    k = points.size
    idx = np.arange(k)
    width = (points[np.minimum(idx + window, k - 1)] - points[np.maximum(idx - window, 0)]) / 2.0
    width = np.maximum(width, 1e-12 * points[-1])
    density = np.zeros_like(grid)
    chunk = max(1, 2_000_000 // max(grid.size, 1))
    for start in range(0, k, chunk):
        b = points[start : start + chunk]
        w = width[start : start + chunk]
        z = (grid[:, None] - b[None, :]) / w[None, :]
        density += (np.exp(-0.5 * z * z) / w[None, :]).sum(axis=1)
    return density / (_SQRT_2PI * total)


def _mp_density_lambda(lam: np.ndarray, q: float, sigma2: float) -> np.ndarray:
    lower, upper = sigma2 * (1.0 - math.sqrt(q)) ** 2, sigma2 * (1.0 + math.sqrt(q)) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        val = np.sqrt(np.clip((upper - lam) * (lam - lower), 0.0, None)) / (2.0 * math.pi * sigma2 * q * lam)
    return np.where((lam > lower) & (lam < upper), val, 0.0)


def _mp_density_x(x: np.ndarray, q: float, sigma2: float) -> np.ndarray:
    """f(x) = 2x rho(x^2), written without the 1/x so that q = 1 (quarter circle) is finite at 0 (RMT.md §1.2)."""
    lower2, upper2 = sigma2 * (1.0 - math.sqrt(q)) ** 2, sigma2 * (1.0 + math.sqrt(q)) ** 2
    x2 = x * x
    with np.errstate(invalid="ignore", divide="ignore"):
        if lower2 == 0.0:
            val = np.sqrt(np.clip(upper2 - x2, 0.0, None)) / (math.pi * sigma2 * q)
        else:
            val = np.sqrt(np.clip((upper2 - x2) * (x2 - lower2), 0.0, None)) / (math.pi * sigma2 * q * x)
    return np.where((x2 >= lower2) & (x2 <= upper2), val, 0.0)


SEARCH_LOW, SEARCH_HIGH = 0.2, 5.0  # σ² search interval of the broadening fit, in units of the median start σ₀²


class GaussianBroadening(NoiseEstimator):
    """Fit MP to the Gaussian-broadened spectral density (Bruus & d'Auriac 1997 broadening; RMT.md §4).

    Start from sigma0^2 = median(lambda)/mu_q; with ``trim`` repeat up to 3x: keep the bulk
    {gamma_-(0.9) <= lambda <= gamma_+(0.9)} at sigma0 (the lower cut only where `has_lower_edge`), broaden it with
    local widths w_i = (b_{i+a} - b_{i-a})/2, and pick sigma^2 minimising the squared residual to the MP density on a
    uniform ``grid``-point mesh over the bulk; sigma0 <- the fit. The search interval is [0.2, 5] x the median start
    throughout (a log-spaced scan, then bounded Brent).

    ``space="x"`` (default, every q) broadens and fits the singular values x = s/sqrt(N) against f(x) = 2x rho(x^2),
    which is bounded for every q, including the quarter circle at q = 1 where the lambda-space density has a
    lambda^(-1/2) spike that breaks the fit (RMT.md §4: sigma off by > 2x on square matrices). One space for all q
    keeps the estimator continuous in q; on pure noise it was also the less biased one for q < 1 (mean sigma error
    -0.03% / -0.1% / -0.2% at 1000x4000 / 300x1200 / 500x1000 vs +0.14% / +0.28% / +0.6% for lambda space;
    +0.04% at 768x768). ``space="lambda"`` fits rho(lambda) directly, as RMT.md §9 T5 did; use it only for q < 1.
    Each trimmed bulk keeps at least half the spectrum (``min_bulk_`` says the cuts would have left less).
    Fitted extras: ``sigma2_init_`` (median start), ``bulk_size_`` (eigenvalues in the final fit), ``n_iter_``,
    ``at_bound_`` (a trimming pass whose optimum hit the search bound was discarded: the MP fit is poor there),
    ``min_bulk_``.
    """

    _param_names = ("a", "grid", "trim", "space")

    def __init__(self, a: int = 15, grid: int = 400, trim: bool = True, space: str = "x"):
        self.a = a
        self.grid = grid
        self.trim = trim
        self.space = space

    def _check_params(self) -> None:
        if int(self.a) < 1:
            raise ValueError(f"GaussianBroadening window a must be >= 1, got {self.a!r}")
        if int(self.grid) < 10:
            raise ValueError(f"GaussianBroadening grid must have >= 10 points, got {self.grid!r}")
        if self.space not in ("x", "lambda"):
            raise ValueError(f"GaussianBroadening space must be 'x' or 'lambda', got {self.space!r}")

    def _fit_sigma2(self, lam, big, small):
        q = small / big
        sigma2_0 = float(np.median(lam)) / mp_median(q)
        if sigma2_0 <= 0.0:  # more than half the spectrum is exactly zero; fall back to the Frobenius estimate
            sigma2_0 = float(np.mean(lam))
        self.sigma2_init_ = sigma2_0
        self.n_iter_ = 0
        self.at_bound_ = False
        if sigma2_0 <= 0.0:
            self.bulk_size_ = 0
            return 0.0
        unit = np.sort(lam) / sigma2_0  # work in units of sigma0^2: makes the fit exactly scale-equivariant
        fitted = 1.0  # current sigma^2 in units of sigma0^2
        if not self.trim:
            self.n_iter_ = 1
            self.bulk_size_ = unit.size
            return sigma2_0 * self._fit_bulk(unit, q, small)
        lower_cut_available = has_lower_edge(big, small)
        min_bulk = math.ceil(small / 2)
        self.min_bulk_ = False
        previous = None
        for _ in range(3):
            # unit is ascending, so the bulk between the cuts is the window [first, last)
            first = int(np.searchsorted(unit, lower_threshold(big, small, fitted, 0.9))) if lower_cut_available else 0
            last = int(np.searchsorted(unit, upper_threshold(big, small, fitted, 0.9), side="right"))
            if last - first < min_bulk:
                # the cuts would leave less than half the spectrum: fit the half that starts at the lower cut
                # (shifted down where it would run past the top) rather than a sliver (issue 13: on MiniLM's
                # 30522x384 embedding the unbounded trim ended on 37 of 384 eigenvalues and sigma came out 2.2x low)
                self.min_bulk_ = True
                first = min(first, unit.size - min_bulk)
                last = first + min_bulk
            bulk = unit[first:last]
            if bulk.size < 2:
                break
            if previous is not None and bulk.size == previous.size and np.array_equal(bulk, previous):
                break  # same bulk as the last pass: the fit would be identical
            candidate = self._fit_bulk(bulk, q, small)
            if not SEARCH_LOW * (1 + 1e-6) < candidate < SEARCH_HIGH * (1 - 1e-6):
                # the least-squares optimum sits on the search bound: no MP bulk fits this trimmed spectrum (seen on
                # trained matrices whose trimmed bulk is a small part of M); keep the last interior fit
                self.at_bound_ = True
                break
            fitted = candidate
            previous = bulk
            self.n_iter_ += 1
        self.bulk_size_ = 0 if previous is None else previous.size
        return sigma2_0 * fitted

    def _fit_bulk(self, bulk: np.ndarray, q: float, total: int) -> float:
        """sigma^2 in [0.2, 5] (units of the median start) minimising sum_j (rho_GB(x_j) - rho_MP(x_j))^2 (RMT.md §4).

        The bounds stay fixed around the robust median start rather than following each pass's fit, so a failed
        fit cannot drift by 5x per pass.
        """
        if self.space == "x":
            points = np.sqrt(bulk)
            model = _mp_density_x
        else:
            points = bulk
            model = _mp_density_lambda
        if points[-1] <= points[0]:
            return float(bulk[-1]) / ((1.0 + math.sqrt(q)) ** 2) if bulk[-1] > 0 else 0.0
        mesh = np.linspace(points[0], points[-1], int(self.grid))
        target = _broadened_density(points, mesh, int(self.a), total)

        def residual(log_sigma2: float) -> float:
            diff = target - model(mesh, q, math.exp(log_sigma2))
            return float(diff @ diff)

        # coarse scan on [0.2, 5] (log scale) to land in the right basin, then bounded Brent around the best cell
        lo, hi = math.log(SEARCH_LOW), math.log(SEARCH_HIGH)
        scan = np.linspace(lo, hi, 33)
        values = np.array([residual(v) for v in scan])
        best = int(np.argmin(values))
        left, right = scan[max(best - 1, 0)], scan[min(best + 1, scan.size - 1)]
        result = minimize_scalar(residual, bounds=(left, right), method="bounded", options={"xatol": 1e-10})
        return math.exp(result.x)


# --------------------------------------------------------------------------------------------------------------
class MedianMatching(NoiseEstimator):
    """sigma^2 = median(lambda) / mu_q, mu_q the unit-MP median (Gavish & Donoho 2014; RMT.md §5)."""

    _param_names = ()

    def _fit_sigma2(self, lam, big, small):
        return float(np.median(lam)) / mp_median(small / big)


ESTIMATORS = {"bema": BEMA, "broadening": GaussianBroadening, "median": MedianMatching}


def make_estimator(name: str, **params) -> NoiseEstimator:
    """Instantiate a sigma estimator by its registry name ('bema', 'broadening', 'median') with optional params."""
    try:
        cls = ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown noise estimator {name!r}; valid names: {', '.join(sorted(ESTIMATORS))}") from None
    return cls(**params)


# --------------------------------------------------------------------------------------------------------------
# Gavish-Donoho optimal hard threshold (IEEE TIT 60(8) 2014, arXiv 1305.5870; RMT.md §5)
# --------------------------------------------------------------------------------------------------------------
def _check_aspect(q) -> float:
    q = float(q)
    if not (0.0 < q <= 1.0):
        raise ValueError(f"aspect ratio q = M/N must lie in (0, 1], got {q!r}")
    return q


def gavish_donoho_lambda_star(q: float) -> float:
    """lambda*(q) = sqrt(2(q+1) + 8q / ((q+1) + sqrt(q^2 + 14q + 1))), known-sigma coefficient (GD 2014 eq. 11)."""
    q = _check_aspect(q)
    return math.sqrt(2.0 * (q + 1.0) + 8.0 * q / ((q + 1.0) + math.sqrt(q * q + 14.0 * q + 1.0)))


def gavish_donoho_omega(q: float) -> float:
    """omega(q) = lambda*(q) / sqrt(mu_q), exact with the unit-MP median mu_q (GD 2014; RMT.md §5)."""
    return gavish_donoho_lambda_star(q) / math.sqrt(mp_median(_check_aspect(q)))


def gavish_donoho_threshold(singular_values, shape, sigma: float | None = None) -> float:
    """GD hard threshold tau in raw singular-value units (RMT.md §5).

    Known sigma: tau = lambda*(q) sqrt(N) sigma (N the larger dimension); unknown: tau = omega(q) median(s).
    """
    s, big, small = _validate_spectrum(singular_values, shape)
    q = small / big
    if sigma is not None:
        sigma = float(sigma)
        if not (sigma >= 0.0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be non-negative and finite, got {sigma!r}")
        return gavish_donoho_lambda_star(q) * math.sqrt(big) * sigma
    return gavish_donoho_omega(q) * float(np.median(s))


def gavish_donoho_rank(singular_values, shape, sigma: float | None = None) -> int:
    """rank_GD = #{i : s_i > tau} with the GD threshold (RMT.md §5); 0 is a valid answer."""
    tau = gavish_donoho_threshold(singular_values, shape, sigma)
    return int(np.count_nonzero(np.asarray(singular_values, dtype=np.float64) > tau))
