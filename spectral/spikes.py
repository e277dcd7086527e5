"""Signal plus noise: the BBP phase transition, the Benaych-Georges–Nadakuditi maps, Ave_w(φ) and optimal shrinkage
(RMT.md §6).

Model W = S + E with iid noise of variance σ², W of shape m × n, N = max(m, n), M = min(m, n), q = M/N ∈ (0, 1].
Dimensionless quantities throughout: signal strength θ = d/(σ√N) for a singular value d of S, observed outlier
position y = s/(σ√N) = sqrt(λ/σ²) with λ = s²/N. Every function is vectorised over θ or y (scalars in, floats out).
The short-side singular vectors live in R^M, the long-side ones in R^N; the left vectors are the short side when
m ≤ n and the long side when m > n (RMT.md §6.4).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "SIDES",
    "ave_w_phi",
    "bbp_threshold",
    "optimal_shrinkage",
    "outlier_location",
    "overlap",
    "overlap_long",
    "overlap_short",
    "signal_strength",
]

SIDES = ("short", "long", "product", "left", "right")


def _aspect_ratio(q) -> float:
    q = float(q)
    if not (0.0 < q <= 1.0):
        raise ValueError(f"aspect ratio q = min(m, n)/max(m, n) must be in (0, 1], got {q}")
    return q


def _result(values: np.ndarray, scalar: bool):
    return float(values) if scalar else values


def bbp_threshold(q) -> float:
    """θ_c = q^{1/4}: a component is detectable (separates from the bulk) iff θ > θ_c (BBP 2005; RMT.md §6.1)."""
    return _aspect_ratio(q) ** 0.25


def outlier_location(theta, q):
    """Forward map y(θ) = sqrt((1+θ²)(q+θ²))/θ for θ > q^{1/4}, else the bulk edge 1+√q (BGN 2012; RMT.md §6.2).
    In eigenvalue units λ = σ² y²; nan θ gives nan."""
    q = _aspect_ratio(q)
    t = np.asarray(theta, dtype=np.float64)
    scalar = t.ndim == 0
    t = np.atleast_1d(t)
    y = np.full(t.shape, 1.0 + np.sqrt(q))
    above = t > q**0.25
    ta = t[above]
    y[above] = np.sqrt((1.0 + ta * ta) * (q + ta * ta)) / ta
    y[np.isnan(t)] = np.nan
    return _result(y.reshape(np.shape(theta)), scalar)


def signal_strength(y, q):
    """Inverse map θ̂² = [y² − 1 − q + sqrt((y² − 1 − q)² − 4q)]/2 for y > 1+√q, nan otherwise (BGN 2012;
    RMT.md §6.3). Then d̂ = σ̂√N θ̂."""
    q = _aspect_ratio(q)
    yy = np.atleast_1d(np.asarray(y, dtype=np.float64))
    scalar = np.ndim(y) == 0
    theta = np.full(yy.shape, np.nan)
    above = yy > 1.0 + np.sqrt(q)
    b = yy[above] ** 2 - 1.0 - q
    theta[above] = np.sqrt((b + np.sqrt(np.maximum(b * b - 4.0 * q, 0.0))) / 2.0)
    return _result(theta.reshape(np.shape(y)), scalar)


def overlap_short(theta, q):
    """φ^S(θ) = |⟨û, u⟩|² → (θ⁴ − q)/(θ⁴ + qθ²) for θ > q^{1/4}, else 0: squared cosine between the observed and the
    true short-side singular vector (BGN 2012; RMT.md §6.4). nan θ gives 0 (an undetected component)."""
    return _overlap(theta, q, short=True)


def overlap_long(theta, q):
    """φ^L(θ) = |⟨v̂, v⟩|² → (θ⁴ − q)/(θ⁴ + θ²) for θ > q^{1/4}, else 0: squared cosine for the long-side singular
    vector (BGN 2012; RMT.md §6.4). nan θ gives 0."""
    return _overlap(theta, q, short=False)


def _overlap(theta, q, short: bool):
    q = _aspect_ratio(q)
    t = np.atleast_1d(np.asarray(theta, dtype=np.float64))
    scalar = np.ndim(theta) == 0
    phi = np.zeros(t.shape)
    above = t > q**0.25  # False for nan
    t2 = t[above] ** 2
    t4 = t2 * t2
    phi[above] = (t4 - q) / (t4 + (q * t2 if short else t2))
    return _result(phi.reshape(np.shape(theta)), scalar)


def overlap(theta, q, side: str = "product", m_le_n: bool | None = None):
    """φ(θ) for one side (RMT.md §6.4–6.5): "short" φ^S, "long" φ^L, "product" φ^S·φ^L (the squared overlap
    |⟨ûv̂ᵀ, uvᵀ⟩_F|² of the rank-one components), "left"/"right" the side of W's left/right singular vectors,
    which needs the orientation ``m_le_n`` (True when rows m ≤ columns n: left = short)."""
    side = _resolve_side(side, m_le_n)
    if side == "short":
        return overlap_short(theta, q)
    if side == "long":
        return overlap_long(theta, q)
    phi_s, phi_l = np.asarray(overlap_short(theta, q)), np.asarray(overlap_long(theta, q))
    return _result(phi_s * phi_l, np.ndim(theta) == 0)


def _resolve_side(side: str, m_le_n: bool | None) -> str:
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}; got {side!r}")
    if side in ("left", "right"):
        if m_le_n is None:
            raise ValueError(f"side={side!r} needs the orientation m_le_n (True when rows <= columns)")
        left = "short" if m_le_n else "long"
        return left if side == "left" else ("long" if left == "short" else "short")
    return side


def ave_w_phi(eigenvalues, gamma_plus: float, sigma2: float, q: float, side: str = "product",
              m_le_n: bool | None = None) -> float:
    """Ave_w(φ) = Σ_{i≤ŝ} φ(θ̂_i)(λ_i − γ₊) / Σ_{i≤ŝ} (λ_i − γ₊) over the ŝ eigenvalues λ_i > γ₊ (2512.12911;
    RMT.md §6.5).

    ``eigenvalues`` are the canonical λ_i = s_i²/N in any order, ``gamma_plus`` the threshold γ₊ and ``sigma2`` the
    noise variance σ̂², both in the same units; θ̂_i = `signal_strength`(sqrt(λ_i/σ̂²), q). A retained λ_i at or
    below the bulk edge σ̂²(1+√q)² (possible only when γ₊ lies below the edge) has no θ̂ and contributes φ = 0 with
    its weight. ``side`` as in `overlap` (default "product", the only transpose-invariant choice [D]); "left" and
    "right" need ``m_le_n``. Returns nan when ŝ = 0 (no component above γ₊: the weighted average is empty).
    """
    side = _resolve_side(side, m_le_n)
    q = _aspect_ratio(q)
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    gamma_plus = float(gamma_plus)
    retained = lam[lam > gamma_plus]
    if retained.size == 0:
        return float("nan")
    sigma2 = float(sigma2)
    if not (sigma2 > 0.0 and np.isfinite(sigma2)):
        raise ValueError(f"noise variance sigma2 must be positive and finite, got {sigma2}")
    theta = signal_strength(np.sqrt(retained / sigma2), q)
    phi = overlap(theta, q, side)
    weights = retained - gamma_plus
    return float(np.sum(phi * weights) / np.sum(weights))


def optimal_shrinkage(y, q):
    """η(y) = sqrt((y² − q − 1)² − 4q)/y for y > 1+√q, else 0: Frobenius-optimal singular-value shrinker in units
    of σ√N (Gavish & Donoho 2017, IEEE TIT 63:2137; RMT.md §6.6). Equals θ·sqrt(φ^S φ^L) at y = y(θ)."""
    q = _aspect_ratio(q)
    yy = np.atleast_1d(np.asarray(y, dtype=np.float64))
    scalar = np.ndim(y) == 0
    eta = np.zeros(yy.shape)
    above = yy > 1.0 + np.sqrt(q)
    ya = yy[above]
    b = ya * ya - q - 1.0
    eta[above] = np.sqrt(np.maximum(b * b - 4.0 * q, 0.0)) / ya
    return _result(eta.reshape(np.shape(y)), scalar)
