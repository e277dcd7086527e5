"""Per-matrix random-matrix analysis: σ̂, TW-corrected bulk edges, z-scores, ranks and metrics (RMT.md §2-§7).

The expensive part (singular values) lives in `Spectrum` objects computed once per matrix; `analyze_spectrum` is
cheap arithmetic over them, so changing the estimator, confidence or energy level never recomputes an SVD.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from spectral import metrics, mp, noise, powerlaw, spikes

LOW_CONFIDENCE_M = 100  # RMT.md §8: below this short side, MP/TW asymptotics are poor
HEAVY_TAIL_ALPHA = 4.0  # RMT.md §8: α below this makes the MP null questionable
POOR_FIT_KS = 0.1  # KS distance of the bulk to the fitted law above which the fit is called poor

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Settings:
    """What the analysis depends on besides the spectra (DESIGN.md `settings`)."""

    estimator: str = "bema"  # bema | broadening | median (spectral.noise.ESTIMATORS)
    confidence: float = 0.99  # TW1 confidence c of the edges: t_0.99 = 2.0234, the "z > 2" rule
    energy: float = 0.999  # energy fraction p of the energy rank

    def __post_init__(self):
        if self.estimator not in noise.ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(noise.ESTIMATORS)}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must lie strictly between 0 and 1, got {self.confidence}")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {self.energy}")


@dataclass
class Spectrum:
    """Singular values of one weight matrix (descending, float64) with what the analysis needs to know about it."""

    name: str
    shape: tuple[int, int]  # (rows, cols) as analysed
    role: str
    tied_with: tuple[str, ...]
    singular_values: np.ndarray

    @property
    def N(self) -> int:
        return max(self.shape)

    @property
    def M(self) -> int:
        return min(self.shape)

    @property
    def q(self) -> float:
        return self.M / self.N

    @property
    def eigenvalues(self) -> np.ndarray:
        """Canonical spectrum λ_i = s_i²/N (RMT.md §0)."""
        return self.singular_values**2 / self.N


@dataclass
class MatrixReport:
    """One row of the analysis table; keys and units as DESIGN.md's `matrices` entries."""

    name: str
    shape: list[int]
    role: str
    tied_with: list[str]
    sigma: float
    edge_upper: float
    edge_lower: float | None
    n_signal: int
    n_below: int
    z_max: float
    energy_rank: int
    utilization: float
    participation_ratio: float
    stable_rank: float
    effective_rank: float
    spectral_norm: float
    frobenius_norm: float
    alpha: float | None
    ave_w_phi: float | None
    ks_distance: float
    warnings: list[str]
    rank: int = 0  # min(shape): the full rank
    n_optimal: int = 0  # Gavish-Donoho hard-threshold rank (RMT.md §5)
    z_scores: np.ndarray = field(default=None, repr=False)  # z_i of every singular value (RMT.md §2.4)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("z_scores")
        return {k: _json_number(v) for k, v in d.items()}


@dataclass
class Analysis:
    """The result of `analyze`: checkpoint facts, settings, one `MatrixReport` per matrix and a summary."""

    checkpoint: dict
    settings: Settings
    matrices: list[MatrixReport]
    summary: dict

    def row(self, name: str) -> MatrixReport:
        for r in self.matrices:
            if r.name == name or name in r.tied_with:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "settings": asdict(self.settings),
                "matrices": [r.to_dict() for r in self.matrices], "summary": self.summary}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_csv(self) -> str:
        rows = [r.to_dict() for r in self.matrices]
        out = io.StringIO()
        if not rows:
            return ""
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
        return out.getvalue()


def _json_number(v):
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def factorised_params(shape: tuple[int, int], k: int) -> int:
    """Parameters a rank-k factorisation stores, k·(rows+cols), capped at the dense rows·cols (DESIGN.md summary)."""
    rows, cols = shape
    return min(k * (rows + cols), rows * cols)


def ks_distance_to_mp(eigenvalues: np.ndarray, q: float, sigma: float) -> float:
    """Kolmogorov-Smirnov distance between the bulk eigenvalues (outliers removed) and MP(q, σ̂²) (RMT.md §1.6)."""
    x = np.sort(eigenvalues)
    n = x.size
    if n == 0 or sigma <= 0:
        return float("nan")
    F = mp.MarchenkoPastur(q, sigma).cdf(x)
    upper = np.arange(1, n + 1) / n
    return float(max(np.max(upper - F), np.max(F - (upper - 1.0 / n))))


def analyze_spectrum(spectrum: Spectrum, settings: Settings = Settings()) -> MatrixReport:
    """Every per-matrix number of DESIGN.md from cached singular values (RMT.md §2-§7); no SVD here."""
    s = spectrum.singular_values
    N, M, q = spectrum.N, spectrum.M, spectrum.q
    lam = spectrum.eigenvalues
    warnings: list[str] = []

    sigma = float(noise.make_estimator(settings.estimator).fit(s, spectrum.shape).sigma_)
    sigma2 = sigma * sigma
    mu_plus, s_plus = mp.upper_edge_location_scale(N, M, sigma2)
    gamma_plus = mp.upper_threshold(N, M, sigma2, settings.confidence)
    z = (lam - mu_plus) / s_plus if s_plus > 0 else np.full_like(lam, np.inf)
    n_signal = int(np.count_nonzero(lam > gamma_plus))

    edge_lower, n_below = None, 0
    bulk = lam[lam <= gamma_plus]
    if mp.has_lower_edge(N, M):
        gamma_minus = mp.lower_threshold(N, M, sigma2, settings.confidence)
        if gamma_minus > 0:
            edge_lower = math.sqrt(N * gamma_minus)
            n_below = int(np.count_nonzero(lam < gamma_minus))
            bulk = bulk[bulk >= gamma_minus]

    esd = s**2
    alpha = None
    if np.count_nonzero(esd > 0) >= 10:
        alpha = float(powerlaw.fit_power_law(esd[esd > 0]).alpha)
    ave_w = None
    if n_signal > 0 and sigma > 0:
        ave_w = float(spikes.ave_w_phi(lam, gamma_plus, sigma2, q, side="product"))
    ks = ks_distance_to_mp(bulk, q, sigma)

    if M < LOW_CONFIDENCE_M:
        warnings.append(f"low confidence: short side {M} < {LOW_CONFIDENCE_M}, MP/TW asymptotics are poor")
    if alpha is not None and alpha < HEAVY_TAIL_ALPHA:
        warnings.append(f"heavy-tailed: power-law alpha {alpha:.2f} < {HEAVY_TAIL_ALPHA:g}, MP null questionable")
    if math.isfinite(ks) and ks > POOR_FIT_KS:
        warnings.append(f"poor fit: KS distance of the bulk to MP is {ks:.3f} > {POOR_FIT_KS:g}")

    return MatrixReport(
        name=spectrum.name, shape=list(spectrum.shape), role=spectrum.role, tied_with=list(spectrum.tied_with),
        sigma=sigma, edge_upper=math.sqrt(N * gamma_plus), edge_lower=edge_lower, n_signal=n_signal,
        n_below=n_below, z_max=float(z[0]) if z.size else float("nan"),
        energy_rank=int(metrics.energy_rank(s, settings.energy)),
        utilization=float(metrics.energy_rank(s, settings.energy) / M),
        participation_ratio=float(metrics.participation_ratio(s)), stable_rank=float(metrics.stable_rank(s)),
        effective_rank=float(metrics.entropy_effective_rank(s)), spectral_norm=float(metrics.spectral_norm(s)),
        frobenius_norm=float(metrics.frobenius_norm(s)), alpha=alpha, ave_w_phi=ave_w, ks_distance=ks,
        warnings=warnings, rank=M, n_optimal=int(noise.gavish_donoho_rank(s, spectrum.shape)), z_scores=z,
    )


def summarize(reports: list[MatrixReport], seconds: float, skipped: list[dict]) -> dict:
    """DESIGN.md `summary`: parameter counts a rank-k factorisation at n_signal / energy_rank would store."""
    return {
        "n_matrices": len(reports),
        "matrix_params": int(sum(r.shape[0] * r.shape[1] for r in reports)),
        "params_kept_mp": int(sum(factorised_params(tuple(r.shape), r.n_signal) for r in reports)),
        "params_kept_energy": int(sum(factorised_params(tuple(r.shape), r.energy_rank) for r in reports)),
        "seconds": round(seconds, 4),
        "skipped": skipped,
    }


def role_table(analysis: Analysis) -> list[dict]:
    """Per matrix role: signal SVs, energy rank and utilization summed over its matrices (the PhotonicGPT table)."""
    by_role: dict[str, list[MatrixReport]] = {}
    for r in analysis.matrices:
        by_role.setdefault(r.role, []).append(r)
    rows = []
    for role, reps in by_role.items():
        full = sum(r.rank for r in reps)
        rows.append({
            "role": role, "matrices": len(reps), "full_rank": full,
            "n_signal": sum(r.n_signal for r in reps), "signal_pct": 100.0 * sum(r.n_signal for r in reps) / full,
            "energy_rank": sum(r.energy_rank for r in reps),
            "utilization_pct": 100.0 * sum(r.energy_rank for r in reps) / full,
        })
    return rows

