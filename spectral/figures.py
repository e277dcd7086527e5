"""Every plotly figure of the dashboard and the CLI report, on one report-ready template.

Pure functions: data in (spectra, analysis rows, evaluation results), `go.Figure` out; no Streamlit, no I/O except
`figure_to_image`, which renders a figure server-side with kaleido and a local Chromium. The template (white
background, 14 px sans-serif, axis lines and outside ticks, the Okabe-Ito colour-blind-safe palette) is the same
in the browser, in exported PNG/SVG and in the HTML report, so a screenshot goes into a paper as is.

Histogram overlays follow RMT.md §1.6: the expected count in a bin [a, b] is M·(F(b) − F(a)) at the fitted σ̂,
with F the Marchenko-Pastur CDF of λ = s²/N.
"""
from __future__ import annotations

import html
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import kaleido
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from spectral import mp
from spectral.matrices import ROLES

TEMPLATE = "spectra_report"
FONT = "Arial, Helvetica, sans-serif"

# Okabe & Ito (2008), colour-blind safe
BLACK, ORANGE, SKY, GREEN, YELLOW, BLUE, VERMILION, PURPLE = (
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
BULK_COLOR = "#A7B4C2"  # neutral blue-grey for the noise bulk
SIGNAL_COLOR = VERMILION  # above the upper edge
BELOW_COLOR = BLUE  # below the lower edge
FIT_COLOR = BLACK
ENERGY_COLOR = SKY

ROLE_ORDER = ROLES  # the order roles are listed in, input to output (spectral/matrices.py)
ESTIMATOR_LABELS = {"bema": "BEMA", "broadening": "Gaussian broadening", "median": "median (Gavish-Donoho)"}
NULL_LABELS = {"mp": "i.i.d. MP", "biwhitened": "biwhitened MP", "permutation": "permutation (shuffled entries)"}

# the modebar's "download plot" button in the browser: PNG at twice the on-screen size
PLOTLY_CONFIG = {
    "displaylogo": False,
    "toImageButtonOptions": {"format": "png", "scale": 2, "filename": "spectra-explorer"},
    "modeBarButtonsToRemove": ["select2d", "lasso2d"],
}


def _axis_style() -> dict:
    return dict(showline=True, linecolor="#333333", linewidth=1, ticks="outside", tickcolor="#333333", ticklen=5,
                exponentformat="power",
                showgrid=True, gridcolor="#E5E5E5", gridwidth=1, zeroline=False, automargin=True,
                title=dict(standoff=10, font=dict(size=15)), tickfont=dict(size=13))


pio.templates[TEMPLATE] = go.layout.Template(layout=dict(
    font=dict(family=FONT, size=14, color="#1A1A1A"),
    title=dict(x=0.0, xanchor="left", xref="paper", font=dict(size=18, color="#111111"),
               subtitle=dict(font=dict(size=13, color="#555555"))),
    paper_bgcolor="white", plot_bgcolor="white",
    colorway=[BLUE, VERMILION, GREEN, ORANGE, PURPLE, SKY, YELLOW, BLACK],
    xaxis=_axis_style(), yaxis=_axis_style(),
    legend=dict(bgcolor="rgba(255,255,255,0.9)", bordercolor="#CCCCCC", borderwidth=1, font=dict(size=13)),
    margin=dict(l=80, r=30, t=100, b=70),
    hoverlabel=dict(font=dict(family=FONT, size=13)),
    bargap=0.0,
))


def _layout(fig: go.Figure, title: str, subtitle: str = "", *, width: int | None = None, height: int = 520,
            **extra) -> go.Figure:
    sub = "<br>".join(html.escape(line) for line in subtitle.split("\n"))
    fig.update_layout(template=TEMPLATE, title=dict(text=html.escape(title), subtitle=dict(text=sub)),
                      height=height, width=width, **extra)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# labels that say what was loaded and with which settings
# ----------------------------------------------------------------------------------------------------------------
def settings_line(settings) -> str:
    """'σ̂: BEMA · TW edges at c = 0.99 · energy p = 0.999' for an `analysis.Settings`."""
    est = ESTIMATOR_LABELS.get(settings.estimator, settings.estimator)
    null_part = "" if settings.null == "mp" else f" · null: {NULL_LABELS.get(settings.null, settings.null)}"
    return f"σ̂: {est} · TW edges at c = {settings.confidence:g} · energy p = {settings.energy:g}{null_part}"


def checkpoint_label(checkpoint: dict) -> str:
    """Short name of an analysed checkpoint ('demo', a file name) with the first 8 hex digits of its sha256."""
    path = str(checkpoint.get("path") or "checkpoint")
    name = path if path == "demo" else os.path.basename(path.rstrip("/")) or path
    sha = str(checkpoint.get("sha256") or "")[:8]
    return f"{name} (sha256 {sha})" if sha else name


def context_line(analysis) -> str:
    """The subtitle of every analysis figure: checkpoint, then settings."""
    return f"{checkpoint_label(analysis.checkpoint)} · {settings_line(analysis.settings)}"


def _shape_text(shape) -> str:
    return f"{shape[0]}×{shape[1]}"


# ----------------------------------------------------------------------------------------------------------------
# MP histogram
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class HistogramData:
    """Binned spectrum with the fitted MP expectation; shared by the single plot and the small multiples."""

    edges: np.ndarray  # bin edges in the plotted unit
    bulk: np.ndarray  # counts per bin of values inside the TW edges
    above: np.ndarray  # counts per bin of values above the upper edge
    below: np.ndarray  # counts per bin of values below the lower edge
    curve_x: np.ndarray  # smooth MP expectation: the count a bin of the plot's width centred at x would hold
    curve_y: np.ndarray
    upper: float  # upper edge in the plotted unit
    lower: float | None
    values: np.ndarray  # every plotted value (zeros dropped on a log axis)
    n_dropped: int  # zeros left out of a log axis
    unit_label: str


def histogram_data(spectrum, report, *, space: str = "singular", log_x: bool = False,
                   bins: int | None = None) -> HistogramData:
    """Bins of a matrix's spectrum split into bulk / above / below, and the MP expected counts per bin.

    space "singular": s in weight units; "eigen": λ = s²/N (RMT.md §0). The MP law is fitted at the report's σ̂.
    """
    if space not in ("singular", "eigen"):
        raise ValueError(f"space must be 'singular' or 'eigen', got {space!r}")
    N, M = spectrum.N, spectrum.M
    s = np.asarray(spectrum.singular_values, dtype=float)
    values = s if space == "singular" else s * s / N
    upper = float(report.edge_upper) if space == "singular" else float(report.edge_upper) ** 2 / N
    lower = None
    if report.edge_lower is not None:
        lower = float(report.edge_lower) if space == "singular" else float(report.edge_lower) ** 2 / N
    is_above = s > report.edge_upper
    is_below = (s < report.edge_lower) if report.edge_lower is not None else np.zeros_like(is_above)

    n_dropped = 0
    if log_x:
        keep = values > 0
        n_dropped = int(np.count_nonzero(~keep))
        values, is_above, is_below = values[keep], is_above[keep], is_below[keep]
    if values.size == 0:
        values = np.array([upper])
        is_above = is_below = np.zeros(1, dtype=bool)

    bulk_vals = values[~is_above & ~is_below]
    if bins is None:
        bins = int(np.clip(2.0 * math.sqrt(max(M, 1)), 20, 80))  # bins across the bulk
    vmin, vmax = float(values.min()), float(values.max())
    if log_x:
        lo, hi = math.log10(vmin), math.log10(vmax)
        blo, bhi = ((math.log10(bulk_vals.min()), math.log10(bulk_vals.max())) if bulk_vals.size > 1 else (lo, hi))
        step = max((bhi - blo) / bins, (hi - lo) / 400, 1e-3)
        n = max(int(math.ceil((hi - lo) / step)) + 1, 1)
        edges = 10 ** (lo - step / 2 + step * np.arange(n + 1))
    else:
        blo, bhi = ((float(bulk_vals.min()), float(bulk_vals.max())) if bulk_vals.size > 1 else (vmin, vmax))
        step = max((bhi - blo) / bins, (vmax - vmin) / 400, 1e-12 * max(abs(vmax), 1.0))
        start = max(0.0, vmin - step / 2)
        n = max(int(math.ceil((vmax - start) / step)) + 1, 1)
        edges = start + step * np.arange(n + 1)

    count = lambda mask: np.histogram(values[mask], bins=edges)[0].astype(float)  # noqa: E731
    bulk, above, below = count(~is_above & ~is_below), count(is_above), count(is_below)

    # MP expectation M·(F(b) − F(a)) for a bin of the plot's width around each x (RMT.md §1.6); the singular-value
    # law is in x = s/√N units (RMT.md §1.2), so raw s is scaled by 1/√N before its cdf
    sigma = max(float(report.sigma), 1e-300)
    law = (mp.MarchenkoPasturSingular if space == "singular" else mp.MarchenkoPastur)(spectrum.q, sigma)
    unit = math.sqrt(N) if space == "singular" else 1.0
    x_lo, x_hi = (edge * unit for edge in law.support())
    lo_plot, hi_plot = float(edges[0]), float(edges[-1])
    a, b = max(lo_plot, x_lo * 0.98), min(hi_plot, x_hi * 1.02)
    if log_x:
        a = max(a, lo_plot)
        cx = np.geomspace(max(a, 1e-300), max(b, a * 1.0001), 600)
        half = 10 ** (step / 2)
        left, right = cx / half, cx * half
    else:
        cx = np.linspace(a, max(b, a), 600)
        left, right = cx - step / 2, cx + step / 2
    Fl = np.asarray(law.cdf(np.clip(left, 0, None) / unit))
    Fr = np.asarray(law.cdf(np.clip(right, 0, None) / unit))
    cy = M * (Fr - Fl)
    unit = "singular value s (weight units)" if space == "singular" else "eigenvalue λ = s²/N (weight units²)"
    return HistogramData(edges, bulk, above, below, cx, cy, upper, lower, values,
                         n_dropped, unit)


def _histogram_traces(h: HistogramData, report, *, show_legend: bool, legend_group: str = "") -> list:
    centers = 0.5 * (h.edges[:-1] + h.edges[1:])
    widths = np.diff(h.edges)
    hover = [f"[{a:.4g}, {b:.4g}]" for a, b in zip(h.edges[:-1], h.edges[1:])]
    traces = []
    for counts, name, color in ((h.bulk, "bulk (inside TW edges)", BULK_COLOR),
                                (h.above, f"above upper edge ({int(report.n_signal)})", SIGNAL_COLOR),
                                (h.below, f"below lower edge ({int(report.n_below)})", BELOW_COLOR)):
        if counts.sum() == 0 and counts is not h.bulk:
            continue
        traces.append(go.Bar(x=centers, y=counts, width=widths, name=name, marker=dict(color=color, line=dict(
            width=0.5, color="white")), customdata=hover, legendgroup=legend_group + name, showlegend=show_legend,
            hovertemplate="%{customdata}<br>%{y:d} values<extra>" + name + "</extra>"))
    traces.append(go.Scatter(x=h.curve_x, y=h.curve_y, mode="lines", name=f"MP fit, σ̂ = {report.sigma:.4g}",
                             line=dict(color=FIT_COLOR, width=2), legendgroup=legend_group + "fit",
                             showlegend=show_legend, hovertemplate="expected %{y:.2f}<extra>MP fit</extra>"))
    return traces


def _edge_traces(h: HistogramData, confidence: float | None, y_range: tuple[float, float], *, show_legend: bool,
                 legend_group: str = "") -> list:
    """The TW-corrected edges as dashed vertical lines with legend entries (annotations collide with the bars)."""
    c = f", c = {confidence:g}" if confidence is not None and math.isfinite(confidence) else ""
    out = [go.Scatter(x=[h.upper, h.upper], y=list(y_range), mode="lines", name=f"upper edge{c} (TW)",
                      line=dict(color=SIGNAL_COLOR, width=1.6, dash="dash"), legendgroup=legend_group + "upper",
                      showlegend=show_legend, hovertemplate=f"upper edge {h.upper:.4g}<extra></extra>")]
    if h.lower is not None:
        out.append(go.Scatter(x=[h.lower, h.lower], y=list(y_range), mode="lines", name=f"lower edge{c} (TW)",
                              line=dict(color=BELOW_COLOR, width=1.6, dash="dash"), legendgroup=legend_group + "lower",
                              showlegend=show_legend, hovertemplate=f"lower edge {h.lower:.4g}<extra></extra>"))
    return out


def _y_range(h: HistogramData, log_y: bool) -> tuple[float, float]:
    ymax = max(float((h.bulk + h.above + h.below).max()), float(h.curve_y.max()) if h.curve_y.size else 1.0, 1.0)
    return (0.5, ymax * 1.6) if log_y else (0.0, ymax * 1.1)


def spectrum_histogram(spectrum, report, *, settings=None, context: str = "", space: str = "singular",
                       log_x: bool = False, log_y: bool = False, bins: int | None = None) -> go.Figure:
    """Histogram of one matrix's spectrum with the fitted MP density, TW edges and outliers (RMT.md §1-§2).

    Bars are stacked by class (bulk, above the upper edge, below the lower edge); a rug under the plot marks every
    outlier individually, since a single far spike is a one-count bar that is easy to miss.
    """
    h = histogram_data(spectrum, report, space=space, log_x=log_x, bins=bins)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.9, 0.1], vertical_spacing=0.02)
    for tr in _histogram_traces(h, report, show_legend=True):
        fig.add_trace(tr, row=1, col=1)
    # rug of outliers
    s = h.values
    for mask, name, color, symbol in ((s > h.upper, "above", SIGNAL_COLOR, "triangle-up"),
                                      ((s < h.lower) if h.lower is not None else np.zeros(s.size, bool), "below",
                                       BELOW_COLOR, "triangle-down")):
        if mask.any():
            fig.add_trace(go.Scatter(x=s[mask], y=np.zeros(int(mask.sum())), mode="markers", name=name,
                                     marker=dict(color=color, symbol=symbol, size=9, line=dict(width=0.5,
                                                                                                color="white")),
                                     showlegend=False, hovertemplate="%{x:.4g}<extra>" + name + " edge</extra>"),
                          row=2, col=1)
    confidence = settings.confidence if settings is not None else None
    y0, y1 = _y_range(h, log_y)
    for tr in _edge_traces(h, confidence, (y0, y1), show_legend=True):
        fig.add_trace(tr, row=1, col=1)
    for tr in _edge_traces(h, confidence, (-1, 1), show_legend=False):
        fig.add_trace(tr, row=2, col=1)

    fig.update_yaxes(visible=False, range=[-1, 1], showgrid=False, row=2, col=1)
    fig.update_xaxes(type="log" if log_x else "linear")  # both rows: shared axes must have one type
    if log_x:
        lo, hi = math.log10(h.edges[0]), math.log10(h.edges[-1])
        pad = 0.02 * (hi - lo)
        fig.update_xaxes(range=[lo - pad, hi + pad], dtick=1 if hi - lo > 3 else "D2")
    else:
        pad = 0.02 * (h.edges[-1] - h.edges[0])
        fig.update_xaxes(range=[max(h.edges[0] - pad, 0.0) if h.edges[0] >= 0 else h.edges[0] - pad,
                                h.edges[-1] + pad])
    fig.update_xaxes(title_text=h.unit_label + (" (log scale)" if log_x else ""), row=2, col=1)
    fig.update_xaxes(showticklabels=False, title_text="", row=1, col=1)
    if log_y:
        fig.update_yaxes(type="log", range=[math.log10(y0), math.log10(y1)], row=1, col=1,
                         title_text="count per bin (log scale)")
    else:
        fig.update_yaxes(range=[y0, y1], row=1, col=1, title_text="count per bin")
    title = f"Spectrum of {spectrum.name} ({_shape_text(spectrum.shape)}, {spectrum.role})"
    sub = context or (settings_line(settings) if settings is not None else "")
    summary = f"{report.n_signal} above, {report.n_below} below the edges of {spectrum.M}"
    if h.n_dropped:
        summary += f"; {h.n_dropped} zero values not shown on the log axis"
    _layout(fig, title, f"{sub}\n{summary}" if sub else summary, height=560, barmode="stack",
            legend=dict(x=0.99, xanchor="right", y=0.98, yanchor="top"), margin=dict(t=115))
    return fig


def spectrum_grid(spectra: Sequence, reports: Sequence, *, title: str, settings=None, context: str = "",
                  space: str = "singular", log_x: bool = False, log_y: bool = False, cols: int = 3) -> go.Figure:
    """Small multiples: one MP histogram per matrix (e.g. every matrix of one role), same template and legend."""
    n = len(spectra)
    if n == 0:
        return _layout(go.Figure(), title, "no matrices to show")
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    names = [f"{html.escape(sp.name)}<br>{_shape_text(sp.shape)} · {r.n_signal} above" +
             (f", {r.n_below} below" if r.n_below else "") for sp, r in zip(spectra, reports)]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.06,
                        vertical_spacing=min(0.12, 0.5 / rows))
    unit = ""
    for i, (sp, rep) in enumerate(zip(spectra, reports)):
        h = histogram_data(sp, rep, space=space, log_x=log_x, bins=30)
        unit = h.unit_label
        r, c = i // cols + 1, i % cols + 1
        y0, y1 = _y_range(h, log_y)
        for tr in _histogram_traces(h, rep, show_legend=False, legend_group="g") + _edge_traces(
                h, None, (y0, y1), show_legend=False, legend_group="g"):
            fig.add_trace(tr, row=r, col=c)
        fig.update_xaxes(type="log" if log_x else "linear", row=r, col=c)
        if log_y:
            fig.update_yaxes(type="log", range=[math.log10(y0), math.log10(y1)], row=r, col=c)
        else:
            fig.update_yaxes(range=[y0, y1], row=r, col=c)
    # one legend for all panels
    for name, color in (("bulk", BULK_COLOR), ("above upper edge", SIGNAL_COLOR), ("below lower edge", BELOW_COLOR)):
        fig.add_trace(go.Bar(x=[None], y=[None], name=name, marker_color=color, showlegend=True), row=1, col=1)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="MP fit at σ̂", line=dict(color=FIT_COLOR)),
                  row=1, col=1)
    conf = f" (TW, c = {settings.confidence:g})" if settings is not None else " (TW)"
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="upper edge" + conf,
                             line=dict(color=SIGNAL_COLOR, dash="dash")), row=1, col=1)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="lower edge" + conf,
                             line=dict(color=BELOW_COLOR, dash="dash")), row=1, col=1)
    for ann in fig.layout.annotations:
        ann.font = dict(size=12)
    sub = context or (settings_line(settings) if settings is not None else "")
    _layout(fig, title, f"{sub} · x: {unit}, y: count per bin" if sub else f"x: {unit}, y: count per bin",
            height=300 * rows + 230, barmode="stack",
            legend=dict(orientation="h", x=0, y=-60 / (300 * rows), yanchor="top", traceorder="normal"))
    fig.update_layout(margin=dict(t=150, b=110))
    fig.update_xaxes(title=dict(font=dict(size=12)), tickfont=dict(size=11))
    fig.update_yaxes(tickfont=dict(size=11))
    return fig


def scree_plot(spectrum, report, *, settings=None, context: str = "") -> go.Figure:
    """Singular values by index (log y) with the upper edge, the MP signal rank and the energy rank marked."""
    s = np.asarray(spectrum.singular_values, dtype=float)
    idx = np.arange(1, s.size + 1)
    sig = s > report.edge_upper
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=idx[~sig], y=s[~sig], mode="markers", name="bulk",
                             marker=dict(color=BULK_COLOR, size=5)))
    fig.add_trace(go.Scatter(x=idx[sig], y=s[sig], mode="markers", name=f"above upper edge ({int(sig.sum())})",
                             marker=dict(color=SIGNAL_COLOR, size=6)))
    positive = s[s > 0]
    y0 = float(positive.min()) / 1.3 if positive.size else 1e-6
    y1 = float(positive.max()) * 1.4 if positive.size else 1.0
    fig.add_trace(go.Scatter(x=[0, s.size + 1], y=[report.edge_upper] * 2, mode="lines",
                             name=f"upper edge s = {report.edge_upper:.4g}",
                             line=dict(color=SIGNAL_COLOR, dash="dash", width=1.6)))
    p = settings.energy if settings is not None else None
    k = max(report.energy_rank, 1)
    fig.add_trace(go.Scatter(x=[k, k], y=[y0, y1], mode="lines",
                             name=f"energy rank {report.energy_rank}" + (f" (p = {p:g})" if p else ""),
                             line=dict(color=BLUE, dash="dot", width=2)))
    fig.update_yaxes(type="log", title_text="singular value s (weight units, log scale)",
                     range=[math.log10(y0), math.log10(y1)], dtick=1 if math.log10(y1 / y0) > 3 else "D2")
    fig.update_xaxes(title_text="index i (descending order)", range=[0, s.size + 1])
    sub = context or (settings_line(settings) if settings is not None else "")
    title = f"Singular values of {spectrum.name}: signal rank {report.n_signal}, energy rank {report.energy_rank}"
    return _layout(fig, title, sub, height=440, legend=dict(x=0.99, xanchor="right", y=0.98))


# ----------------------------------------------------------------------------------------------------------------
# signal rank vs energy rank
# ----------------------------------------------------------------------------------------------------------------
def rank_rows_by_matrix(analysis) -> list[dict]:
    """Per matrix: MP signal rank and energy rank as counts and as % of the full rank (for the chart and table)."""
    rows = []
    for r in analysis.matrices:
        rows.append({"label": r.name, "role": r.role, "rank": r.rank, "n_signal": r.n_signal,
                     "energy_rank": r.energy_rank, "signal_pct": 100.0 * r.n_signal / max(r.rank, 1),
                     "utilization_pct": 100.0 * r.utilization, "null_failed": 0 if r.null_ok else 1, "matrices": 1})
    return rows


def rank_contrast(rows: Sequence[dict], *, title: str, context: str = "", energy: float | None = None,
                  label_key: str = "label") -> go.Figure:
    """Grouped horizontal bars: MP signal rank % against energy utilization % of full rank, per row.

    rows: dicts with `label_key`, `signal_pct`, `utilization_pct`, `n_signal`, `energy_rank` and `rank`
    (`full_rank` is accepted for role rows); with `null_failed` (of `matrices`), a signal bar whose null does not fit
    every matrix behind it is hatched and its label says how many: that count is not a detection (RMT.md §11).
    """
    labels = [str(r[label_key]) for r in rows][::-1]  # first row on top
    full = [int(r.get("rank", r.get("full_rank", 0))) for r in rows][::-1]
    sig = [float(r["signal_pct"]) for r in rows][::-1]
    util = [float(r["utilization_pct"]) for r in rows][::-1]
    n_sig = [int(r["n_signal"]) for r in rows][::-1]
    n_en = [int(r["energy_rank"]) for r in rows][::-1]
    failed = [int(r.get("null_failed", 0)) for r in rows][::-1]
    of = [int(r.get("matrices", 1)) for r in rows][::-1]
    marks = ["" if f == 0 else ("  null fails" if o == 1 else f"  null fails on {f}/{o}") for f, o in zip(failed, of)]
    p = f" at p = {energy:g}" if energy is not None else ""
    fig = go.Figure()
    fig.add_trace(go.Bar(y=labels, x=util, orientation="h", name=f"energy rank{p} (utilization)",
                         marker_color=ENERGY_COLOR, text=[f"{v:.0f}%  ({k}/{f})" for v, k, f in zip(util, n_en, full)],
                         textposition="outside", cliponaxis=False, textfont=dict(size=12),
                         hovertemplate="%{y}<br>energy rank %{text}<extra></extra>"))
    fig.add_trace(go.Bar(y=labels, x=sig, orientation="h",
                         name="MP signal rank (above the TW edge)" + (": hatched where the null does not fit"
                                                                      if any(failed) else ""),
                         marker=dict(color=SIGNAL_COLOR, pattern=dict(shape=["/" if f else "" for f in failed])),
                         text=[f"{v:.1f}%  ({k}/{f}){m}" for v, k, f, m in zip(sig, n_sig, full, marks)],
                         textposition="outside", cliponaxis=False, textfont=dict(size=12),
                         hovertemplate="%{y}<br>signal rank %{text}<extra></extra>"))
    n = len(labels)
    fig.update_layout(barmode="group", bargap=0.25, bargroupgap=0.05, legend=dict(
        orientation="h", x=0, y=1.0, yanchor="bottom", traceorder="reversed"))
    fig.update_xaxes(title_text="% of full rank min(rows, cols)", range=[0, 118],
                     tickvals=[0, 20, 40, 60, 80, 100], ticktext=["0%", "20%", "40%", "60%", "80%", "100%"])
    fig.update_yaxes(showgrid=False, tickfont=dict(size=12))
    return _layout(fig, title, context, height=max(320, 46 * n + 190), margin=dict(t=130))


def rank_contrast_by_matrix(analysis) -> go.Figure:
    return rank_contrast(rank_rows_by_matrix(analysis),
                         title="Signal rank vs energy rank, per matrix", context=context_line(analysis),
                         energy=analysis.settings.energy)


def rank_contrast_by_role(analysis, role_rows: Sequence[dict]) -> go.Figure:
    """role_rows: `spectral.analysis.role_table(analysis)`."""
    return rank_contrast(role_rows, title="Signal rank vs energy rank, per matrix role", label_key="role",
                         context=context_line(analysis), energy=analysis.settings.energy)


def params_kept_bars(analysis) -> go.Figure:
    """Parameters a rank-k factorisation would store at the MP signal rank and at the energy rank (summary)."""
    s = analysis.summary
    total = s["matrix_params"]
    names = ["all matrix parameters (dense)", f"factorised at energy rank (p = {analysis.settings.energy:g})",
             "factorised at MP signal rank"]
    vals = [total, s["params_kept_energy"], s["params_kept_mp"]]
    fig = go.Figure(go.Bar(y=names[::-1], x=vals[::-1], orientation="h",
                           marker_color=[SIGNAL_COLOR, ENERGY_COLOR, BULK_COLOR],
                           text=[f"{v:,} ({100 * v / max(total, 1):.1f}%)" for v in vals[::-1]],
                           textposition="outside", cliponaxis=False))
    fig.update_xaxes(title_text="parameters stored", range=[0, total * 1.35], tickformat="~s")
    fig.update_yaxes(showgrid=False)
    return _layout(fig, "Parameters each view of rank would keep", context_line(analysis), height=300)


# ----------------------------------------------------------------------------------------------------------------
# pruning
# ----------------------------------------------------------------------------------------------------------------
KL_FLOOR = 1e-6  # KL below this is drawn at the floor of the log axis


def compression_vs_kl(points: Sequence[dict], *, current: dict | None = None, title: str = "Compression against KL",
                      context: str = "", damage: str = "kl") -> go.Figure:
    """Compression ratio (x) against mean KL(original ‖ modified) in nats per position (y, log).

    damage="cosine" draws 1 − cosine of the output embeddings instead, for encoders, which predict no tokens.

    points: dicts with `label`, `compression`, `kl`, optional `agreement` and `group` (points of one group, e.g. a
    sweep of the energy level, are joined by a line; points without a group are reference markers).
    current: the user's current plan, drawn as a star.
    """
    fig = go.Figure()
    groups: dict[str, list[dict]] = {}
    refs = []
    for pt in points:
        (groups.setdefault(pt["group"], []) if pt.get("group") else refs).append(pt)
    colors = [BLUE, GREEN, ORANGE, PURPLE, SKY, BLACK]
    symbols = ["circle", "square", "diamond", "triangle-up", "cross", "x"]

    if damage not in ("kl", "cosine"):
        raise ValueError(f"damage must be 'kl' or 'cosine', got {damage!r}")

    def _value(pt):
        if damage == "kl":
            return pt.get("kl")
        return None if pt.get("cosine") is None else 1.0 - float(pt["cosine"])

    def _y(pt):
        v = _value(pt)
        return max(float(v), KL_FLOOR) if v is not None and math.isfinite(float(v)) else None

    def _hover(pt):
        agr, v = pt.get("agreement"), _value(pt)
        shown = "n/a" if v is None else f"{float(v):.3g}"
        what = f"KL {shown} nats" if damage == "kl" else f"1 − cosine {shown}"
        return (f"{pt['label']}<br>compression {pt['compression']:.2f}×<br>{what}"
                + (f"<br>agreement {100 * agr:.1f}%" if agr is not None else ""))

    for i, (name, pts) in enumerate(groups.items()):
        pts = sorted(pts, key=lambda p: p["compression"])
        color = colors[i % len(colors)]
        fig.add_trace(go.Scatter(x=[p["compression"] for p in pts], y=[_y(p) for p in pts],
                                 mode="lines+markers+text", name=name, line=dict(color=color, width=2),
                                 marker=dict(size=8, symbol=symbols[i % len(symbols)]),
                                 text=[p.get("short", p["label"]) for p in pts], textposition="middle right",
                                 textfont=dict(size=11, color=color),
                                 hovertext=[_hover(p) for p in pts], hovertemplate="%{hovertext}<extra></extra>"))
    if refs:
        refs = sorted(refs, key=lambda p: (p["compression"], _y(p) or 0))
        fig.add_trace(go.Scatter(x=[p["compression"] for p in refs], y=[_y(p) for p in refs],
                                 mode="markers+text", name="standard strategies", text=[p["label"] for p in refs],
                                 textposition=["top center" if i % 2 == 0 else "bottom center"
                                               for i in range(len(refs))], textfont=dict(size=12),
                                 marker=dict(size=11, color="white", line=dict(color=BLACK, width=2)),
                                 hovertext=[_hover(p) for p in refs], hovertemplate="%{hovertext}<extra></extra>"))
    if current is not None and _value(current) is not None:
        fig.add_trace(go.Scatter(x=[current["compression"]], y=[_y(current)], mode="markers",
                                 name=f"current: {current['label']}",
                                 marker=dict(size=20, symbol="star", color=VERMILION, line=dict(color=BLACK, width=1)),
                                 hovertext=[_hover(current)], hovertemplate="%{hovertext}<extra></extra>"))
    xs = [float(p["compression"]) for p in [*points, *([current] if current else [])]
          if p.get("compression") is not None and math.isfinite(float(p["compression"])) and p["compression"] > 0]
    lo, hi = (min(xs), max(xs)) if xs else (1.0, 10.0)
    lo, hi = min(lo, 1.0) / 1.15, hi * 1.25
    ticks = [t for t in (1, 1.25, 1.5, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100, 200, 500, 1000) if lo <= t <= hi]
    fig.update_xaxes(title_text="compression (bytes before / after, log scale)", type="log",
                     range=[math.log10(lo), math.log10(hi)], tickvals=ticks, ticktext=[f"{t:g}×" for t in ticks])
    y_title = ("KL(original ‖ modified), nats per position (log)" if damage == "kl"
               else "1 − cosine of output embeddings (log)")
    fig.update_yaxes(type="log", title_text=y_title, exponentformat="power")
    floor_note = f" · {'KL' if damage == 'kl' else '1 − cosine'} below {KL_FLOOR:g} drawn at {KL_FLOOR:g}"
    return _layout(fig, title, context + (floor_note if context else ""),
                   height=520, legend=dict(x=0.01, y=0.99, xanchor="left", yanchor="top"))


def sensitivity_heatmap(values: Sequence[Sequence[float | None]], rows: Sequence[str], cols: Sequence[str], *,
                        title: str = "Sensitivity: KL when one matrix alone is cut", context: str = "",
                        colorbar_title: str = "KL (nats/position)", log_color: bool = True) -> go.Figure:
    """Heatmap of a per-matrix scan: rows (e.g. layers) × cols (e.g. roles), cell = KL that cut alone causes.

    Missing cells are None. With log_color the colour is log10 of the value, labelled in the original units.
    """
    z = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    shown = np.log10(np.clip(z, KL_FLOOR, None)) if log_color else z
    text = [["" if not math.isfinite(v) else f"{v:.3g}" for v in row] for row in z]
    finite = shown[np.isfinite(shown)]
    colorbar = dict(title=dict(text=colorbar_title, side="right"))
    if log_color and finite.size:
        lo, hi = math.floor(finite.min()), math.ceil(finite.max())
        ticks = list(range(lo, hi + 1)) if hi > lo else [lo]
        colorbar.update(tickvals=ticks, ticktext=[f"1e{t}" for t in ticks])
    fig = go.Figure(go.Heatmap(z=shown, x=list(cols), y=list(rows), text=text, texttemplate="%{text}",
                               textfont=dict(size=12), colorscale="YlOrRd", colorbar=colorbar, hoverongaps=False,
                               xgap=2, ygap=2, customdata=z,
                               hovertemplate="%{y} · %{x}<br>KL %{customdata:.4g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", showgrid=False, showline=False, ticks="")
    fig.update_xaxes(showgrid=False, showline=False, ticks="", side="bottom")
    return _layout(fig, title, context, height=max(320, 60 * len(rows) + 200))


def sensitivity_from_scan(rows: Sequence[dict], *, by: str = "matrix", title: str | None = None,
                          context: str = "") -> go.Figure:
    """Heatmap of `spectral.evaluation.sensitivity_scan` rows: layer × role for by="matrix", one row for by="role".

    Matrices outside numbered layers (embedding, head) get their own row named by their role."""
    metric = "kl" if any(r.get("kl") is not None for r in rows) else "cosine"
    unit = "KL (nats/position)" if metric == "kl" else "cosine to original"
    roles = sorted({r["role"] for r in rows}, key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else 99)
    if by == "role":
        values = [[next((r[metric] for r in rows if r["role"] == role), None) for role in roles]]
        return sensitivity_heatmap(values, ["whole role cut"], roles, title=title or "Sensitivity by role",
                                   context=context, colorbar_title=unit, log_color=metric == "kl")
    layers = sorted({r["layer"] for r in rows if r.get("layer") is not None})
    row_names = [f"layer {layer}" for layer in layers]
    values = [[None] * len(roles) for _ in layers]
    extra: list[tuple[str, dict]] = []
    for r in rows:
        if r.get("layer") is None:
            extra.append((r["unit"], r))
            continue
        values[layers.index(r["layer"])][roles.index(r["role"])] = r[metric]
    for unit_name, r in extra:
        row = [None] * len(roles)
        row[roles.index(r["role"])] = r[metric]
        row_names.insert(0, unit_name) if r["role"] == "embedding" else row_names.append(unit_name)
        values.insert(0, row) if r["role"] == "embedding" else values.append(row)
    return sensitivity_heatmap(values, row_names, roles, title=title or "Sensitivity: one matrix cut at a time",
                               context=context, colorbar_title=unit, log_color=metric == "kl")


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------
class FigureExportError(RuntimeError):
    """Server-side image export failed (no Chromium, kaleido missing or its render failed); message is for users."""


CHROME_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
EXPORT_FORMATS = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf", "jpeg": "image/jpeg"}


def find_browser() -> str | None:
    """The Chromium kaleido drives: $BROWSER_PATH (kaleido's own variable), else Debian's chromium, else PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env
    for path in CHROME_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if found := shutil.which(name):
            return found
    return None


def figure_to_image(fig: go.Figure, fmt: str = "png", *, scale: float = 2.0, width: int | None = None,
                    height: int | None = None, timeout: float = 90.0) -> bytes:
    """Render a figure to PNG/SVG/PDF/JPEG bytes server-side with kaleido 1.x and a local Chromium.

    Size defaults to the figure's own layout size (or 1100 × its height), scale 2 for PNG (print resolution).
    """
    fmt = fmt.lower()
    if fmt not in EXPORT_FORMATS:
        raise FigureExportError(f"unknown image format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    browser = find_browser()
    if browser is None:
        raise FigureExportError("server-side export needs Chromium (apt-get install chromium) or $BROWSER_PATH")
    opts = {"format": fmt, "width": int(width or fig.layout.width or 1100),
            "height": int(height or fig.layout.height or 600), "scale": scale}
    try:
        data = kaleido.calc_fig_sync(fig, opts=opts, kopts={"path": browser, "timeout": timeout})
    except Exception as exc:  # kaleido raises a variety of errors from the browser; one readable line for the user
        raise FigureExportError(f"image export with {browser} failed: {type(exc).__name__}: {exc}"[:400]) from exc
    if isinstance(data, str):
        data = data.encode()
    return bytes(data)


def safe_filename(text: str) -> str:
    """A file-system-safe stem for downloads ('blocks.0.attn' → 'blocks.0.attn')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "figure"


def report_html(title: str, header: Sequence[tuple[str, str]], figures: Iterable[tuple[str, go.Figure]],
                tables: Iterable[tuple[str, Sequence[dict]]] = ()) -> str:
    """One self-contained HTML report: plotly.js embedded once, interactive figures, tables; opens offline."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:Arial,Helvetica,sans-serif;max-width:1200px;margin:2em auto;color:#1a1a1a;"
             "padding:0 1em}h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}"
             "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}td,th{border:1px solid #ddd;"
             "padding:3px 8px;text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}"
             "dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dt{font-weight:bold}"
             ".figure{margin:1em 0 2em 0}</style></head><body>", f"<h1>{html.escape(title)}</h1><dl>"]
    for key, value in header:
        parts.append(f"<dt>{html.escape(str(key))}</dt><dd style='margin:0'>{html.escape(str(value))}</dd>")
    parts.append("</dl>")
    first = True
    for caption, fig in figures:
        parts.append(f"<h2>{html.escape(caption)}</h2><div class='figure'>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                                 config=PLOTLY_CONFIG, default_width="100%"))
        parts.append("</div>")
        first = False
    for caption, rows in tables:
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(table_html(rows))
    parts.append("<p style='color:#777;font-size:0.8em'>Made with Spectra Explorer.</p></body></html>")
    return "".join(parts)


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return html.escape("; ".join(map(str, v)))
    return html.escape("" if v is None else str(v))


def table_html(rows: Sequence[dict]) -> str:
    if not rows:
        return "<p>(empty)</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
