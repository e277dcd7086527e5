"""The Research page's tabs: each reads its controls, runs its view (spectral/research/) behind a button through
`run_view`, and draws the JSON with spectral/research/figures.py. Results are cached per (view, checkpoint, settings,
controls, evaluation text); every number is what `python -m spectral <view>` writes."""
from __future__ import annotations

import json

import streamlit as st

from spectral.analysis import Settings
from spectral.figures import NULL_LABELS
from spectral.library import Opened
from spectral.research import figures as rf
from spectral.research.common import NeedsForward, ResearchError, jsonable
from spectral.research.context import ResearchContext
from spectral.research.deciles import deciles, type_groups
from spectral.research.nulls import nulls
from spectral.research.overlap import overlap
from spectral.research.redundancy import redundancy
from spectral.research.thresholds import CONFIDENCES, default_matrix, thresholds
from spectral.research.truths import truths
from spectral.research.tying import ENERGY_LEVELS, tied_matrices, tying
from spectral.research.whitened import KEPT_FRACTIONS, whitened
from spectral.runtime import BatchSpec
from ui import state
from ui.tables import chart

VIEWS = {
    "truths": lambda c, s, p, **k: truths(c, s, progress=p),
    "tying": lambda c, s, p, **k: tying(c, k["energies"], names=k["names"], progress=p, cliff_agreement=k["cliff"]),
    "thresholds": lambda c, s, p, **k: thresholds(c, confidences=k["confidences"], estimators=k["estimators"],
                                                  matrices=k["matrices"], progress=p),
    "deciles": lambda c, s, p, **k: deciles(c, types=k["types"], progress=p),
    "overlap": lambda c, s, p, **k: overlap(c, s, progress=p),
    "redundancy": lambda c, s, p, **k: redundancy(c, progress=p),
    "whitened": lambda c, s, p, **k: whitened(c, fractions=k["fractions"], scope=k["scope"], progress=p),
    "nulls": lambda c, s, p, **k: nulls(c.workspace, s, which=tuple(k["nulls"]), progress=p),
}


@st.cache_data(show_spinner=False, max_entries=32)
def _compute(view: str, sha256: str, generation: int, settings: Settings, params: tuple, text: str | None,
             _opened: Opened) -> dict:
    """One view's JSON; errors come back as {"error": ...}."""
    ctx = ResearchContext(_opened.runtime, BatchSpec(text))
    try:
        result = VIEWS[view](ctx, settings, state.progress_bar(view), **dict(params))
        return jsonable(result.to_dict())
    except (NeedsForward, ResearchError, ValueError) as exc:
        return {"error": str(exc)}


def run_view(opened: Opened, settings: Settings, view: str, params: dict, button: str,
             needs_forward: bool = False) -> dict | None:
    """The run button of a view and its cached result for the current controls (None until run)."""
    if needs_forward and opened.runtime.runnable is None:
        st.info(f"This view needs a forward pass: {opened.runtime.why_not}.", icon=":material/block:")
        return None
    key = (view, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items())))
    requests = st.session_state.setdefault("research_requests", {})
    if st.button(button, key=f"research_run_{view}", icon=":material/play_arrow:"):
        requests[view] = key
    if requests.get(view) != key:
        if view in requests:
            st.caption("The controls changed since the last run; press the button to run with these.")
        return None
    doc = _compute(view, opened.sha256, opened.runtime.generation, settings, key[1],
                   st.session_state.get(state.EVAL_TEXT), opened)
    if "error" in doc:
        st.error(doc["error"])
        return None
    st.download_button("Result as JSON", json.dumps(doc, indent=2), file_name=f"{view}.json", mime="application/json",
                       key=f"research_json_{view}", icon=":material/data_object:", on_click="ignore")
    for note in doc.get("notes", []):
        st.caption(note)
    return doc


def truths_tab(opened: Opened, settings: Settings) -> None:
    st.markdown("**PhotonicGPT's paradox.** The MP z-score calls most singular values noise, the energy rank says "
                "the matrices use almost all of their capacity. Which pruning rule does the model survive? Settings "
                "(σ̂ estimator, confidence, energy level) come from the sidebar.")
    if doc := run_view(opened, settings, "truths", {}, "Measure each pruning rule"):
        chart(rf.truths_roles_figure(doc), key="research_truths_roles", filename="truths-roles")
        chart(rf.truths_rules_figure(doc), key="research_truths_rules", filename="truths-rules")
        st.dataframe([{k: r[k] for k in ("label", "agreement", "kl", "delta_perplexity", "compression")}
                      for r in doc["rules"]], hide_index=True)


def tying_tab(opened: Opened, settings: Settings) -> None:
    st.markdown("**Is a tied matrix fragile because it is used twice?** Truncate it at the input use only, the "
                "output use only, or both, and compare. Amplification = KL(tied) / [KL(input) + KL(output)]: "
                "1 means the two uses add up independently.")
    if opened.runtime.runnable is None:
        st.info(f"This view needs a forward pass: {opened.runtime.why_not}.", icon=":material/block:")
        return
    tied = tied_matrices(ResearchContext(opened.runtime))
    if not tied:
        st.info("No matrix of this model is read at two places (no weight tying).")
        return
    c = st.columns([2, 3, 1])
    name = c[0].selectbox("Tied matrix", tied, key="research_tied")
    energies = c[1].multiselect("Energy levels", list(ENERGY_LEVELS), default=list(ENERGY_LEVELS),
                                key="research_tying_energies", format_func=lambda p: f"{100 * p:g}%")
    cliff = c[2].number_input("Cliff at agreement", 0.5, 0.999, 0.9, 0.01, key="research_cliff")
    params = {"energies": sorted(energies or [0.99], reverse=True), "names": [name], "cliff": cliff}
    if doc := run_view(opened, settings, "tying", params, "Run the sweep", needs_forward=True):
        chart(rf.tying_figure(doc, name), key="research_tying_fig", filename="tying")
        m, cols = doc["matrices"][0], st.columns(3)
        cols[0].metric("Amplification", f"{m['amplification']:.3f}" if m["amplification"] else "—",
                       help="geometric mean of KL(tied) / [KL(input only) + KL(output only)]")
        cols[1].metric("Output gain", f"{m['gain']['tied']:.3f}" if m["gain"]["tied"] else "—",
                       help="relative logit error / relative weight error (tied)")
        cols[2].metric("Cliff (relative error)", f"{m['cliff']['relative_error']:.3f}" if m["cliff"] else "none",
                       help=f"tied agreement first below {cliff:g}")


def thresholds_tab(opened: Opened, settings: Settings) -> None:
    st.markdown("**Threshold quality (arXiv 2512.12911).** Ave_w(φ) — the expected overlap of the kept singular "
                "vectors with the true signal ones — and the signal count ŝ as the Tracy-Widom confidence slides, "
                "for BEMA and Gaussian broadening; beside them the KL of cutting the chosen matrix (and the whole "
                "model) to ŝ.")
    names = [m.name for m in opened.workspace.matrices]
    c = st.columns([3, 2, 3])
    chosen = c[0].selectbox("Matrix", names, index=names.index(default_matrix(opened.workspace)),
                            key="research_threshold_matrix")
    estimators = c[1].multiselect("Estimators", ["bema", "broadening", "median"], default=["bema", "broadening"],
                                  key="research_estimators")
    confidences = c[2].multiselect("Confidences", list(CONFIDENCES), default=list(CONFIDENCES),
                                   key="research_confidences")
    params = {"confidences": sorted(confidences or [0.99]), "estimators": estimators or ["bema"], "matrices": [chosen]}
    if doc := run_view(opened, settings, "thresholds", params, "Run the threshold sweep"):
        chart(rf.thresholds_figure(doc, chosen), key="research_thresholds_fig", filename="thresholds")
        if doc["model"] and "agreement" in doc["model"][0]:
            chart(rf.thresholds_model_figure(doc), key="research_thresholds_model", filename="thresholds-model")


def deciles_tab(opened: Opened, settings: Settings) -> None:
    st.markdown("**Small singular values matter? (Staats et al.)** Remove one tenth of the spectrum (D1 = the "
                "largest singular values) from every matrix of one type at once and measure the damage.")
    types = list(type_groups(opened.workspace))
    c = st.columns([4, 2])
    chosen = c[0].multiselect("Matrix types", types, default=types, key="research_types")
    value = c[1].segmented_control("Show", ["ΔKL", "Δperplexity"], default="ΔKL", key="research_decile_value",
                                   required=True)
    if doc := run_view(opened, settings, "deciles", {"types": chosen or types}, "Run the decile ablation",
                       needs_forward=True):
        chart(rf.deciles_figure(doc, "delta_kl" if value == "ΔKL" else "delta_perplexity"),
              key="research_deciles_fig", filename="deciles")


def overlap_tab(opened: Opened, settings: Settings) -> None:
    st.markdown("**Overlap with the data (Staats et al.).** O_k = max_j |⟨v_k, e_j⟩| of each right singular "
                "vector with the eigenvectors of the layer's input second moment on the evaluation batch, against "
                "a random direction's baseline; outliers below the lower edge are marked.")
    if doc := run_view(opened, settings, "overlap", {}, "Collect activations and compute O_k", needs_forward=True):
        pick = st.selectbox("Matrix", [m["name"] for m in doc["matrices"]], key="research_overlap_matrix")
        chart(rf.overlap_figure(doc, pick), key="research_overlap_fig", filename="overlap")
        chart(rf.overlap_summary_figure(doc), key="research_overlap_summary", filename="overlap-summary")
        if doc["skipped"]:
            st.caption("Not shown: " + "; ".join(f"{s['name']} ({s['reason']})" for s in doc["skipped"]))


def redundancy_tab(opened: Opened, settings: Settings) -> None:
    st.markdown("**Crystallization / redundancy.** Replace one matrix at a time by its rank-1 part, random values "
                "of the same norm, or zeros; the most redundant matrices (cheapest replacement least harmful) come "
                "first, beside the participation ratio and the top component's energy share.")
    if doc := run_view(opened, settings, "redundancy", {}, "Replace each matrix"):
        n = len(doc["rows"])
        top = st.slider("Matrices shown", 3, max(3, n), min(20, max(3, n)), key="research_redundancy_top")
        chart(rf.redundancy_figure(doc, top), key="research_redundancy_fig", filename="redundancy")
        unit = "KL" if doc.get("metric") != "cosine" else "1 − cos"
        st.dataframe([{"matrix": r["name"], f"{unit} rank-1": r["damage_rank1"], f"{unit} random": r["damage_random"],
                       f"{unit} zeros": r["damage_zero"], "best": r["best"], "PR": r["participation_ratio"],
                       "top share": r["top_share"]} for r in doc["rows"]], hide_index=True)


def whitened_tab(opened: Opened, settings: Settings) -> None:
    st.markdown("**Activation-aware SVD (SVD-LLM).** Whiten each layer by the Cholesky factor of its input "
                "second moment before truncating, so the cut keeps what the data uses; compared with plain SVD at "
                "the same ranks. Calibration on the first half of the text, evaluation on the second.")
    c = st.columns([4, 2])
    fractions = c[0].multiselect("Kept parameter fraction of each matrix", list(KEPT_FRACTIONS),
                                 default=list(KEPT_FRACTIONS), key="research_fractions",
                                 format_func=lambda f: f"{100 * f:g}%")
    scope = c[1].selectbox("Scope", ["all", "attention", "mlp"], key="research_white_scope")
    params = {"fractions": sorted(fractions or [0.5], reverse=True), "scope": scope}
    if doc := run_view(opened, settings, "whitened", params, "Compare plain and whitened SVD", needs_forward=True):
        chart(rf.whitened_figure(doc), key="research_whitened_fig", filename="whitened")
        st.dataframe([{"kept": p["kept_fraction"], "compression": p["compression"], "KL plain": p["kl"],
                       "KL whitened": w["kl"], "agreement plain": p["agreement"], "agreement whitened": w["agreement"]}
                      for p, w in zip(doc["plain"], doc["whitened"])], hide_index=True)


def nulls_tab(opened: Opened, settings: Settings) -> None:
    st.markdown("**Honest nulls (RMT.md §11).** The MP signal count assumes i.i.d. entries; trained weights have "
                "row/column variance profiles and heavy tails. Per role, the signal under the i.i.d. MP null, under "
                "MP after biwhitening (variance profiles removed) and against shuffles of each matrix's own entries "
                "(heavy tails kept), with how many matrices each null fits. No forward pass.")
    chosen = st.multiselect("Nulls", list(NULL_LABELS), default=list(NULL_LABELS), key="research_nulls",
                            format_func=NULL_LABELS.get)
    if doc := run_view(opened, settings, "nulls", {"nulls": [n for n in NULL_LABELS if n in (chosen or ["mp"])]},
                       "Count the signal under each null"):
        chart(rf.nulls_figure(doc), key="research_nulls_fig", filename="nulls")
        t = doc["totals"]
        st.caption(f"Whole model: signal {', '.join(f'{NULL_LABELS[n]} {v:.1f}%' for n, v in t['signal_pct'].items())}"
                   f"; under each matrix's fitting null {t['fitting_signal_pct'] or 0:.1f}% "
                   f"({t['unfitted']} of {t['matrices']} matrices fit none); energy utilisation "
                   f"{t['utilization_pct']:.1f}%.")


TABS = [("Two truths", truths_tab), ("Nulls", nulls_tab), ("Weight tying", tying_tab),
        ("Threshold quality", thresholds_tab), ("Small singular values", deciles_tab), ("Overlap", overlap_tab), ("Redundancy", redundancy_tab),
        ("Whitened SVD", whitened_tab)]
