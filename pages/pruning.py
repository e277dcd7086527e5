"""Pruning: pick a strategy, move the threshold, watch agreement, KL, perplexity and compression update live.

The controls, the numbers and the figures are one `st.fragment`: a slider move reruns only it, and it makes one
engine call (`WhatIfSession.run`: plan → factors → rebuilt matrices → evaluation), so every figure shows the same
move as the numbers. What a move does not change stays out of the fragment (the per-matrix overrides editor, whose
changes rerun the page), and the per-matrix table is drawn only when asked for: each element a move redraws costs the
browser, and four browsers on the server's two cores made that the load test's bottleneck (issue 17). The
sensitivity scan is behind a button and remembered by the session.
"""
import json

import streamlit as st

from spectral import figures
from spectral.pruning import PlanError
from spectral.whatif import Choice
from ui import compare, state, widgets
from ui.heal import heal_panel
from ui.tables import chart

st.title("Pruning")
opened = state.require_current()
session, why_not = state.whatif_session(opened)
if session is None:
    st.info(f"What-ifs need a forward pass, and this checkpoint cannot be run: {why_not}. The Spectra and Ranks "
            "pages work on any checkpoint.", icon=":material/info:")
    st.stop()

state.start_background_factors(opened)
widgets.factors_progress(session.runtime)
settings = state.settings()
analysis = state.analysis(opened, settings)
encoder = session.kind == "encoder"
batch = session.evaluator.batch
source = f"{batch.source}{': ' + batch.detail if batch.detail else ''}"
if encoder:
    st.caption(f"Evaluation: {batch.sequences} sentences ({source}). An encoder predicts no tokens, so KL does not "
               "apply: the what-if reports the mean cosine between each sentence's original and cut embedding, and "
               "nearest-neighbour agreement among these sentences.")
elif session.kind == "image_classifier":
    st.caption(f"Evaluation: {batch.sequences} images ({source}); agreement and KL are over the classes the model "
               "predicts for each image, cut against untouched.")
else:
    st.caption(f"Evaluation: {batch.positions:,} predicted positions in {batch.sequences} sequences ({source}); "
               "metrics compare the cut model with the untouched one on this fixed batch.")
widgets.eval_text_box()


@st.fragment
def live_panel():
    choice = widgets.choice_widgets()
    numbers = st.empty()

    def show(result) -> None:
        with numbers.container():
            widgets.metrics_row(result, encoder)

    try:
        result = session.run(choice, settings, progress=state.progress_bar("Working"),
                             on_estimate=show if session.evaluator.worth_estimating else None)
    except PlanError as exc:
        st.error(str(exc))
        return
    st.session_state["prune_choice"] = choice
    show(result)
    st.caption(f"**{choice.label}**: {len(result.plan.cuts)} matrices cut · {len(result.prune.rebuilt)} rebuilt by "
               f"this move · {1000 * result.timings['total']:.0f} ms (plan, rebuild, evaluation)")
    for warning in result.plan.warnings:
        st.warning(warning)
    if st.toggle("Per-matrix effect of this plan", key="prune_per_matrix"):  # drawn only when asked: each move
        st.dataframe([{"matrix": r.name, "role": r.role, "rank": r.rank, "kept rank": r.kept_rank,
                       "relative error": r.relative_error, "cut": r.cut, "precision": r.precision}
                      for r in result.prune.matrices], hide_index=True,
                     column_config={"relative error": st.column_config.NumberColumn(format="%.4f")})
    points = session.reference(choice.scope, settings, progress=state.progress_bar("Reference strategies"))
    damage = "embedding damage" if encoder else "KL"
    chart(figures.compression_vs_kl(points, current=result.point(), damage="cosine" if encoder else "kl",
                                    title=f"Compression against {damage}",
                                    context=f"{figures.context_line(analysis)} · scope {choice.scope}"),
          key=f"prune_ckl_{choice.label}", filename="compression-vs-kl")
    downloads = st.container(horizontal=True)
    downloads.download_button(
        "Download the pruned checkpoint", data=lambda: session.save(), on_click="ignore", key="prune_download",
        file_name=f"{opened.label.split('/')[-1].rsplit('.', 1)[0]}-{choice.strategy}.safetensors",
        mime="application/octet-stream", icon=":material/download:",
        help="safetensors with the current cuts applied (dense); the loader and this app read it back")
    downloads.download_button("Result as JSON", data=json.dumps(result.to_dict(), indent=2), file_name="prune.json",
                              mime="application/json", on_click="ignore", key="prune_json",
                              icon=":material/data_object:")


widgets.overrides_editor([m.name for m in opened.workspace.matrices])
live_panel()
heal_panel(session, st.session_state.get("prune_choice", Choice("mp", 2.0)), settings)

with st.expander("Another checkpoint against this one (a fine-tune against its base)"):
    other = compare.pick_checkpoint("B", opened, state.app_options(), base=opened)
    if other is not None:
        compare.evaluation_panel(opened, other)

st.subheader("Sensitivity: where does the model break?")
st.caption("Cut one matrix (or one role) at a time with the current strategy and report the KL it alone causes.")
c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
by = c1.segmented_control("Unit", ["matrix", "role"], default="matrix", key="sens_by", required=True)
if c2.button("Run the scan with the current strategy", key="sens_run", icon=":material/grid_on:"):
    st.session_state["sens_request"] = (st.session_state.get("prune_choice", Choice("mp", 2.0)), by)
if request := st.session_state.get("sens_request"):
    choice, unit = request
    rows = session.scan(choice, by=unit, settings=settings, progress=state.progress_bar("Sensitivity scan"))
    chart(figures.sensitivity_from_scan(rows, by=unit, title=f"Sensitivity: KL when one {unit} alone is cut "
                                        f"({choice.label})", context=figures.context_line(analysis)),
          key="sens_heatmap", filename="sensitivity")
