"""Research: the five studies behind the project, reproduced on the loaded model, plus activation-aware SVD.

One tab per view (spectral/research/); each reads its controls, runs the engine behind a button (the views cost
tens of forward passes), caches the JSON per (checkpoint, settings, controls) and draws it with
spectral/research/figures.py. Every number here is what `python -m spectral <view>` writes.
"""
import json

import streamlit as st

from spectral.research import NeedsForward, ResearchContext, ResearchError, jsonable
from spectral.research import figures as rf
from spectral.research.deciles import deciles, type_groups
from spectral.research.overlap import overlap
from spectral.research.redundancy import redundancy
from spectral.research.thresholds import CONFIDENCES, default_matrix, thresholds
from spectral.research.truths import truths
from spectral.research.tying import ENERGY_LEVELS, tied_matrices, tying
from spectral.research.whitened import KEPT_FRACTIONS, whitened
from ui import state, whatif
from ui.tables import chart

st.title("Research")
loaded = state.require_current()

settings = state.settings()
ev, why_not = whatif.evaluator(loaded)


def research_context() -> ResearchContext:
    """One context per checkpoint, shared read-only (its pruner is used under the checkpoint's forward lock)."""
    return loaded.shared("research_context", lambda: ResearchContext(
        loaded.workspace, ev.runnable if ev is not None else None, ev, why_not=why_not, settings=settings))


ctx = research_context()
ctx.settings = settings
if ev is None:
    st.info(f"This checkpoint cannot be run ({why_not}). Two truths, threshold quality and redundancy show their "
            "spectral half; the other views need a forward pass.", icon=":material/info:")
elif ev.runnable.kind == "encoder":
    st.caption("An encoder without a language-model head: damage is measured as 1 − cosine of the output "
               "embeddings (and nearest-neighbour agreement) instead of KL.")
else:
    b = ev.batch
    st.caption(f"Evaluation: {b.positions:,} predicted positions in {b.sequences} sequences ({b.source}); every "
               "number compares the modified model with the untouched one on this fixed batch.")


@st.cache_data(show_spinner=False, max_entries=32)
def compute(view: str, sha256: str, chosen, params: tuple, _ctx: ResearchContext, _loaded) -> dict:
    """One view's JSON, cached per (view, checkpoint, settings, controls); errors come back as {"error": ...}."""
    bar = st.progress(0.0, text=f"{view}…")

    def progress(i, total, label):
        bar.progress(min(i / max(total, 1), 1.0), text=f"{view}: {label}" if label else f"{view}: done")

    kwargs = dict(params)
    try:
        with _loaded.forward_lock:
            _ctx.settings = chosen
            result = VIEWS[view](_ctx, progress=progress, **kwargs)
        return jsonable(result.to_dict())
    except (NeedsForward, ResearchError, ValueError) as exc:
        return {"error": str(exc)}
    finally:
        bar.empty()


VIEWS = {
    "truths": lambda c, progress, **k: truths(c, c.settings, progress=progress),
    "tying": lambda c, progress, **k: tying(c, k["energies"], names=k.get("names"), progress=progress,
                                            cliff_agreement=k["cliff"]),
    "thresholds": lambda c, progress, **k: thresholds(c, confidences=k["confidences"], estimators=k["estimators"],
                                                      matrices=k["matrices"], progress=progress),
    "deciles": lambda c, progress, **k: deciles(c, types=k["types"], progress=progress),
    "overlap": lambda c, progress, **k: overlap(c, c.settings, progress=progress),
    "redundancy": lambda c, progress, **k: redundancy(c, progress=progress),
    "whitened": lambda c, progress, **k: whitened(c, fractions=k["fractions"], scope=k["scope"], progress=progress),
}


def section(view: str, params: dict, button: str, needs_forward: bool = False) -> dict | None:
    """The run button of a view and its cached result for the current controls (None until run)."""
    if needs_forward and ev is None:
        st.info(f"This view needs a forward pass: {why_not}.", icon=":material/block:")
        return None
    key = (view, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items())))
    requests = st.session_state.setdefault("research_requests", {})
    if st.button(button, key=f"research_run_{view}", icon=":material/play_arrow:"):
        requests[view] = key
    if requests.get(view) != key:
        if view in requests:
            st.caption("The controls changed since the last run; press the button to run with these.")
        return None
    doc = compute(view, loaded.sha256, settings, key[1], ctx, loaded)
    if "error" in doc:
        st.error(doc["error"])
        return None
    st.download_button("Result as JSON", json.dumps(doc, indent=2), file_name=f"{view}.json",
                       mime="application/json", key=f"research_json_{view}", icon=":material/data_object:",
                       on_click="ignore")
    for note in doc.get("notes", []):
        st.caption(note)
    return doc


names = [m.name for m in loaded.workspace.matrices]
tabs = st.tabs(["Two truths", "Weight tying", "Threshold quality", "Small singular values", "Overlap",
                "Redundancy", "Whitened SVD"])

with tabs[0]:
    st.markdown("**PhotonicGPT's paradox.** The MP z-score calls most singular values noise, the energy rank says "
                "the matrices use almost all of their capacity. Which pruning rule does the model survive? Settings "
                "(σ̂ estimator, confidence, energy level) come from the sidebar.")
    doc = section("truths", {}, "Measure each pruning rule")
    if doc:
        chart(rf.truths_roles_figure(doc), key="research_truths_roles", filename="truths-roles")
        chart(rf.truths_rules_figure(doc), key="research_truths_rules", filename="truths-rules")
        st.dataframe([{k: r[k] for k in ("label", "agreement", "kl", "delta_perplexity", "compression")}
                      for r in doc["rules"]], hide_index=True)

with tabs[1]:
    st.markdown("**Is a tied matrix fragile because it is used twice?** Truncate it at the input use only, the "
                "output use only, or both, and compare. Amplification = KL(tied) / [KL(input) + KL(output)]: "
                "1 means the two uses add up independently.")
    tied = loaded.shared("research_tied", lambda: tied_matrices(ctx)) if ev is not None else []
    if ev is not None and not tied:
        st.info("No matrix of this model is read at two places (no weight tying).")
    elif ev is not None:
        c = st.columns([2, 3, 1])
        name = c[0].selectbox("Tied matrix", tied, key="research_tied")
        energies = c[1].multiselect("Energy levels", list(ENERGY_LEVELS), default=list(ENERGY_LEVELS),
                                    key="research_tying_energies", format_func=lambda p: f"{100 * p:g}%")
        cliff = c[2].number_input("Cliff at agreement", 0.5, 0.999, 0.9, 0.01, key="research_cliff")
        doc = section("tying", {"energies": sorted(energies or [0.99], reverse=True), "names": [name],
                                "cliff": cliff}, "Run the sweep", needs_forward=True)
        if doc:
            chart(rf.tying_figure(doc, name), key="research_tying_fig", filename="tying")
            m = doc["matrices"][0]
            cols = st.columns(3)
            cols[0].metric("Amplification", f"{m['amplification']:.3f}" if m["amplification"] else "—",
                           help="geometric mean of KL(tied) / [KL(input only) + KL(output only)]")
            cols[1].metric("Output gain", f"{m['gain']['tied']:.3f}" if m["gain"]["tied"] else "—",
                           help="relative logit error / relative weight error (tied)")
            cols[2].metric("Cliff (relative error)", f"{m['cliff']['relative_error']:.3f}" if m["cliff"] else
                           "none", help=f"tied agreement first below {cliff:g}")
    else:
        st.info(f"This view needs a forward pass: {why_not}.", icon=":material/block:")

with tabs[2]:
    st.markdown("**Threshold quality (arXiv 2512.12911).** Ave_w(φ) — the expected overlap of the kept singular "
                "vectors with the true signal ones — and the signal count ŝ as the Tracy-Widom confidence slides, "
                "for BEMA and Gaussian broadening; beside them the KL of cutting the chosen matrix (and the whole "
                "model) to ŝ.")
    c = st.columns([3, 2, 3])
    chosen = c[0].selectbox("Matrix", names, index=names.index(default_matrix(loaded.workspace)),
                            key="research_threshold_matrix")
    estimators = c[1].multiselect("Estimators", ["bema", "broadening", "median"], default=["bema", "broadening"],
                                  key="research_estimators")
    confidences = c[2].multiselect("Confidences", list(CONFIDENCES), default=list(CONFIDENCES),
                                   key="research_confidences")
    doc = section("thresholds", {"confidences": sorted(confidences or [0.99]), "estimators":
                                 estimators or ["bema"], "matrices": [chosen]}, "Run the threshold sweep")
    if doc:
        chart(rf.thresholds_figure(doc, chosen), key="research_thresholds_fig", filename="thresholds")
        if doc["model"] and "agreement" in doc["model"][0]:
            chart(rf.thresholds_model_figure(doc), key="research_thresholds_model", filename="thresholds-model")

with tabs[3]:
    st.markdown("**Small singular values matter? (Staats et al.)** Remove one tenth of the spectrum (D1 = the "
                "largest singular values) from every matrix of one type at once and measure the damage.")
    types = list(type_groups(loaded.workspace))
    c = st.columns([4, 2])
    chosen_types = c[0].multiselect("Matrix types", types, default=types, key="research_types")
    value = c[1].segmented_control("Show", ["ΔKL", "Δperplexity"], default="ΔKL", key="research_decile_value",
                                   required=True)
    doc = section("deciles", {"types": chosen_types or types}, "Run the decile ablation", needs_forward=True)
    if doc:
        chart(rf.deciles_figure(doc, "delta_kl" if value == "ΔKL" else "delta_perplexity"),
              key="research_deciles_fig", filename="deciles")

with tabs[4]:
    st.markdown("**Overlap with the data (Staats et al.).** O_k = max_j |⟨v_k, e_j⟩| of each right singular "
                "vector with the eigenvectors of the layer's input second moment on the evaluation batch, against "
                "a random direction's baseline; outliers below the lower edge are marked.")
    doc = section("overlap", {}, "Collect activations and compute O_k", needs_forward=True)
    if doc:
        shown = [m["name"] for m in doc["matrices"]]
        pick = st.selectbox("Matrix", shown, key="research_overlap_matrix")
        chart(rf.overlap_figure(doc, pick), key="research_overlap_fig", filename="overlap")
        chart(rf.overlap_summary_figure(doc), key="research_overlap_summary", filename="overlap-summary")
        if doc["skipped"]:
            st.caption("Not shown: " + "; ".join(f"{s['name']} ({s['reason']})" for s in doc["skipped"]))

with tabs[5]:
    st.markdown("**Crystallization / redundancy.** Replace one matrix at a time by its rank-1 part, random values "
                "of the same norm, or zeros; the most redundant matrices (cheapest replacement least harmful) come "
                "first, beside the participation ratio and the top component's energy share.")
    doc = section("redundancy", {}, "Replace each matrix")
    if doc:
        top = st.slider("Matrices shown", 3, max(3, len(doc["rows"])), min(20, max(3, len(doc["rows"]))),
                        key="research_redundancy_top")
        chart(rf.redundancy_figure(doc, top), key="research_redundancy_fig", filename="redundancy")
        unit = "KL" if doc.get("metric") != "cosine" else "1 − cos"
        st.dataframe([{"matrix": r["name"], f"{unit} rank-1": r["damage_rank1"], f"{unit} random": r["damage_random"],
                       f"{unit} zeros": r["damage_zero"], "best": r["best"], "PR": r["participation_ratio"],
                       "top share": r["top_share"]} for r in doc["rows"]], hide_index=True)

with tabs[6]:
    st.markdown("**Activation-aware SVD (SVD-LLM).** Whiten each layer by the Cholesky factor of its input "
                "second moment before truncating, so the cut keeps what the data uses; compared with plain SVD at "
                "the same ranks. Calibration on the first half of the text, evaluation on the second.")
    c = st.columns([4, 2])
    fractions = c[0].multiselect("Kept parameter fraction of each matrix", list(KEPT_FRACTIONS),
                                 default=list(KEPT_FRACTIONS), key="research_fractions",
                                 format_func=lambda f: f"{100 * f:g}%")
    scope = c[1].selectbox("Scope", ["all", "attention", "mlp"], key="research_white_scope")
    doc = section("whitened", {"fractions": sorted(fractions or [0.5], reverse=True), "scope": scope},
                  "Compare plain and whitened SVD", needs_forward=True)
    if doc:
        chart(rf.whitened_figure(doc), key="research_whitened_fig", filename="whitened")
        st.dataframe([{"kept": p["kept_fraction"], "compression": p["compression"], "KL plain": p["kl"],
                       "KL whitened": w["kl"], "agreement plain": p["agreement"], "agreement whitened": w["agreement"]}
                      for p, w in zip(doc["plain"], doc["whitened"])], hide_index=True)
