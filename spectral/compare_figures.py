"""Figures of comparisons and training trajectories, on spectral/figures.py's report template and colours.

Pure functions, data in and `go.Figure` out, like spectral/figures.py: both spectra of a matched matrix overlaid
with both MP fits; per-matrix bars of ΔW's signal rank and relative norm; principal-angle curves; the spectrum of
ΔW itself (spectral/figures.py's histogram with ΔW's own fit); every metric against training step, one line per
matrix or per role; MP signal rank against energy rank over training.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from spectral import mp
from spectral.compare import Comparison, MatrixComparison
from spectral.figures import (
    BLACK,
    BLUE,
    BULK_COLOR,
    GREEN,
    ORANGE,
    PURPLE,
    ROLE_ORDER,
    SKY,
    TEMPLATE,
    VERMILION,
    checkpoint_label,
    settings_line,
    spectrum_histogram,
)
from spectral.trajectory import Trajectory

A_COLOR, B_COLOR = BLUE, VERMILION
ROLE_COLORS = {  # Okabe-Ito first, then muted extras: distinct for Llama's nine roles, no yellow on white
    "embedding": BLUE, "attn_qkv": VERMILION, "attn_q": ORANGE, "attn_k": PURPLE, "attn_v": "#8C564B",
    "attn_out": GREEN, "mlp_up": SKY, "mlp_gate": "#7F7F7F", "mlp_down": BLACK, "head": "#17BECF",
    "conv": "#B8860B", "other": BULK_COLOR}
METRIC_LABELS = {"sigma": "noise σ̂ (weight units)", "n_signal": "MP signal rank (singular values above the edge)",
                 "energy_rank": "energy rank", "alpha": "power-law α", "stable_rank": "stable rank ‖W‖_F²/‖W‖₂²",
                 "signal_pct": "MP signal rank (% of full rank)", "energy_pct": "energy rank (% of full rank)"}


def _layout(fig: go.Figure, title: str, subtitle: str = "", *, height: int = 520, **extra) -> go.Figure:
    """The report template with a title and a (possibly multi-line) subtitle, as spectral/figures.py lays out."""
    sub = "<br>".join(html.escape(line) for line in subtitle.split("\n"))
    fig.update_layout(template=TEMPLATE, title=dict(text=html.escape(title), subtitle=dict(text=sub)),
                      height=height, **extra)
    return fig


def comparison_context(comparison: Comparison) -> str:
    """'A: demo (sha256 …) · B: step-000300.safetensors (sha256 …) · σ̂: BEMA · …'."""
    return (f"A: {checkpoint_label(comparison.a)} · B: {checkpoint_label(comparison.b)}\n"
            f"{settings_line(comparison.settings)}")


# ----------------------------------------------------------------------------------------------- one matrix

def _mp_counts(spectrum, sigma: float, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The MP expectation M·(F(b) − F(a)) for a bin of the plot's width around each x (RMT.md §1.6), singular values
    in weight units (the law is in s/√N)."""
    law = mp.MarchenkoPasturSingular(spectrum.q, max(float(sigma), 1e-300))
    unit = math.sqrt(spectrum.N)
    step = float(edges[1] - edges[0]) if edges.size > 1 else 1.0
    lo, hi = (v * unit for v in law.support())
    x = np.linspace(max(float(edges[0]), lo * 0.98), min(float(edges[-1]), hi * 1.02), 400)
    y = spectrum.M * (np.asarray(law.cdf(np.clip(x + step / 2, 0, None) / unit))
                      - np.asarray(law.cdf(np.clip(x - step / 2, 0, None) / unit)))
    return x, y


def overlay_histogram(comparison: MatrixComparison, spectrum_a, spectrum_b, *, context: str = "",
                      log_y: bool = False) -> go.Figure:
    """Both spectra of one matched matrix on common bins, each with its fitted MP density and TW upper edge."""
    sa, sb = np.asarray(spectrum_a.singular_values), np.asarray(spectrum_b.singular_values)
    top = max(float(sa.max(initial=0.0)), float(sb.max(initial=0.0)), 1e-12)
    bins = int(np.clip(2.0 * math.sqrt(max(spectrum_a.M, 1)), 20, 80))
    bulk_top = max(comparison.a.edge_upper, comparison.b.edge_upper, 1e-12)
    step = max(bulk_top * 1.1 / bins, top / 400)
    edges = np.arange(0.0, top + 2 * step, step)
    centers, widths = 0.5 * (edges[:-1] + edges[1:]), np.diff(edges)
    fig = go.Figure()
    ymax = 1.0
    for side, s, spectrum, report, color in (("A", sa, spectrum_a, comparison.a, A_COLOR),
                                              ("B", sb, spectrum_b, comparison.b, B_COLOR)):
        counts = np.histogram(s, bins=edges)[0]
        ymax = max(ymax, float(counts.max(initial=0)))
        fig.add_trace(go.Bar(x=centers, y=counts, width=widths, name=f"{side}: {report.n_signal} above the edge",
                             marker=dict(color=color, line=dict(width=0)), opacity=0.5,
                             hovertemplate="%{y:d} values<extra>" + side + "</extra>"))
        x, y = _mp_counts(spectrum, report.sigma, edges)
        ymax = max(ymax, float(y.max(initial=0.0)))
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{side} MP fit, σ̂ = {report.sigma:.4g}",
                                 line=dict(color=color, width=2.2, dash="solid" if side == "A" else "dash")))
    y_range = (0.5, ymax * 1.6) if log_y else (0.0, ymax * 1.1)
    for side, report, color in (("A", comparison.a, A_COLOR), ("B", comparison.b, B_COLOR)):
        fig.add_trace(go.Scatter(x=[report.edge_upper] * 2, y=list(y_range), mode="lines",
                                 name=f"{side} upper edge (TW)", line=dict(color=color, width=1.4, dash="dot"),
                                 hovertemplate=f"{side} upper edge {report.edge_upper:.4g}<extra></extra>"))
    fig.update_xaxes(title_text="singular value s (weight units)")
    if log_y:
        fig.update_yaxes(type="log", range=[math.log10(y_range[0]), math.log10(y_range[1])],
                         title_text="count per bin (log scale)")
    else:
        fig.update_yaxes(range=list(y_range), title_text="count per bin")
    d = comparison.delta
    summary = (f"signal rank {comparison.a.n_signal} → {comparison.b.n_signal} · energy rank "
               f"{comparison.a.energy_rank} → {comparison.b.energy_rank} · ‖ΔW‖/‖W_A‖ = {d.relative_norm:.3g}")
    return _layout(fig, f"Spectra of {comparison.name} in A and B ({comparison.shape[0]}×{comparison.shape[1]}, "
                        f"{comparison.role})", f"{context}\n{summary}" if context else summary, height=560,
                   barmode="overlay", bargap=0.0, legend=dict(x=0.99, xanchor="right", y=0.98, yanchor="top"),
                   margin=dict(t=130))


def delta_histogram(comparison: MatrixComparison, *, settings=None, context: str = "",
                    log_x: bool = False, log_y: bool = False) -> go.Figure:
    """The spectrum of ΔW = W_B − W_A with its own MP fit (spectral/figures.py's histogram); an empty figure with the
    reason when ΔW = 0."""
    if comparison.delta_spectrum is None or comparison.delta_report is None:
        return _layout(go.Figure(), f"ΔW of {comparison.name}", "W_B = W_A exactly: no update to analyse",
                       height=300)
    fig = spectrum_histogram(comparison.delta_spectrum, comparison.delta_report, settings=settings,
                             context=context, log_x=log_x, log_y=log_y)
    d = comparison.delta
    fig.update_layout(title=dict(text=html.escape(f"Spectrum of the update ΔW = W_B − W_A of {comparison.name}")))
    fig.add_annotation(text=html.escape(f"signal rank of the update {d.n_signal} · ‖ΔW‖/‖W_A‖ = {d.relative_norm:.3g}"),
                       xref="paper", yref="paper", x=0.0, y=1.02, showarrow=False, xanchor="left",
                       font=dict(size=13))
    return fig


def angle_curves(rows: Sequence[MatrixComparison], *, context: str = "", side: str = "right") -> go.Figure:
    """Principal angles between the top-k singular subspaces of A and B (k = A's signal rank), one curve per matrix:
    0° everywhere means the same directions; 90° means a direction of A is orthogonal to all of B's top-k."""
    fig = go.Figure()
    drawn = 0
    for row in rows:
        angles = row.subspace.angles_deg if side == "right" else row.subspace.angles_left_deg
        if not angles:
            continue
        drawn += 1
        fig.add_trace(go.Scatter(x=list(range(1, len(angles) + 1)), y=list(angles), mode="lines+markers",
                                 name=row.name, line=dict(color=ROLE_COLORS.get(row.role, BLACK), width=1.6),
                                 marker=dict(size=5),
                                 hovertemplate="θ_%{x} = %{y:.2f}°<extra>" + row.name + "</extra>"))
    fig.update_xaxes(title_text="index i of the principal angle (ascending)")
    fig.update_yaxes(title_text="principal angle θ_i (degrees)", range=[0, 92])
    sub = context + ("\n" if context else "") + ("no matrix of A has signal (k = 0): no subspace to compare"
                                                  if drawn == 0 else f"{side} singular vectors, k = A's signal rank")
    return _layout(fig, "How far the top singular subspaces moved", sub, height=500, showlegend=drawn <= 24)


def delta_bars(comparison: Comparison) -> go.Figure:
    """Per matched matrix: the signal rank of ΔW (top) and ‖ΔW‖_F/‖W_A‖_F (bottom), coloured by role."""
    rows = comparison.matrices
    names = [r.name for r in rows]
    colors = [ROLE_COLORS.get(r.role, BLACK) for r in rows]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06)
    fig.add_trace(go.Bar(x=names, y=[r.delta.n_signal for r in rows], marker_color=colors, showlegend=False,
                         hovertemplate="%{x}<br>ΔW signal rank %{y}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[r.delta.relative_norm for r in rows], marker_color=colors, showlegend=False,
                         hovertemplate="%{x}<br>‖ΔW‖/‖W_A‖ %{y:.3g}<extra></extra>"), row=2, col=1)
    for role in dict.fromkeys(r.role for r in rows):  # legend: one entry per role
        fig.add_trace(go.Bar(x=[None], y=[None], name=role, marker_color=ROLE_COLORS.get(role, BLACK)), row=1, col=1)
    fig.update_yaxes(title_text="signal rank of ΔW", row=1, col=1)
    fig.update_yaxes(title_text="‖ΔW‖_F / ‖W_A‖_F", row=2, col=1)
    fig.update_xaxes(tickangle=-45, row=2, col=1)
    changed = sum(r.delta.relative_norm > 0 for r in rows)
    sub = f"{comparison_context(comparison)}\n{changed} of {len(rows)} matched matrices changed"
    return _layout(fig, "What changed: the update ΔW = W_B − W_A per matrix", sub, height=640, bargap=0.15,
                   margin=dict(t=130, b=160))


# ----------------------------------------------------------------------------------------------- trajectories

LOG_STEPS = 20  # steps spanning this ratio or more are drawn on a log axis


def _step_axis(steps: Sequence[int]) -> tuple[dict, dict[int, float]]:
    """A log step axis when the positive steps span LOG_STEPS or more (step 0, the initialisation, drawn a third of
    the way to the first positive step and labelled 0), else a linear one. Returns (axis settings, step -> x)."""
    positive = sorted({s for s in steps if s > 0})
    if len(positive) >= 2 and positive[-1] / positive[0] >= LOG_STEPS:
        zero_at = positive[0] / 3
        where = {s: (float(s) if s > 0 else zero_at) for s in steps}
        ticks = sorted(set(where.values()))
        return (dict(type="log", tickvals=ticks, ticktext=[("0" if v == zero_at and 0 in where else f"{v:g}")
                                                           for v in ticks],
                     title_text="training step (log scale; 0 = initialisation)"), where)
    return dict(type="linear", title_text="training step"), {s: float(s) for s in steps}


def trajectory_ranks(result: Trajectory, *, context: str = "") -> go.Figure:
    """MP signal rank (solid) against energy rank (dashed) over training, as % of the full rank on one scale, one
    colour per role."""
    axis, where = _step_axis(result.steps)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("MP signal rank (% of full rank)",
                                                        f"energy rank at p = {result.settings.energy:g} (%)"),
                        horizontal_spacing=0.1)
    for role in sorted(result.by_role(), key=lambda r: ROLE_ORDER.index(r.role) if r.role in ROLE_ORDER else 99):
        color = ROLE_COLORS.get(role.role, BLACK)
        x = [where[s] for s in role.step]
        label = f"{role.role} ({role.matrices})"
        fig.add_trace(go.Scatter(x=x, y=role.signal_pct, mode="lines+markers", name=label, legendgroup=role.role,
                                 line=dict(color=color, width=2.2), customdata=role.step,
                                 hovertemplate="step %{customdata}: %{y:.1f}%<extra>" + label + "</extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=role.energy_pct, mode="lines+markers", name=label, legendgroup=role.role,
                                 showlegend=False, line=dict(color=color, width=2.2, dash="dash"),
                                 customdata=role.step, marker=dict(symbol="square"),
                                 hovertemplate="step %{customdata}: %{y:.1f}%<extra>" + label + "</extra>"),
                      row=1, col=2)
    fig.update_xaxes(**axis)
    fig.update_yaxes(range=[0, 102], title_text="% of the full rank")  # one scale: the two truths side by side
    sub = context or f"{result.folder} · {len(result.checkpoints)} checkpoints · {settings_line(result.settings)}"
    return _layout(fig, "Signal rank against energy rank over training", sub, height=520,
                   legend=dict(title_text="role (matrices)"), margin=dict(t=120))


def trajectory_metric(result: Trajectory, metric: str, *, by: str = "role", context: str = "") -> go.Figure:
    """One metric (σ̂, n_signal, energy_rank, alpha, stable_rank) against step: one line per matrix (by="matrix") or
    the mean over each role's matrices (by="role")."""
    if metric not in ("sigma", "n_signal", "energy_rank", "alpha", "stable_rank"):
        raise ValueError(f"unknown metric {metric!r}")
    if by not in ("matrix", "role"):
        raise ValueError(f"by must be 'matrix' or 'role', got {by!r}")
    axis, where = _step_axis(result.steps)
    fig = go.Figure()
    if by == "matrix":
        for series in result.matrices:
            values = getattr(series, metric)
            fig.add_trace(go.Scatter(x=[where[s] for s in series.step], y=[v for v in values], mode="lines+markers",
                                     name=series.name, line=dict(color=ROLE_COLORS.get(series.role, BLACK), width=1.4),
                                     marker=dict(size=5), customdata=series.step,
                                     hovertemplate="step %{customdata}: %{y:.4g}<extra>" + series.name + "</extra>"))
    else:
        roles: dict[str, dict[int, list[float]]] = {}
        for series in result.matrices:
            for step, v in zip(series.step, getattr(series, metric)):
                if v is not None and math.isfinite(v):
                    roles.setdefault(series.role, {}).setdefault(step, []).append(float(v))
        for role, per_step in roles.items():
            steps = sorted(per_step)
            fig.add_trace(go.Scatter(x=[where[s] for s in steps], y=[float(np.mean(per_step[s])) for s in steps],
                                     mode="lines+markers", name=role, customdata=steps,
                                     line=dict(color=ROLE_COLORS.get(role, BLACK), width=2.2),
                                     hovertemplate="step %{customdata}: %{y:.4g}<extra>" + role + "</extra>"))
    fig.update_xaxes(**axis)
    fig.update_yaxes(title_text=METRIC_LABELS[metric] + (" (mean over the role)" if by == "role" else ""))
    sub = context or f"{result.folder} · {len(result.checkpoints)} checkpoints · {settings_line(result.settings)}"
    return _layout(fig, f"{METRIC_LABELS[metric].split(' (')[0].capitalize()} over training, per {by}", sub,
                   height=520, showlegend=by == "role" or len(result.matrices) <= 24)
