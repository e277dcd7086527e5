"""Tracy-Widom law for beta = 1 (TW1): the edge law of real Wishart / GOE matrices.

F1(s) is computed as a Fredholm determinant (RMT.md §2.1):

    F1(s) = det(I - K_s) on L2(s, inf),   K_s(x, y) = 1/2 Ai((x + y)/2)       (Ferrari & Spohn 2005)

With x = s + 2u this is det(I - B_s) on L2(0, inf), B_s(u, v) = Ai(u + v + s), which is what we discretise
with Gauss-Legendre quadrature on the truncated interval [0, U] (Bornemann 2010, Markov Proc. Rel. Fields 16:803):

    F1(s) ~= det(delta_ij - sqrt(w_i) Ai(u_i + u_j + s) sqrt(w_j)).

Accuracy (checked against the RMT.md §2.1 table and by doubling the node count): about 1e-15 absolute in F1,
and about 1e-13 *relative* in the upper tail 1 - F1(s) (computed from the eigenvalues of the discretised
kernel, not as 1 - det), down to 1 - F1 ~ 1e-300. Below s = -8 (F1 < 2e-12) the determinant loses relative
accuracy, so the left-tail asymptotics of Baik, Buckingham & DiFranco (2008),
F1(s) ~ tau1 |s|^(-1/16) exp(-|s|^3/24 - |s|^(3/2)/(3 sqrt 2)), are used instead (relative error ~1e-3 in F1,
~1e-4 in the quantile).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numpy.polynomial.legendre import leggauss
from scipy.optimize import brentq
from scipy.special import airy

__all__ = [
    "TW1",
    "TracyWidom1",
    "tw1_cdf",
    "tw1_isf",
    "tw1_logcdf",
    "tw1_mean",
    "tw1_pdf",
    "tw1_ppf",
    "tw1_sf",
    "tw1_std",
]

_N_NODES = 48
_NODES, _WEIGHTS = leggauss(_N_NODES)
_LEFT_ASYMPTOTIC_BELOW = -8.0
# tau1 = 2^(-11/48) exp(zeta'(-1)/2), zeta'(-1) = 1/12 - ln(Glaisher's constant)  (Baik-Buckingham-DiFranco 2008)
_ZETA_PRIME_MINUS_1 = -0.16542114370045092
_LOG_TAU1 = -11.0 / 48.0 * math.log(2.0) + 0.5 * _ZETA_PRIME_MINUS_1


def _kernel(s: float, derivative: bool = False):
    """Discretised symmetric kernel sqrt(w_i) Ai(u_i+u_j+s) sqrt(w_j) on [0, U] (and its s-derivative)."""
    # Ai(u + s) must be negligible at u = U, relative to Ai(s) in the right tail: U + s >= 16 and U >= 14.
    length = max(14.0, 16.0 - s)
    u = (_NODES + 1.0) * (length / 2.0)
    sqrt_w = np.sqrt(_WEIGHTS * (length / 2.0))
    ai, aip, _, _ = airy(u[:, None] + u[None, :] + s)
    scale = sqrt_w[:, None] * sqrt_w[None, :]
    if derivative:
        return ai * scale, aip * scale
    return ai * scale


@functools.lru_cache(maxsize=4096)
def _log_det(s: float) -> tuple[float, float]:
    """(log F1(s), log(1 - F1(s))) by the Fredholm determinant; s >= the left-asymptotic cut."""
    kernel = _kernel(s)
    if s >= 0.0:
        # Right tail: all eigenvalues mu_i of K are small; log det = sum log1p(-mu_i) keeps relative accuracy.
        mu = np.linalg.eigvalsh(kernel)
        log_cdf = float(np.sum(np.log1p(-mu)))
    else:
        sign, log_cdf = np.linalg.slogdet(np.eye(_N_NODES) - kernel)
        log_cdf = float(log_cdf) if sign > 0 else -math.inf
    log_sf = math.log(-math.expm1(log_cdf)) if log_cdf < 0.0 else -math.inf
    return log_cdf, log_sf


def _log_cdf_left_asymptotic(s: float) -> float:
    """log F1(s) for s -> -inf (Baik, Buckingham & DiFranco 2008, Commun. Math. Phys. 280:463)."""
    a = -s
    return _LOG_TAU1 - math.log(a) / 16.0 - a**3 / 24.0 - a**1.5 / (3.0 * math.sqrt(2.0))


def _scalar_logcdf(s: float) -> float:
    if math.isnan(s):
        return math.nan
    if s == math.inf:
        return 0.0
    if s < _LEFT_ASYMPTOTIC_BELOW:
        return _log_cdf_left_asymptotic(s)
    return _log_det(s)[0]


def _scalar_logsf(s: float) -> float:
    if math.isnan(s):
        return math.nan
    if s == math.inf:
        return -math.inf
    if s < _LEFT_ASYMPTOTIC_BELOW:
        return math.log1p(-math.exp(_log_cdf_left_asymptotic(s)))
    return _log_det(s)[1]


def _scalar_pdf(s: float) -> float:
    """F1'(s) = -F1(s) tr((I - B_s)^{-1} dB_s/ds), dB_s/ds(u, v) = Ai'(u + v + s)  (Bornemann 2010, §4)."""
    if not math.isfinite(s):
        return 0.0 if not math.isnan(s) else math.nan
    if s < _LEFT_ASYMPTOTIC_BELOW:
        a = -s
        dlog = a**2 / 8.0 + math.sqrt(a) / (2.0 * math.sqrt(2.0)) + 1.0 / (16.0 * a)
        return math.exp(_log_cdf_left_asymptotic(s)) * dlog
    kernel, d_kernel = _kernel(s, derivative=True)
    resolvent_term = np.trace(np.linalg.solve(np.eye(_N_NODES) - kernel, d_kernel))
    return -math.exp(_log_det(s)[0]) * float(resolvent_term)


def _vectorise(scalar_fn, x):
    arr = np.asarray(x, dtype=float)
    out = np.array([scalar_fn(float(v)) for v in arr.ravel()], dtype=float).reshape(arr.shape)
    return float(out) if out.ndim == 0 else out


def tw1_logcdf(s):
    """log F1(s), the TW1 log-CDF (Ferrari-Spohn determinant, Bornemann quadrature; RMT.md §2.1). Vectorised."""
    return _vectorise(_scalar_logcdf, s)


def tw1_cdf(s):
    """TW1 CDF F1(s) = det(I - K_s), K_s(x,y) = Ai((x+y)/2)/2 on L2(s,inf) (RMT.md §2.1). Vectorised."""
    return _vectorise(lambda v: math.exp(_scalar_logcdf(v)), s)


def tw1_sf(s):
    """TW1 survival function 1 - F1(s), accurate in relative terms in the upper tail (RMT.md §2.1). Vectorised."""
    return _vectorise(lambda v: math.exp(_scalar_logsf(v)), s)


def tw1_pdf(s):
    """TW1 density F1'(s) (derivative of the Fredholm determinant, Bornemann 2010). Vectorised."""
    return _vectorise(_scalar_pdf, s)


def _bracket(fn, lo: float, hi: float):
    """Expand [lo, hi] until fn changes sign (fn increasing)."""
    while fn(lo) > 0.0:
        lo -= 2.0
    while fn(hi) < 0.0:
        hi += 2.0
    return lo, hi


@functools.lru_cache(maxsize=1024)
def _ppf_scalar(c: float) -> float:
    if c <= 0.5:
        target = math.log(c)
        fn = lambda s: _scalar_logcdf(s) - target
    else:
        target = math.log1p(-c)
        fn = lambda s: target - _scalar_logsf(s)
    lo, hi = _bracket(fn, -4.0, 2.5)
    return float(brentq(fn, lo, hi, xtol=1e-13, rtol=4.0 * np.finfo(float).eps, maxiter=200))


def tw1_ppf(c):
    """TW1 quantile t_c = F1^{-1}(c) for c in (0, 1) by Brent root finding on F1, cached (RMT.md §2.1 table).

    t_0.90 = 0.4501, t_0.95 = 0.9793, t_0.99 = 2.0234. Vectorised; c = 0 gives -inf, c = 1 gives +inf.
    """

    def scalar(v: float) -> float:
        if math.isnan(v) or v < 0.0 or v > 1.0:
            return math.nan
        if v == 0.0:
            return -math.inf
        if v == 1.0:
            return math.inf
        return _ppf_scalar(v)

    return _vectorise(scalar, c)


def tw1_isf(p):
    """TW1 inverse survival function: the t with 1 - F1(t) = p (accurate for small p). Vectorised."""

    def scalar(v: float) -> float:
        if math.isnan(v) or v < 0.0 or v > 1.0:
            return math.nan
        if v == 0.0:
            return math.inf
        if v == 1.0:
            return -math.inf
        if v >= 0.5:
            return _ppf_scalar(1.0 - v)
        return _isf_scalar(v)

    return _vectorise(scalar, p)


@functools.lru_cache(maxsize=1024)
def _isf_scalar(p: float) -> float:
    target = math.log(p)
    fn = lambda s: target - _scalar_logsf(s)
    lo, hi = _bracket(fn, -4.0, 2.5)
    return float(brentq(fn, lo, hi, xtol=1e-13, rtol=4.0 * np.finfo(float).eps, maxiter=200))


@functools.lru_cache(maxsize=1)
def _moments() -> tuple[float, float]:
    """(mean, variance) of TW1 by 80-point Gauss-Legendre quadrature of s^k F1'(s) on [-12, 12] (tails < 1e-30)."""
    nodes, weights = leggauss(80)
    s = 12.0 * nodes
    w = 12.0 * weights * np.array([_scalar_pdf(float(v)) for v in s])
    mean = float(np.sum(w * s))
    var = float(np.sum(w * (s - mean) ** 2))
    return mean, var


def tw1_mean() -> float:
    """Mean of TW1, -1.2065 (RMT.md §2.1), by quadrature of the density."""
    return _moments()[0]


def tw1_std() -> float:
    """Standard deviation of TW1, 1.2680 (RMT.md §2.1), by quadrature of the density."""
    return math.sqrt(_moments()[1])


class TracyWidom1:
    """The TW1 law as a frozen scipy.stats-like object (RMT.md §2.1). Use the module instance `TW1`."""

    def cdf(self, s):
        return tw1_cdf(s)

    def logcdf(self, s):
        return tw1_logcdf(s)

    def sf(self, s):
        return tw1_sf(s)

    def pdf(self, s):
        return tw1_pdf(s)

    def ppf(self, c):
        return tw1_ppf(c)

    def isf(self, p):
        return tw1_isf(p)

    def median(self) -> float:
        return tw1_ppf(0.5)

    def mean(self) -> float:
        return tw1_mean()

    def var(self) -> float:
        return _moments()[1]

    def std(self) -> float:
        return tw1_std()

    def support(self) -> tuple[float, float]:
        return (-math.inf, math.inf)

    def __repr__(self) -> str:
        return "TracyWidom1()"


TW1 = TracyWidom1()
