"""Per-matrix random-matrix analysis: σ̂, TW-corrected bulk edges, z-scores, ranks and metrics (RMT.md §2-§7),
against the null chosen in `Settings.null` and with the diagnostics that say whether that null fits (RMT.md §11).

The expensive part (singular values, entry statistics, and the biwhitened spectrum or permutation null when asked
for) lives in `Spectrum` objects computed once per matrix; `analyze_spectrum` is cheap arithmetic over them, so
changing the estimator, confidence or energy level never recomputes an SVD.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from spectral import metrics, mp, noise, powerlaw, spikes
from spectral.diagnostics import EntryStats, null_failures, signal_spread, spectrum_fit
from spectral.export import rows_to_csv
from spectral.nulls import NULLS, Biwhitened, PermutationNull
from spectral.tracy_widom import tw1_ppf

LOW_CONFIDENCE_M = 100  # RMT.md §8: below this short side, MP/TW asymptotics are poor
HEAVY_TAIL_ALPHA = 4.0  # RMT.md §8: α below this makes the MP null questionable
POOR_FIT_KS = 0.1  # KS distance of the bulk to the fitted law above which the fit is called poor
# Gaussian broadening is flagged when its σ̂ differs from both BEMA's and the median's by more than this (relative).
# On i.i.d. noise with M ≥ 100 the three agree within 2%; on MiniLM's word embedding the old unbounded trim gave
# 0.0216 against BEMA's 0.0486 (issue 13).
BROADENING_AGREEMENT = 0.10

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Settings:
    """What the analysis depends on besides the spectra (DESIGN.md `settings`)."""

    estimator: str = "bema"  # bema | broadening | median (spectral.noise.ESTIMATORS)
    confidence: float = 0.99  # TW1 confidence c of the edges: t_0.99 = 2.0234, the "z > 2" rule
    energy: float = 0.999  # energy fraction p of the energy rank
    null: str = "mp"  # mp | biwhitened | permutation (spectral.nulls): what "signal" is measured against

    def __post_init__(self):
        if self.estimator not in noise.ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(noise.ESTIMATORS)}")
        if self.null not in NULLS:
            raise ValueError(f"unknown null {self.null!r}; choose one of {', '.join(NULLS)}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must lie strictly between 0 and 1, got {self.confidence}")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {self.energy}")


@dataclass
class Spectrum:
    """Singular values of one weight matrix (descending, float64) with what the analysis needs to know about it.

    `entries` (from W itself, O(mn)) feeds the row/column spread and kurtosis diagnostics; without it those are
    not reported. `biwhitened` and `permutation` are filled in only when that null is asked for (spectral.nulls).
    """

    name: str
    shape: tuple[int, int]  # (rows, cols) as analysed
    role: str
    tied_with: tuple[str, ...]
    singular_values: np.ndarray
    entries: EntryStats | None = None
    biwhitened: Biwhitened | None = None
    permutation: PermutationNull | None = None
    quant: str | None = None  # GGUF quantisation type of the stored tensor
    quant_sigma: float | None = None  # noise σ that quantisation alone adds, in weight units

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
    """One row of the analysis table; keys and units as DESIGN.md's `matrices` entries, plus the null and its
    diagnostics (issue 13).

    `sigma`, `edge_upper`, `edge_lower`, `n_signal`, `n_below`, `z_max`, `z_scores`, `ave_w_phi`, `ks_distance` and
    the spectrum diagnostics refer to the spectrum of the null: W's own under `mp` and `permutation`, D₁WD₂'s (same
    overall mean square as W) under `biwhitened`. `z_scores[i]` is the i-th largest eigenvalue's distance above the
    null's edge in units of its Tracy-Widom scale, z = (λ_i − μ₊)/s₊, so z > t_c (2.0234 at c = 0.99) is the
    c-rule under every null: `mp` uses MP's TW centring and scale at σ̂ (RMT.md §2.4), `biwhitened` the same for
    D₁WD₂, `permutation` the TW law fitted to the shuffles' largest eigenvalues (spectral.nulls.PermutationNull).
    Counting z > t keeps that many of W's top singular values under every null. The energy rank and the norms are
    always W's.
    """

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
    null: str = "mp"  # the null the signal count, edges and z-scores refer to (Settings.null)
    null_ok: bool = True  # False: a diagnostic says that null does not describe this matrix (see `warnings`)
    frac_above: float | None = None  # fraction of eigenvalues above the fitted bulk's λ₊ (RMT.md §11)
    frac_below: float | None = None  # ... below λ₋ (0 without a soft lower edge)
    ks_whole: float | None = None  # KS distance of the whole spectrum (no trimming) to MP(q, σ̂²)
    row_cv: float | None = None  # coefficient of variation of the row mean squares
    col_cv: float | None = None  # ... of the column mean squares
    row_spread: float | None = None  # row CV relative to what exchangeable entries give (1 under i.i.d.)
    col_spread: float | None = None
    excess_kurtosis: float | None = None  # of the entries (0 for Gaussian)
    shuffles: int | None = None  # permutation null: how many shuffles its edge comes from
    quant: str | None = None  # GGUF quantisation type of the stored tensor
    quant_sigma: float | None = None  # noise σ that quantisation alone adds, in weight units
    z_scores: np.ndarray = field(default=None, repr=False)  # z_i of every singular value (RMT.md §2.4)
    p_values: np.ndarray | None = field(default=None, repr=False)  # permutation null: p-value of every λ_i

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("z_scores")
        d.pop("p_values")
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
        """The per-matrix table as CSV (lists joined with ';')."""
        return rows_to_csv([r.to_dict() for r in self.matrices])


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


def _null_spectrum(spectrum: Spectrum, null: str) -> tuple[np.ndarray, EntryStats | None]:
    """The singular values the null is applied to, and the entry statistics of that matrix."""
    if null == "biwhitened":
        if spectrum.biwhitened is None:
            raise ValueError(f"{spectrum.name}: the biwhitened null needs the spectrum of D1*W*D2 "
                             "(spectral.nulls.biwhitened_spectrum); Workspace.analyze computes it")
        return spectrum.biwhitened.singular_values, spectrum.biwhitened.entries
    if null == "permutation" and spectrum.permutation is None:
        raise ValueError(f"{spectrum.name}: the permutation null needs the shuffles "
                         "(spectral.nulls.permutation_null); Workspace.analyze computes them")
    return spectrum.singular_values, spectrum.entries


def _broadening_disagreement(s: np.ndarray, shape: tuple[int, int], sigma: float) -> str | None:
    """A warning when Gaussian broadening's σ̂ is more than BROADENING_AGREEMENT away from both BEMA and median."""
    others = {name: float(noise.make_estimator(name).fit(s, shape).sigma_) for name in ("bema", "median")}
    if sigma <= 0 or any(v <= 0 for v in others.values()):
        return None
    off = {name: sigma / v - 1.0 for name, v in others.items()}
    if all(abs(d) > BROADENING_AGREEMENT for d in off.values()):
        return (f"broadening disagrees: σ̂ {sigma:.4g} is {off['bema']:+.0%} from BEMA ({others['bema']:.4g}) and "
                f"{off['median']:+.0%} from the median ({others['median']:.4g}); tolerance ±{BROADENING_AGREEMENT:.0%}")
    return None


def analyze_spectrum(spectrum: Spectrum, settings: Settings = Settings()) -> MatrixReport:
    """Every per-matrix number of DESIGN.md from cached singular values (RMT.md §2-§7) against `settings.null`,
    with the diagnostics of RMT.md §11; no SVD here."""
    s = spectrum.singular_values
    N, M, q = spectrum.N, spectrum.M, spectrum.q
    null = settings.null
    s_null, entries = _null_spectrum(spectrum, null)
    lam = s_null**2 / N
    warnings: list[str] = []

    sigma = float(noise.make_estimator(settings.estimator).fit(s_null, spectrum.shape).sigma_)
    sigma2 = sigma * sigma
    t_c = float(tw1_ppf(settings.confidence))
    permutation = spectrum.permutation if null == "permutation" else None
    if permutation is not None:
        mu_plus, s_plus = permutation.upper()
    else:
        mu_plus, s_plus = mp.upper_edge_location_scale(N, M, sigma2)
    gamma_plus = mu_plus + t_c * s_plus
    if permutation is not None:  # and above every shuffle's largest: a permutation test at level 1/(B + 1) even
        gamma_plus = max(gamma_plus, float(np.max(permutation.top)))  # where heavy tails make TW's tail too light
    z = (lam - mu_plus) / s_plus if s_plus > 0 else np.full_like(lam, np.inf)
    n_signal = int(np.count_nonzero(lam > gamma_plus))

    edge_lower, n_below = None, 0
    bulk = lam[lam <= gamma_plus]
    if mp.has_lower_edge(N, M):
        if permutation is not None:
            mu_minus, s_minus = permutation.lower()
            gamma_minus = min(mu_minus - t_c * s_minus, float(np.min(permutation.bottom)))
        else:
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
    fit = spectrum_fit(lam, N, M, sigma2) if sigma > 0 else None

    if M < LOW_CONFIDENCE_M:
        warnings.append(f"low confidence: short side {M} < {LOW_CONFIDENCE_M}, MP/TW asymptotics are poor")
    if alpha is not None and alpha < HEAVY_TAIL_ALPHA:
        warnings.append(f"heavy-tailed: power-law alpha {alpha:.2f} < {HEAVY_TAIL_ALPHA:g}, MP null questionable")
    if math.isfinite(ks) and ks > POOR_FIT_KS:
        warnings.append(f"poor fit: KS distance of the bulk to MP is {ks:.3f} > {POOR_FIT_KS:g}")
    if settings.estimator == "broadening" and sigma > 0:
        disagreement = _broadening_disagreement(s_null, spectrum.shape, sigma)
        if disagreement:
            warnings.append(disagreement)
    # the permutation null keeps the entry law and makes no MP-shape prediction: only exchangeability can fail
    explained = (0.0, 0.0)
    if entries is not None and n_signal > 0 and sigma > 0:
        theta = spikes.signal_strength(np.sqrt(lam[:n_signal] / sigma2), q)
        explained = signal_spread(entries, float(np.nansum(theta**4)), N)
    failures = null_failures(entries, fit, M, tails=permutation is None, profile=True, shape=permutation is None,
                             signal=explained)
    warnings.extend(f"{null} null does not fit: {f}" for f in failures)
    if spectrum.biwhitened is not None and null == "biwhitened" and not spectrum.biwhitened.converged:
        warnings.append(f"biwhitening did not converge in {spectrum.biwhitened.iterations} Sinkhorn iterations")

    energy_rank = int(metrics.energy_rank(s, settings.energy))
    return MatrixReport(
        name=spectrum.name, shape=list(spectrum.shape), role=spectrum.role, tied_with=list(spectrum.tied_with),
        sigma=sigma, edge_upper=math.sqrt(N * gamma_plus) if gamma_plus > 0 else 0.0, edge_lower=edge_lower,
        n_signal=n_signal, n_below=n_below, z_max=float(z[0]) if z.size else float("nan"),
        energy_rank=energy_rank, utilization=float(energy_rank / M),
        participation_ratio=float(metrics.participation_ratio(s)), stable_rank=float(metrics.stable_rank(s)),
        effective_rank=float(metrics.entropy_effective_rank(s)), spectral_norm=float(metrics.spectral_norm(s)),
        frobenius_norm=float(metrics.frobenius_norm(s)), alpha=alpha, ave_w_phi=ave_w, ks_distance=ks,
        warnings=warnings, rank=M, n_optimal=int(noise.gavish_donoho_rank(s, spectrum.shape)),
        null=null, null_ok=not failures,
        frac_above=fit.frac_above if fit else None, frac_below=fit.frac_below if fit else None,
        ks_whole=fit.ks_whole if fit else None,
        row_cv=entries.row_cv if entries else None, col_cv=entries.col_cv if entries else None,
        row_spread=entries.row_spread if entries else None, col_spread=entries.col_spread if entries else None,
        excess_kurtosis=entries.excess_kurtosis if entries else None,
        shuffles=permutation.shuffles if permutation is not None else None,
        quant=spectrum.quant, quant_sigma=spectrum.quant_sigma,
        z_scores=z, p_values=permutation.p_values(lam) if permutation is not None else None,
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
    """Per matrix role: signal SVs, energy rank and utilization summed over its matrices (the PhotonicGPT table);
    `null` names the null the signal counts refer to and `null_failed` counts the role's matrices it does not fit."""
    by_role: dict[str, list[MatrixReport]] = {}
    for r in analysis.matrices:
        by_role.setdefault(r.role, []).append(r)
    rows = []
    for role, reps in by_role.items():
        full = sum(r.rank for r in reps)
        rows.append({
            "role": role, "matrices": len(reps), "full_rank": full, "null": analysis.settings.null,
            "null_failed": sum(not r.null_ok for r in reps),
            "n_signal": sum(r.n_signal for r in reps), "signal_pct": 100.0 * sum(r.n_signal for r in reps) / full,
            "energy_rank": sum(r.energy_rank for r in reps),
            "utilization_pct": 100.0 * sum(r.energy_rank for r in reps) / full,
        })
    return rows

