"""The Marchenko-Pastur law and the Tracy-Widom edge scaling, in canonical units (RMT.md §0-§2).

Conventions (RMT.md §0): W is m x n, N = max(m, n), M = min(m, n), q = M/N in (0, 1]; the canonical spectrum is
lambda_i = s_i^2 / N (the M eigenvalues of the M x M Gram divided by N), x_i = s_i / sqrt(N).

* `MarchenkoPastur(q, sigma)`         law of lambda (pdf, cdf, ppf, ... scipy.stats-like, frozen).
* `MarchenkoPasturSingular(q, sigma)` law of x = sqrt(lambda).
* edge helpers: `upper_edge_location_scale`, `lower_edge_location_scale`, `upper_threshold`, `lower_threshold`,
  `has_lower_edge` (RMT.md §2.2-§2.5), all in canonical lambda units.

The CDF has no closed form we rely on: it is the integral of rho after the substitution
lambda = lambda_- + (lambda_+ - lambda_-) sin^2 t, which makes the integrand smooth on t in [0, pi/2] even at the
q = 1 hard edge (RMT.md §1.6). The integral is tabulated once per q (q rounded to 1e-9) on 2e4 uniform t-nodes with
5-point Gauss-Legendre per panel, and interpolated with cubic Hermite polynomials (values and exact derivatives at
the nodes), so cdf and ppf are accurate to ~1e-13.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numpy.polynomial.legendre import leggauss

from spectral.tracy_widom import tw1_ppf

__all__ = [
    "EDGE_VARIANTS",
    "MarchenkoPastur",
    "MarchenkoPasturSingular",
    "has_lower_edge",
    "lower_edge_location_scale",
    "lower_threshold",
    "mp_median",
    "mp_quantiles",
    "upper_edge_location_scale",
    "upper_threshold",
]

_GRID_PANELS = 20_000
_Q_DECIMALS = 9

# (N', M') = (N - dN, M - dM) for each centring/scaling variant (RMT.md §2.2).
EDGE_VARIANTS = {"canonical": (0.0, 0.0), "johnstone": (1.0, 0.0), "ma": (0.5, 0.5)}


# ----------------------------------------------------------------------------------------------------------------
# unit-MP grid in the sin^2 variable, cached per q
# ----------------------------------------------------------------------------------------------------------------
def _check_q(q) -> float:
    q = float(q)
    if not (0.0 < q <= 1.0) or math.isnan(q):
        raise ValueError(f"aspect ratio q = M/N must lie in (0, 1], got {q!r}")
    return q


def _q_key(q: float) -> float:
    return round(float(q), _Q_DECIMALS)


def _unit_edges(q: float) -> tuple[float, float]:
    r = math.sqrt(q)
    return (1.0 - r) ** 2, (1.0 + r) ** 2


def _density_in_t(t: np.ndarray, q: float) -> np.ndarray:
    """g(t) = rho(lambda(t)) dlambda/dt = (b-a)^2 sin^2 t cos^2 t / (pi q lambda(t)), unit sigma (RMT.md §1.6)."""
    a, b = _unit_edges(q)
    width = b - a
    sin2 = np.sin(t) ** 2
    cos2 = np.cos(t) ** 2
    if a == 0.0:  # q = 1: sin^2 t / lambda(t) = 1/b, the lambda^(-1/2) spike is gone
        ratio = np.full_like(sin2, 1.0 / b)
    else:
        ratio = sin2 / (a + width * sin2)
    return width**2 * ratio * cos2 / (math.pi * q)


@dataclass(frozen=True)
class _UnitGrid:
    q: float
    lower: float  # lambda_-(q, sigma = 1)
    upper: float  # lambda_+(q, sigma = 1)
    step: float  # uniform spacing of t
    t: np.ndarray  # nodes, 0 .. pi/2
    cdf: np.ndarray  # G(t_i) = F(lambda(t_i))
    dcdf: np.ndarray  # g(t_i) = G'(t_i)


@functools.lru_cache(maxsize=256)
def _unit_grid(q_key: float) -> _UnitGrid:
    """Cumulative unit-MP integral G(t) on a uniform t-grid (RMT.md §1.6, §8), one per rounded q."""
    q = q_key
    lower, upper = _unit_edges(q)
    t = np.linspace(0.0, math.pi / 2.0, _GRID_PANELS + 1)
    step = t[1] - t[0]
    x, w = leggauss(5)
    inner = t[:-1, None] + (x[None, :] + 1.0) * (step / 2.0)
    panel = (_density_in_t(inner, q) @ w) * (step / 2.0)
    cdf = np.concatenate(([0.0], np.cumsum(panel)))
    cdf /= cdf[-1]  # exact normalisation is 1 (RMT.md §1.5); removes O(1e-15) summation drift
    dcdf = _density_in_t(t, q)
    for arr in (t, cdf, dcdf):
        arr.setflags(write=False)
    return _UnitGrid(q, lower, upper, step, t, cdf, dcdf)


def _hermite(grid: _UnitGrid, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cubic Hermite interpolant of G at t (in [0, pi/2]) and its derivative."""
    i = np.clip((t / grid.step).astype(np.intp), 0, _GRID_PANELS - 1)
    h = grid.step
    u = (t - grid.t[i]) / h
    g0, g1 = grid.cdf[i], grid.cdf[i + 1]
    d0, d1 = grid.dcdf[i] * h, grid.dcdf[i + 1] * h
    u2, u3 = u * u, u * u * u
    value = (2 * u3 - 3 * u2 + 1) * g0 + (u3 - 2 * u2 + u) * d0 + (-2 * u3 + 3 * u2) * g1 + (u3 - u2) * d1
    deriv = ((6 * u2 - 6 * u) * g0 + (3 * u2 - 4 * u + 1) * d0 + (-6 * u2 + 6 * u) * g1 + (3 * u2 - 2 * u) * d1) / h
    return value, deriv


def _unit_cdf(lam: np.ndarray, q: float) -> np.ndarray:
    grid = _unit_grid(_q_key(q))
    frac = np.clip((lam - grid.lower) / (grid.upper - grid.lower), 0.0, 1.0)
    t = np.arcsin(np.sqrt(frac))
    value, _ = _hermite(grid, t)
    value = np.clip(value, 0.0, 1.0)
    value = np.where(lam <= grid.lower, 0.0, np.where(lam >= grid.upper, 1.0, value))
    return np.where(np.isnan(lam), np.nan, value)


def _unit_ppf(p: np.ndarray, q: float) -> np.ndarray:
    grid = _unit_grid(_q_key(q))
    pc = np.clip(np.nan_to_num(p, nan=0.5), 0.0, 1.0)
    i = np.clip(np.searchsorted(grid.cdf, pc, side="right") - 1, 0, _GRID_PANELS - 1)
    lo, hi = grid.t[i], grid.t[i + 1]
    span = grid.cdf[i + 1] - grid.cdf[i]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = lo + np.where(span > 0, (pc - grid.cdf[i]) / span, 0.0) * (hi - lo)
    for _ in range(4):  # safeguarded Newton on the Hermite cubic of the bracketing panel
        value, deriv = _hermite(grid, t)
        with np.errstate(invalid="ignore", divide="ignore"):
            step = np.where(deriv > 0, (value - pc) / deriv, 0.0)
        t = np.clip(t - step, lo, hi)
    lam = grid.lower + (grid.upper - grid.lower) * np.sin(t) ** 2
    lam = np.where(pc <= 0.0, grid.lower, np.where(pc >= 1.0, grid.upper, lam))
    bad = np.isnan(p) | (p < 0.0) | (p > 1.0)
    return np.where(bad, np.nan, lam)


def _unit_expectation(fn, q: float, n_nodes: int = 200) -> float:
    """E[fn(lambda)] under unit MP(q) by Gauss-Legendre in the smooth t variable."""
    lower, upper = _unit_edges(q)
    x, w = leggauss(n_nodes)
    t = (x + 1.0) * (math.pi / 4.0)
    lam = lower + (upper - lower) * np.sin(t) ** 2
    return float(np.sum(w * fn(lam) * _density_in_t(t, q)) * (math.pi / 4.0))


def mp_median(q: float) -> float:
    """Median mu_q of the unit Marchenko-Pastur law (RMT.md §5: mu_0.25 = 0.916004; mu_1 = 0.652776, exactly the
    root of (2/pi)(phi + sin phi cos phi) = 1/2 with lambda = 4 sin^2 phi, not the 0.652845 printed in RMT.md)."""
    return _cached_median(_q_key(_check_q(q)))


@functools.lru_cache(maxsize=256)
def _cached_median(q_key: float) -> float:
    return float(_unit_ppf(np.array(0.5), q_key))


def mp_quantiles(q: float, probs) -> np.ndarray:
    """Unit-MP quantiles F^{-1}(p; q, sigma=1) (RMT.md §1.6) from the grid cached per rounded q. Vectorised."""
    return _unit_ppf(np.asarray(probs, dtype=float), _check_q(q))


def _as_output(arr: np.ndarray):
    return float(arr) if np.ndim(arr) == 0 else arr


def _random_uniform(size, random_state) -> np.ndarray:
    rng = random_state if isinstance(random_state, np.random.Generator) else np.random.default_rng(random_state)
    return rng.random(size)


# ----------------------------------------------------------------------------------------------------------------
# frozen laws
# ----------------------------------------------------------------------------------------------------------------
class MarchenkoPastur:
    """Marchenko-Pastur law of the canonical eigenvalues lambda = s^2/N of pure noise (RMT.md §1.1).

    rho(lambda) = sqrt((l+ - lambda)(lambda - l-)) / (2 pi sigma^2 q lambda),  l+- = sigma^2 (1 +- sqrt q)^2.
    Frozen, scipy.stats-like: pdf, cdf, sf, ppf, isf, rvs, support, mean, var, std, median. q = 1 has a hard
    edge at 0 with an integrable lambda^(-1/2) spike (pdf(0) = inf).
    """

    def __init__(self, q: float, sigma: float = 1.0):
        self.q = _check_q(q)
        sigma = float(sigma)
        if not (math.isfinite(sigma) and 0.0 < sigma * sigma < math.inf):
            raise ValueError(f"sigma must be positive and finite with sigma^2 representable, got {sigma!r}")
        self.sigma = sigma
        self.sigma2 = sigma * sigma
        lower, upper = _unit_edges(self.q)
        self.lower = self.sigma2 * lower
        self.upper = self.sigma2 * upper

    def __repr__(self) -> str:
        return f"MarchenkoPastur(q={self.q!r}, sigma={self.sigma!r})"

    def support(self) -> tuple[float, float]:
        """(lambda_-, lambda_+) = sigma^2 (1 -+ sqrt q)^2 (RMT.md §1.1)."""
        return self.lower, self.upper

    def pdf(self, x):
        """Density rho(lambda; q, sigma^2) (RMT.md §1.1); 0 outside the support, inf at 0 when q = 1."""
        lam = np.asarray(x, dtype=float)
        inside = (lam >= self.lower) & (lam <= self.upper)
        with np.errstate(invalid="ignore", divide="ignore"):
            num = np.sqrt(np.clip((self.upper - lam) * (lam - self.lower), 0.0, None))
            val = num / (2.0 * math.pi * self.sigma2 * self.q * lam)
        val = np.where(inside, val, 0.0)
        if self.lower == 0.0:
            val = np.where(lam == 0.0, np.inf, val)
        return _as_output(np.where(np.isnan(lam), np.nan, val))

    def cdf(self, x):
        """F(lambda) by the sin^2 substitution and the cached per-q grid (RMT.md §1.6)."""
        return _as_output(_unit_cdf(np.asarray(x, dtype=float) / self.sigma2, self.q))

    def sf(self, x):
        return _as_output(1.0 - np.asarray(self.cdf(x)))

    def ppf(self, p):
        """Quantile F^{-1}(p) by inverting the cached grid (RMT.md §1.6); nan outside [0, 1]."""
        return _as_output(self.sigma2 * _unit_ppf(np.asarray(p, dtype=float), self.q))

    def isf(self, p):
        return self.ppf(1.0 - np.asarray(p, dtype=float))

    def median(self) -> float:
        """sigma^2 mu_q (RMT.md §1.6 table, §5)."""
        return float(self.ppf(0.5))

    def mean(self) -> float:
        """E lambda = sigma^2 (RMT.md §1.5)."""
        return self.sigma2

    def var(self) -> float:
        """Var lambda = sigma^4 (1 + q) - sigma^4 = sigma^4 q (RMT.md §1.5)."""
        return self.sigma2**2 * self.q

    def std(self) -> float:
        return math.sqrt(self.var())

    def rvs(self, size=None, random_state=None):
        """Independent draws from the limiting law by inversion (not the correlated eigenvalues of one matrix)."""
        return _as_output(self.ppf(_random_uniform(size, random_state)))


class MarchenkoPasturSingular:
    """Law of the normalised singular values x = s/sqrt(N) = sqrt(lambda) of pure noise (RMT.md §1.2).

    f(x) = 2x rho(x^2) = sqrt((x+^2 - x^2)(x^2 - x-^2)) / (pi sigma^2 q x),  x+- = sigma (1 +- sqrt q);
    q = 1 gives the quarter circle sqrt(4 sigma^2 - x^2)/(pi sigma^2) on [0, 2 sigma] (RMT.md §1.3).
    """

    def __init__(self, q: float, sigma: float = 1.0):
        self.eigenvalue_law = MarchenkoPastur(q, sigma)
        self.q = self.eigenvalue_law.q
        self.sigma = self.eigenvalue_law.sigma
        self.sigma2 = self.eigenvalue_law.sigma2
        root = math.sqrt(self.q)
        self.lower = self.sigma * (1.0 - root)
        self.upper = self.sigma * (1.0 + root)

    def __repr__(self) -> str:
        return f"MarchenkoPasturSingular(q={self.q!r}, sigma={self.sigma!r})"

    def support(self) -> tuple[float, float]:
        """(x_-, x_+) = sigma (1 -+ sqrt q) (RMT.md §1.2)."""
        return self.lower, self.upper

    def pdf(self, x):
        """f(x) = 2x rho(x^2) (RMT.md §1.2); finite everywhere, also at x = 0 when q = 1."""
        x = np.asarray(x, dtype=float)
        inside = (x >= self.lower) & (x <= self.upper)
        upper2, lower2 = self.upper**2, self.lower**2
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.lower == 0.0:  # quarter circle: the x in sqrt(x^2 - 0) cancels the 1/x
                val = np.sqrt(np.clip(upper2 - x * x, 0.0, None)) / (math.pi * self.sigma2 * self.q)
            else:
                num = np.sqrt(np.clip((upper2 - x * x) * (x * x - lower2), 0.0, None))
                val = num / (math.pi * self.sigma2 * self.q * x)
        val = np.where(inside, val, 0.0)
        return _as_output(np.where(np.isnan(x), np.nan, val))

    def cdf(self, x):
        """P(X <= x) = F_MP(x^2) for x >= 0."""
        x = np.asarray(x, dtype=float)
        return _as_output(np.where(x < 0.0, 0.0, np.asarray(self.eigenvalue_law.cdf(x * x))))

    def sf(self, x):
        return _as_output(1.0 - np.asarray(self.cdf(x)))

    def ppf(self, p):
        """sqrt(F_MP^{-1}(p))."""
        return _as_output(np.sqrt(np.asarray(self.eigenvalue_law.ppf(p))))

    def isf(self, p):
        return self.ppf(1.0 - np.asarray(p, dtype=float))

    def median(self) -> float:
        return float(self.ppf(0.5))

    def mean(self) -> float:
        """E x = sigma E[sqrt(lambda)] under unit MP, by Gauss-Legendre in the sin^2 variable."""
        return self.sigma * _unit_expectation(np.sqrt, self.q)

    def var(self) -> float:
        """Var x = E lambda - (E x)^2 = sigma^2 - (E x)^2."""
        return self.sigma2 - self.mean() ** 2

    def std(self) -> float:
        return math.sqrt(self.var())

    def rvs(self, size=None, random_state=None):
        """Independent draws from the limiting law by inversion."""
        return _as_output(self.ppf(_random_uniform(size, random_state)))


# ----------------------------------------------------------------------------------------------------------------
# edges (RMT.md §2.2-§2.5), canonical lambda units
# ----------------------------------------------------------------------------------------------------------------
def _effective_dims(N, M, variant: str) -> tuple[int, float, float]:
    """(N, N', M') for a centring variant; (N, M) may come in either order, N := the larger."""
    if variant not in EDGE_VARIANTS:
        raise ValueError(f"unknown edge variant {variant!r}; choose one of {sorted(EDGE_VARIANTS)}")
    big, small = max(int(N), int(M)), min(int(N), int(M))
    if small < 1:
        raise ValueError(f"matrix dimensions must be positive, got N={N!r}, M={M!r}")
    d_big, d_small = EDGE_VARIANTS[variant]
    return big, big - d_big, small - d_small


def upper_edge_location_scale(N: int, M: int, sigma2: float = 1.0, variant: str = "canonical") -> tuple[float, float]:
    """(mu_+, s_+) with (lambda_1 - mu_+)/s_+ -> TW1 (Johnstone 2001 Thm 1.1 / Ma 2012; RMT.md §2.2).

    mu_+ = sigma^2 (sqrt N' + sqrt M')^2 / N,  s_+ = sigma^2 (sqrt N' + sqrt M')(1/sqrt N' + 1/sqrt M')^(1/3) / N,
    (N', M') = (N, M) "canonical", (N-1, M) "johnstone", (N-1/2, M-1/2) "ma".
    """
    n, n_eff, m_eff = _effective_dims(N, M, variant)
    root_sum = math.sqrt(n_eff) + math.sqrt(m_eff)
    mu = sigma2 * root_sum**2 / n
    scale = sigma2 * root_sum * (1.0 / math.sqrt(n_eff) + 1.0 / math.sqrt(m_eff)) ** (1.0 / 3.0) / n
    return mu, scale


def lower_edge_location_scale(N: int, M: int, sigma2: float = 1.0, variant: str = "canonical") -> tuple[float, float]:
    """(mu_-, s_-) with (mu_- - lambda_M)/s_- -> TW1 (Feldheim-Sodin 2010, Ma 2012; RMT.md §2.5).

    mu_- = sigma^2 (sqrt N' - sqrt M')^2 / N,  s_- = sigma^2 (sqrt N' - sqrt M')(1/sqrt M' - 1/sqrt N')^(1/3) / N.
    Raises ValueError when N' <= M' (square matrices have a hard edge, RMT.md §2.6); use `has_lower_edge` to
    decide whether the soft-edge approximation is trustworthy.
    """
    n, n_eff, m_eff = _effective_dims(N, M, variant)
    if n_eff <= m_eff:
        raise ValueError(f"no soft lower edge for N={n}, M={min(int(N), int(M))} (variant {variant!r}), RMT.md §2.6")
    root_diff = math.sqrt(n_eff) - math.sqrt(m_eff)
    mu = sigma2 * root_diff**2 / n
    scale = sigma2 * root_diff * (1.0 / math.sqrt(m_eff) - 1.0 / math.sqrt(n_eff)) ** (1.0 / 3.0) / n
    return mu, scale


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not (0.0 < c < 1.0):
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    return c


def upper_threshold(N: int, M: int, sigma2: float = 1.0, confidence: float = 0.99, variant: str = "canonical") -> float:
    """gamma_+(c) = mu_+ + t_c s_+, t_c = F1^{-1}(c) (RMT.md §2.3); e.g. 2.267372 sigma^2 at 1000x4000, c=0.99."""
    mu, scale = upper_edge_location_scale(N, M, sigma2, variant)
    return mu + tw1_ppf(_check_confidence(confidence)) * scale


def lower_threshold(N: int, M: int, sigma2: float = 1.0, confidence: float = 0.99, variant: str = "canonical") -> float:
    """gamma_-(c) = mu_- - t_c s_- (RMT.md §2.5); left outliers are lambda_i < gamma_-."""
    mu, scale = lower_edge_location_scale(N, M, sigma2, variant)
    return mu - tw1_ppf(_check_confidence(confidence)) * scale


def has_lower_edge(N: int, M: int) -> bool:
    """Whether left outliers are computed: q < 1 and N - M >= 20 (RMT.md §2.5 [D]); order of (N, M) is free."""
    return abs(int(N) - int(M)) >= 20
