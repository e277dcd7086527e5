"""Plotly figures of the research views, on the report template of spectral/figures.py.

Every function takes a view's JSON dictionary (`<View>Result.to_dict()`, or the file the CLI wrote), so a figure can
be redrawn from a saved run; no Streamlit, no I/O.
"""
from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from spectral import figures as base
from spectral.figures import (
    BLACK,
    BLUE,
    BULK_COLOR,
    GREEN,
    KL_FLOOR,
    ORANGE,
    SIGNAL_COLOR,
    SKY,
    TEMPLATE,
    VERMILION,
)

CONDITION_STYLE = {"tied": (VERMILION, "circle", "tied: both uses cut"),
                   "input": (BLUE, "square", "input use only (embedding)"),
                   "output": (GREEN, "diamond", "output use only (LM head)")}
CLASS_STYLE = {"signal": (SIGNAL_COLOR, "above the upper edge"), "bulk": (BULK_COLOR, "bulk"),
               "left": (BLUE, "below the lower edge (left outliers)")}
ESTIMATOR_STYLE = {"bema": (BLUE, "BEMA"), "broadening": (ORANGE, "Gaussian broadening"),
                   "median": (GREEN, "median")}
REPLACEMENT_STYLE = {"rank1": (BLUE, "rank-1"), "random": (ORANGE, "random, same norm"), "zero": (BLACK, "zeros")}
METHOD_STYLE = {"plain": (BLUE, "circle", "plain SVD"), "whitened": (VERMILION, "diamond", "whitened SVD")}


def _layout(fig: go.Figure, title: str, subtitle: str = "", *, height: int = 520, **extra) -> go.Figure:
    sub = "<br>".join(html.escape(line) for line in subtitle.split("\n") if line)
    fig.update_layout(template=TEMPLATE, title=dict(text=html.escape(title), subtitle=dict(text=sub)),
                      height=height, **extra)
    return fig


def _floor(v):
    return None if v is None or not math.isfinite(float(v)) else max(float(v), KL_FLOOR)


def _log_ticks(values) -> dict:
    """Readable ticks for a log axis spanning `values`: 1-2-5 steps when it spans under three decades."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) > 0]
    if not vals:
        return {}
    lo, hi = min(vals), max(vals)
    if math.log10(hi / lo) > 3:
        return {"dtick": 1}
    mantissas = (1, 2, 5) if math.log10(hi / lo) > 1 else (1, 2, 3, 4, 5, 6, 7, 8, 9)
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in mantissas]
    ticks = [float(f"{t:.6g}") for t in ticks if lo / 1.5 <= t <= hi * 1.5]
    return {"tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def context(doc: dict) -> str:
    """Checkpoint label and evaluation batch of a view's JSON."""
    parts = [base.checkpoint_label(doc.get("checkpoint") or {})]
    ev = doc.get("eval")
    if ev:
        parts.append(f"eval: {ev['tokens']:,} positions ({ev['source']})")
    return " · ".join(parts)


def _damage_label(doc: dict) -> str:
    return "KL(original ‖ modified), nats/position" if doc.get("metric") != "cosine" else "1 − cosine"


def _damage(d: dict, doc: dict):
    if doc.get("metric") == "cosine":
        return None if d.get("cosine") is None else 1.0 - d["cosine"]
    return d.get("kl")


# ------------------------------------------------------------------------------------------------------ truths

def truths_roles_figure(doc: dict) -> go.Figure:
    """MP signal % against energy utilisation % per matrix role (the study's two tables side by side)."""
    s = doc["settings"]
    return base.rank_contrast(doc["roles"], title="Two truths: MP signal rank vs energy rank, per matrix role",
                              context=f"{context(doc)} · σ̂ {s['estimator']}, c = {s['confidence']:g}",
                              energy=s["energy"], label_key="role")


NULL_STYLE = {"mp": (SIGNAL_COLOR, "i.i.d. MP"), "biwhitened": (ORANGE, "biwhitened MP"),
              "permutation": (GREEN, "permutation")}


def nulls_figure(doc: dict) -> go.Figure:
    """Signal % of the full rank per matrix role under each null (spectral/research/nulls.py), and under each
    matrix's fitting null; a bar is hatched where its null does not fit every matrix of the role."""
    roles = doc["roles"][::-1]  # first role on top
    labels = [r["role"] for r in roles]
    fig = go.Figure()
    for null in doc["nulls"]:
        color, name = NULL_STYLE.get(null, (BLACK, null))
        fits = [r["null_fits"][null] for r in roles]
        fig.add_trace(go.Bar(y=labels, x=[r["signal_pct"][null] for r in roles], orientation="h", name=name,
                             marker=dict(color=color, pattern=dict(shape=["" if f == r["matrices"] else "/"
                                                                          for f, r in zip(fits, roles)])),
                             text=[f"{r['signal_pct'][null]:.1f}%  (fits {f}/{r['matrices']})"
                                   for f, r in zip(fits, roles)],
                             textposition="outside", cliponaxis=False))
    fig.add_trace(go.Bar(y=labels, x=[r.get("fitting_signal_pct") or 0.0 for r in roles], orientation="h",
                         name="under each matrix's fitting null", marker_color=BLACK,
                         text=[("n/a" if r.get("fitting_signal_pct") is None else f"{r['fitting_signal_pct']:.1f}%")
                               + (f"  ({r['unfitted']} fit none)" if r["unfitted"] else "") for r in roles],
                         textposition="outside", cliponaxis=False))
    fig.update_layout(barmode="group", bargap=0.2, legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom",
                                                               traceorder="reversed"))
    fig.update_xaxes(title_text="singular values above the null's edge, % of full rank", rangemode="tozero")
    fig.update_yaxes(showgrid=False)
    n = len(labels) * (len(doc["nulls"]) + 1)
    return _layout(fig, "Signal under each null, per matrix role (hatched: the null does not fit every matrix)",
                   context(doc), height=max(360, 22 * n + 200), margin=dict(t=130))


def truths_rules_figure(doc: dict) -> go.Figure:
    """Agreement (bars) and KL (labels) of each pruning rule applied to every matrix."""
    rules = doc["rules"]
    labels = [r["label"] for r in rules]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("top-1 agreement with the untouched model", _damage_label(doc) + " (log)"))
    agreement = [r["agreement"] for r in rules]
    damage = [_damage(r, doc) for r in rules]
    fig.add_trace(go.Bar(y=labels, x=[100 * a if a is not None else None for a in agreement], orientation="h",
                         marker_color=SKY, name="agreement", text=[f"{100 * a:.1f}%" if a is not None else "n/a"
                                                                    for a in agreement],
                         textposition="outside", cliponaxis=False, showlegend=False,
                         hovertemplate="%{y}: %{x:.1f}%<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(y=labels, x=[_floor(v) for v in damage], orientation="h", marker_color=VERMILION,
                         name="KL", text=[f"{v:.3g}" if v is not None else "n/a" for v in damage],
                         textposition="outside", cliponaxis=False, showlegend=False,
                         customdata=[f"{r['compression']:.2f}×" if r.get("compression") else "n/a" for r in rules],
                         hovertemplate="%{y}: %{text}<br>compression %{customdata}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(range=[0, 115], ticksuffix="%", row=1, col=1)
    fig.update_xaxes(type="log", row=1, col=2)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    t = doc["totals"]
    sub = (f"{context(doc)}\nMP calls {t['prunable_mp_pct']:.1f}% of matrix parameters prunable, the energy view "
           f"{t['prunable_energy_pct']:.1f}%; signal {t['signal_pct']:.1f}% vs utilisation "
           f"{t['utilization_pct']:.1f}% of singular values")
    return _layout(fig, "Two truths: what each pruning rule does to the outputs", sub,
                   height=max(360, 44 * len(labels) + 220), margin=dict(t=140))


# ------------------------------------------------------------------------------------------------------- tying

def tying_figure(doc: dict, name: str | None = None) -> go.Figure:
    """KL and agreement against the relative reconstruction error of a tied matrix, three conditions, cliff marked."""
    if not doc["matrices"]:
        return _layout(go.Figure(), "Weight tying", "no tied matrix in this model")
    m = next((x for x in doc["matrices"] if x["name"] == name), doc["matrices"][0])
    pts = [p for p in m["points"] if p["relative_error"] and p["relative_error"] > 0]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=(_damage_label(doc) + " (log-log)", "top-1 agreement"))
    for c in doc["conditions"]:
        color, symbol, label = CONDITION_STYLE[c]
        x = [p["relative_error"] for p in pts]
        hover = [f"energy {p['energy']:g}, rank {p['kept_rank']}<br>ε = {p['relative_error']:.4f}<br>"
                 f"KL {p[c]['kl'] if p[c]['kl'] is not None else float('nan'):.3g}, "
                 f"agreement {100 * p[c]['agreement']:.1f}%" for p in pts]
        fig.add_trace(go.Scatter(x=x, y=[_floor(_damage(p[c], doc)) for p in pts], mode="lines+markers",
                                 name=label, legendgroup=c, line=dict(color=color, width=2),
                                 marker=dict(symbol=symbol, size=8, color=color), hovertext=hover,
                                 hovertemplate="%{hovertext}<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[100 * p[c]["agreement"] for p in pts], mode="lines+markers", name=label,
                                 legendgroup=c, showlegend=False, line=dict(color=color, width=2),
                                 marker=dict(symbol=symbol, size=8, color=color), hovertext=hover,
                                 hovertemplate="%{hovertext}<extra></extra>"), row=1, col=2)
        fit = (m.get("fits") or {}).get(c)
        if fit and x:
            xs = np.geomspace(min(x), max(x), 30)
            fig.add_trace(go.Scatter(x=xs, y=fit["a"] * xs ** fit["b"], mode="lines", legendgroup=c,
                                     showlegend=False, line=dict(color=color, width=1, dash="dot"),
                                     hoverinfo="skip"), row=1, col=1)
    cliff = m.get("cliff")
    if cliff:
        for col in (1, 2):
            fig.add_vline(x=cliff["relative_error"], line=dict(color=BLACK, dash="dash", width=1), row=1, col=col)
        fig.add_annotation(x=math.log10(cliff["relative_error"]), y=100 * cliff["agreement_level"], row=1, col=2,
                           text=f"cliff: tied agreement < {100 * cliff['agreement_level']:.0f}%<br>at ε = "
                                f"{cliff['relative_error']:.3f}", showarrow=True, ax=-110, ay=60,
                           bgcolor="rgba(255,255,255,0.9)", font=dict(size=12))
    fig.update_xaxes(type="log", title_text="relative error ‖W − W_k‖_F / ‖W‖_F (log)",
                     **_log_ticks([p["relative_error"] for p in pts]))
    fig.update_yaxes(type="log", dtick=1, row=1, col=1)
    fig.update_yaxes(ticksuffix="%", row=1, col=2)
    amp = m.get("amplification")
    gain = (m.get("gain") or {}).get("tied")
    sub = (f"{context(doc)} · {m['name']} ({m['shape'][0]}×{m['shape'][1]}) tied with {', '.join(m['tied_with'])}\n"
           f"amplification KL(tied)/[KL(input)+KL(output)] = {amp:.3f}" if amp is not None else
           f"{context(doc)} · {m['name']}")
    if gain is not None:
        sub += f" · output gain (relative logit error / ε) = {gain:.3f}"
    return _layout(fig, "Weight tying: cutting one use of the tied matrix at a time", sub, height=540,
                   legend=dict(orientation="h", x=0, y=-0.22, yanchor="top"), margin=dict(t=130, b=120))


# -------------------------------------------------------------------------------------------------- thresholds

def thresholds_figure(doc: dict, name: str | None = None) -> go.Figure:
    """For one matrix: Ave_w(φ), the signal count ŝ and the measured KL (that matrix cut alone) against c."""
    m = next((x for x in doc["matrices"] if x["name"] == (name or (doc["chosen"] or [None])[0])),
             doc["matrices"][0])
    measured = m.get("measured")
    cols = 3 if measured else 2
    titles = ["Ave_w(φ) (product side)", "signal count ŝ"] + (
        [("KL" if doc.get("metric") != "cosine" else "1 − cosine") + " when cut alone to ŝ (log)"] if measured else [])
    fig = make_subplots(rows=1, cols=cols, horizontal_spacing=0.08, subplot_titles=titles)
    for e in doc["estimators"]:
        color, label = ESTIMATOR_STYLE.get(e, (BLACK, e))
        pts = [p for p in m["points"] if p["estimator"] == e]
        x = [p["confidence"] for p in pts]
        sigma = m["sigma"].get(e)
        lab = f"{label} (σ̂ = {sigma:.3g})" if sigma is not None else label
        fig.add_trace(go.Scatter(x=x, y=[p["ave_w_phi"] for p in pts], mode="lines+markers", name=lab,
                                 legendgroup=e, line=dict(color=color, width=2), marker=dict(size=7)), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[p["n_signal"] for p in pts], mode="lines+markers", name=lab, legendgroup=e,
                                 showlegend=False, line=dict(color=color, width=2, shape="hv"), marker=dict(size=7)),
                      row=1, col=2)
        if measured:
            fig.add_trace(go.Scatter(x=x, y=[_floor(_damage(p, doc)) for p in pts], mode="lines+markers", name=lab,
                                     legendgroup=e, showlegend=False, line=dict(color=color, width=2, shape="hv"),
                                     marker=dict(size=7),
                                     hovertext=[f"ŝ = {p['n_signal']}, agreement {100 * p['agreement']:.1f}%"
                                                if p.get("agreement") is not None else "" for p in pts],
                                     hovertemplate="c = %{x}<br>%{hovertext}<extra></extra>"), row=1, col=3)
    fig.update_xaxes(title_text="TW confidence c")
    if measured:
        fig.update_yaxes(type="log", row=1, col=3,
                         **_log_ticks([_damage(p, doc) for p in m["points"] if _damage(p, doc)]))
    sub = f"{context(doc)} · {m['name']} ({m['shape'][0]}×{m['shape'][1]}, {m['role']})"
    return _layout(fig, "Threshold quality as the confidence slides: BEMA vs Gaussian broadening", sub, height=500,
                   legend=dict(orientation="h", x=0, y=-0.2, yanchor="top"), margin=dict(t=120, b=110))


def thresholds_model_figure(doc: dict) -> go.Figure:
    """Model-wide: mean Ave_w(φ) over matrices against the agreement of the whole-model cut at ŝ, per estimator
    (the paper's correlation between Ave_w and accuracy)."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("mean Ave_w(φ) vs agreement", "agreement vs confidence"))
    corr = doc.get("correlation") or {}
    for e in doc["estimators"]:
        color, label = ESTIMATOR_STYLE.get(e, (BLACK, e))
        rows = [r for r in doc["model"] if r["estimator"] == e]
        r = (corr.get(e) or {}).get("ave_w_vs_agreement")
        lab = f"{label} (r = {r:+.2f})" if r is not None else label
        agreement = [100 * x["agreement"] if x.get("agreement") is not None else None for x in rows]
        fig.add_trace(go.Scatter(x=[x["ave_w_mean"] for x in rows], y=agreement, mode="markers+text", name=lab,
                                 legendgroup=e, marker=dict(color=color, size=9),
                                 text=[f"{x['confidence']:g}" for x in rows], textposition="top center",
                                 textfont=dict(size=10, color=color)), row=1, col=1)
        fig.add_trace(go.Scatter(x=[x["confidence"] for x in rows], y=agreement, mode="lines+markers", name=lab,
                                 legendgroup=e, showlegend=False, line=dict(color=color, width=2),
                                 hovertext=[f"ŝ total {x['n_signal_total']}, compression "
                                            f"{x.get('compression') or float('nan'):.2f}×" for x in rows],
                                 hovertemplate="c = %{x}<br>%{hovertext}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="mean Ave_w(φ) over matrices", row=1, col=1)
    fig.update_xaxes(title_text="TW confidence c", row=1, col=2)
    fig.update_yaxes(title_text="agreement, every matrix cut at ŝ", ticksuffix="%")
    return _layout(fig, "Threshold quality, whole model: does Ave_w(φ) predict agreement?", context(doc),
                   height=480, legend=dict(orientation="h", x=0, y=-0.2, yanchor="top"), margin=dict(t=110, b=110))


# ----------------------------------------------------------------------------------------------------- deciles

def deciles_figure(doc: dict, value: str = "delta_kl") -> go.Figure:
    """Heatmap: matrix type × decile (D1 = the largest tenth of singular values) → ΔKL or Δperplexity."""
    key = value
    rows = doc["rows"]
    if key == "delta_kl" and any(r.get("delta_kl") is None for r in rows):
        key = "cosine"
    values = []
    for r in rows:
        if key == "cosine":
            values.append([None if c is None else 1.0 - c for c in r["cosine"]])
        else:
            values.append(r[key])
    labels = {"delta_kl": "ΔKL (nats/position)", "delta_perplexity": "Δperplexity", "cosine": "1 − cosine"}
    log = key != "delta_perplexity"
    fig = base.sensitivity_heatmap(values, [r["type"] for r in rows],
                                   [f"D{d + 1}" + (" (largest)" if d == 0 else " (smallest)" if d == 9 else "")
                                    for d in range(10)],
                                   title="Decile ablation: one tenth of the spectrum removed from every matrix of "
                                         "a type", context=context(doc) + "\nD1 = largest singular values; each "
                                                                          "cell removes that decile from all blocks",
                                   colorbar_title=labels[key], log_color=log)
    if not log:
        fig.update_traces(colorscale="RdBu_r", zmid=0)
    return fig


# ----------------------------------------------------------------------------------------------------- overlap

def overlap_figure(doc: dict, name: str | None = None) -> go.Figure:
    """O_k against the singular value index for one matrix, coloured by class, with the random baselines."""
    mats = [m for m in doc["matrices"] if "overlap" in m]
    if not mats:
        return _layout(go.Figure(), "Overlap", "no per-vector data (run without --summary-only)")
    m = next((x for x in mats if x["name"] == name), mats[0])
    k = np.arange(1, len(m["overlap"]) + 1)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.35, 0.65], vertical_spacing=0.05)
    classes = np.array(m["classes"])
    s = np.array(m["singular_values"])
    o = np.array(m["overlap"])
    for cls, (color, label) in CLASS_STYLE.items():
        mask = classes == cls
        if not mask.any():
            continue
        fig.add_trace(go.Bar(x=k[mask], y=s[mask], marker_color=color, name=label, legendgroup=cls,
                             hovertemplate="k = %{x}<br>s = %{y:.4g}<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=k[mask], y=o[mask], mode="markers", marker=dict(color=color, size=7,
                                                                                    line=dict(width=0.5,
                                                                                              color="white")),
                                 name=label, legendgroup=cls, showlegend=False,
                                 customdata=np.array(m["best_component"])[mask] + 1,
                                 hovertemplate="k = %{x}<br>O_k = %{y:.3f}<br>best PC %{customdata}"
                                               "<extra></extra>"), row=2, col=1)
    for y, label, dash in ((m["mc_q99"], "random, 99th percentile", "dash"), (m["mc_mean"], "random, mean", "dot"),
                           (m["baseline"], "√(2 ln n / n)", "dashdot")):
        fig.add_trace(go.Scatter(x=[k[0], k[-1]], y=[y, y], mode="lines", name=f"{label} ({y:.3f})",
                                 line=dict(color=BLACK, dash=dash, width=1.2), hoverinfo="skip"), row=2, col=1)
    fig.update_yaxes(title_text="singular value", row=1, col=1)
    fig.update_yaxes(title_text="O_k = max_j |⟨v_k, e_j⟩|", range=[0, 1.02], row=2, col=1)
    fig.update_xaxes(title_text="k (singular values in descending order)", row=2, col=1)
    summ = m["summary"]
    parts = [f"{c}: mean {summ[c]['mean_overlap']:.3f}, {summ[c]['above_q99']}/{summ[c]['count']} above q99"
             for c in CLASS_STYLE if summ[c]["count"]]
    sub = f"{context(doc)} · {m['name']} ({m['shape'][0]}×{m['shape'][1]}), inputs of {', '.join(m['uses'])}, " \
          f"{m['tokens']:,} activation vectors\n" + "; ".join(parts)
    return _layout(fig, "Overlap of right singular vectors with the activation eigenvectors", sub, height=620,
                   bargap=0.1, legend=dict(orientation="h", x=0, y=-0.12, yanchor="top"),
                   margin=dict(t=140, b=120))


def overlap_summary_figure(doc: dict) -> go.Figure:
    """Per matrix: mean O_k of signal, bulk and left-outlier vectors against the Monte Carlo 99th percentile."""
    mats = doc["matrices"]
    names = [m["name"] for m in mats]
    fig = go.Figure()
    for cls, (color, label) in CLASS_STYLE.items():
        fig.add_trace(go.Bar(x=names, y=[m["summary"][cls]["mean_overlap"] for m in mats], name=label,
                             marker_color=color,
                             customdata=[m["summary"][cls]["count"] for m in mats],
                             hovertemplate="%{x}<br>mean O_k %{y:.3f} over %{customdata} vectors<extra></extra>"))
    fig.add_trace(go.Scatter(x=names, y=[m["mc_q99"] for m in mats], mode="markers", name="random, 99th pct",
                             marker=dict(symbol="line-ew", size=22, line=dict(width=3, color=BLACK))))
    fig.add_trace(go.Scatter(x=names, y=[m["mc_mean"] for m in mats], mode="markers", name="random, mean",
                             marker=dict(symbol="line-ew", size=22, line=dict(width=2, color="#777777"))))
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_yaxes(title_text="mean O_k")
    fig.update_xaxes(tickangle=-40)
    return _layout(fig, "Overlap by class of singular value, every matrix", context(doc), height=520,
                   legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom"), margin=dict(t=130))


# -------------------------------------------------------------------------------------------------- redundancy

def redundancy_figure(doc: dict, top: int | None = None) -> go.Figure:
    """KL when each matrix alone is replaced by rank-1, random or zeros (most redundant on top), beside PR and the
    top-component share."""
    rows = doc["rows"][:top] if top else doc["rows"]
    names = [r["name"] for r in rows]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.68, 0.32], horizontal_spacing=0.03,
                        subplot_titles=(_damage_label(doc) + " (log)", "top-component share s₁²/Σs²"))
    if doc.get("metric"):
        for r_name, (color, label) in REPLACEMENT_STYLE.items():
            fig.add_trace(go.Bar(y=names, x=[_floor(r[f"damage_{r_name}"]) for r in rows], orientation="h", name=label,
                                 marker_color=color,
                                 customdata=[100 * (r[f"agreement_{r_name}"] or 0) for r in rows],
                                 hovertemplate="%{y}<br>KL %{x:.3g}, agreement %{customdata:.1f}%<extra>" + label
                                               + "</extra>"), row=1, col=1)
        fig.update_xaxes(type="log", row=1, col=1, **_log_ticks([r[f"damage_{k}"] for r in rows
                                                                  for k in REPLACEMENT_STYLE]))
    fig.add_trace(go.Bar(y=names, x=[100 * r["top_share"] for r in rows], orientation="h", marker_color=SKY,
                         name="top-component share", showlegend=False,
                         text=[f"PR {r['participation_ratio']:.0f}" for r in rows], textposition="outside",
                         cliponaxis=False, textfont=dict(size=11),
                         hovertemplate="%{y}<br>top share %{x:.1f}%<br>%{text}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(ticksuffix="%", range=[0, 119], row=1, col=2)
    fig.update_yaxes(autorange="reversed", showgrid=False, tickfont=dict(size=11))
    fig.update_layout(barmode="group", bargap=0.2)
    return _layout(fig, "Redundancy: replacing one matrix at a time (most redundant on top)",
                   context(doc) + "\nsorted by the cheapest replacement's damage; PR = participation ratio",
                   height=max(420, 30 * len(names) * (3 if doc.get("metric") else 1) // 2 + 220),
                   legend=dict(orientation="h", x=0, y=-0.04, yanchor="top"), margin=dict(t=130, b=90))


# ---------------------------------------------------------------------------------------------------- whitened

def whitened_figure(doc: dict) -> go.Figure:
    """Compression against KL and agreement, plain vs whitened SVD at the same kept-parameter grid."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=(_damage_label(doc) + " (log)", "top-1 agreement"))
    for method in ("plain", "whitened"):
        color, symbol, label = METHOD_STYLE[method]
        pts = sorted(doc[method], key=lambda p: p["compression"])
        x = [p["compression"] for p in pts]
        hover = [f"kept {100 * p['kept_fraction']:.0f}% of each matrix's parameters<br>model compression "
                 f"{p['compression']:.2f}× (matrices {p['matrix_compression']:.2f}×)<br>layer-output error "
                 f"{p['output_error']:.3f}" for p in pts]
        fig.add_trace(go.Scatter(x=x, y=[_floor(_damage(p, doc)) for p in pts], mode="lines+markers", name=label,
                                 legendgroup=method, line=dict(color=color, width=2.5),
                                 marker=dict(symbol=symbol, size=9), hovertext=hover,
                                 hovertemplate="%{hovertext}<br>KL %{y:.3g}<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[100 * p["agreement"] for p in pts], mode="lines+markers", name=label,
                                 legendgroup=method, showlegend=False, line=dict(color=color, width=2.5),
                                 marker=dict(symbol=symbol, size=9), hovertext=hover,
                                 hovertemplate="%{hovertext}<br>agreement %{y:.1f}%<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="compression (parameters before / after)")
    fig.update_yaxes(type="log", row=1, col=1,
                     **_log_ticks([_damage(p, doc) for m in ("plain", "whitened") for p in doc[m]]))
    fig.update_yaxes(ticksuffix="%", row=1, col=2)
    cal = doc.get("calibration") or {}
    sub = (f"{context(doc)} · calibration: {cal.get('tokens', 0):,} positions ({cal.get('detail', '')})\n"
           f"{len(doc['matrices'])} matrices cut to the same rank by both methods; embeddings untouched")
    return _layout(fig, "Activation-aware SVD: whitened vs plain at equal compression", sub, height=500,
                   legend=dict(x=0.01, y=0.99, xanchor="left", yanchor="top"), margin=dict(t=130))


def all_figures(docs: dict[str, dict]) -> list[tuple[str, go.Figure]]:
    """(name, figure) for every view present in `docs` (view name -> JSON), in the issue's order."""
    makers = [
        ("truths", "truths-roles", truths_roles_figure), ("truths", "truths-rules", truths_rules_figure),
        ("tying", "tying", tying_figure), ("thresholds", "thresholds", thresholds_figure),
        ("thresholds", "thresholds-model", thresholds_model_figure), ("deciles", "deciles", deciles_figure),
        ("overlap", "overlap", overlap_figure), ("overlap", "overlap-summary", overlap_summary_figure),
        ("redundancy", "redundancy", redundancy_figure), ("whitened", "whitened", whitened_figure)]
    return [(name, make(docs[view])) for view, name, make in makers if view in docs]

