"""Pruning: pick a strategy, move the threshold, watch agreement, KL, perplexity and compression update live.

The controls and metrics are one `st.fragment`: a slider move reruns only it (plan → rebuilt matrices → evaluation),
not the page. The sensitivity scan is behind a button and cached.
"""
import json
import time

import streamlit as st

from spectral import figures
from spectral.pruning import PRECISIONS, PlanError, save_pruned
from ui import state, whatif
from ui.sidebar import human_count
from ui.tables import chart

st.title("Pruning")
loaded = state.require_current()

ev, why_not = whatif.evaluator(loaded)
if ev is None:
    st.info(f"What-ifs need a forward pass, and this checkpoint cannot be run: {why_not}. The Spectra and Ranks "
            "pages work on any checkpoint.", icon=":material/info:")
    st.stop()

settings = state.settings()
analysis = state.analysis(loaded, settings)
batch = ev.batch
encoder = ev.runnable.kind == "encoder"
if encoder:
    st.caption(f"Evaluation: {batch.sequences} sentences ({batch.source}{': ' + batch.detail if batch.detail else ''})."
               " An encoder predicts no tokens, so KL does not apply: the what-if reports the mean cosine between "
               "each sentence's original and cut embedding, and nearest-neighbour agreement among these sentences.")
else:
    st.caption(f"Evaluation: {batch.positions:,} predicted positions in {batch.sequences} sequences "
               f"({batch.source}{': ' + batch.detail if batch.detail else ''}); metrics compare the cut model with "
               "the untouched one on this fixed batch.")



def _use_text() -> None:
    upload = st.session_state.get("eval_text_file")
    text = upload.getvalue().decode("utf-8", errors="replace") if upload is not None else ""
    text = text or st.session_state.get("eval_text_area", "")
    if text.strip():
        st.session_state[whatif.EVAL_TEXT] = text
    else:
        st.session_state.pop(whatif.EVAL_TEXT, None)


def _default_text() -> None:
    st.session_state.pop(whatif.EVAL_TEXT, None)


with st.expander("Evaluate on your own text", expanded=False):
    st.caption("Paste text or upload a .txt file; the model's tokenizer reads it and the metrics compare the cut "
               "and untouched models on it (2,048 predicted positions, or sentences for an encoder).")
    st.text_area("Evaluation text", key="eval_text_area", height=120, label_visibility="collapsed")
    st.file_uploader("or a text file", type=["txt", "md", "py", "rst"], key="eval_text_file")
    use, back = st.columns(2)
    use.button("Use this text", on_click=_use_text, key="eval_text_use", icon=":material/check:", width="stretch")
    back.button("Back to the default batch", on_click=_default_text, key="eval_text_default",
                disabled=whatif.EVAL_TEXT not in st.session_state, width="stretch")


def _value_widget(strategy: str):
    """The threshold control of a strategy (None for strategies without a value)."""
    if strategy == "mp":
        return st.slider("z-score threshold", 0.0, 10.0, 2.0, 0.1, key="prune_mp",
                         help="Keep singular values whose MP z-score exceeds this (2.02 = the 99% TW point)")
    if strategy == "energy":
        return st.select_slider("Energy kept", whatif.ENERGY_STEPS, value=0.999, key="prune_energy",
                                format_func=lambda p: f"{100 * p:g}%")
    if strategy == "rank":
        return st.slider("Fraction of rank kept", 0.0, 1.0, 0.5, 0.05, key="prune_rank")
    if strategy == "band":
        return st.slider("Decile removed (0 = largest singular values)", 0, 9, 0, 1, key="prune_band")
    if strategy == "random":
        return st.number_input("Seed", 0, 2**31 - 1, 0, key="prune_seed")
    return None


@st.fragment
def live_panel():
    c = st.columns([2, 2, 1.2, 1])
    strategy = c[0].selectbox("Strategy", list(whatif.STRATEGY_LABELS), key="prune_strategy",
                              format_func=whatif.STRATEGY_LABELS.get)
    with c[1]:
        value = _value_widget(strategy)
        if value is None:
            st.caption("This strategy has no threshold.")
    scope = c[2].selectbox("Scope", list(whatif.SCOPES), key="prune_scope", format_func=whatif.SCOPES.get)
    precision = c[3].selectbox("Precision", list(PRECISIONS), key="prune_precision",
                               help="Storage precision of the matrices in scope after the cut (int8: symmetric, "
                                    "per output channel)")
    choice = whatif.Choice(strategy, None if value is None else float(value), scope, precision)

    session = whatif.session_whatif(loaded, ev, settings)
    try:
        started = time.perf_counter()
        plan = session.plan(choice.strategy, choice.value, scope=choice.scope, precision=choice.precision)
        plan_seconds = time.perf_counter() - started
    except PlanError as exc:
        st.error(str(exc))
        return
    whatif.prepare_factors(loaded, plan)  # progress bar while SVD factors are computed the first time
    result = whatif.run(loaded, session, plan, plan_seconds)
    st.session_state["prune_last"] = {"choice": choice.__dict__, "seconds": result.timings.get("total")}
    m = result.metrics
    before = ev.perplexity_before
    cols = st.columns(5)
    if encoder:
        cols[0].metric("Neighbour agreement", f"{100 * m.agreement:.2f}%", help="share of sentences whose nearest "
                       "neighbour (by embedding cosine) is the same with the cut model as with the untouched one")
    else:
        cols[0].metric("Top-1 agreement", f"{100 * m.agreement:.2f}%", help="share of positions where the cut "
                       "model's most likely next token equals the untouched model's")
    if m.kl is not None:
        cols[1].metric("KL (nats/position)", f"{m.kl:.4f}" if m.kl >= 1e-3 or m.kl == 0 else f"{m.kl:.2e}", help="mean KL(original ‖ cut) per predicted position")
    else:
        cols[1].metric("Cosine", f"{m.cosine:.4f}", help="mean cosine of original and cut embeddings")
    if m.perplexity_after is not None and before is not None:
        cols[2].metric("Perplexity", f"{m.perplexity_after:.2f}", f"{m.perplexity_after - before:+.2f} vs "
                       f"{before:.2f}", delta_color="inverse", help="on the held-out text")
    else:
        cols[2].metric("Perplexity", "—", help="needs labelled text (the model's held-out text or yours)")
    cols[3].metric("Compression", f"{result.prune.compression:.2f}×",
                   help="stored bytes before / after (rank-k factors k·(m+n) where smaller, precision counted)")
    cols[4].metric("Parameters kept", human_count(result.prune.params_after),
                   f"of {human_count(result.prune.params_before)}", delta_color="off", delta_arrow="off")
    st.caption(f"**{choice.label}**: {len(result.plan.cuts)} matrices cut · {len(result.prune.rebuilt)} rebuilt by "
               "this move · "
               f"{1000 * result.timings.get('total', 0):.0f} ms (plan, rebuild, evaluation)")
    for warning in result.plan.warnings:
        st.warning(warning)

    with st.expander("Per-matrix effect of this plan"):
        st.dataframe([{"matrix": r.name, "role": r.role, "rank": r.rank, "kept rank": r.kept_rank,
                       "relative error": r.relative_error, "cut": r.cut, "precision": r.precision}
                      for r in result.prune.matrices], hide_index=True,
                     column_config={"relative error": st.column_config.NumberColumn(format="%.4f")})

    points = whatif.standard_points(loaded.sha256, settings, scope, loaded, ev, whatif.eval_key())
    current = whatif.result_point(choice.label, result)
    chart(figures.compression_vs_kl(points, current=current, damage="cosine" if encoder else "kl",
                                    title="Compression against " + ("embedding damage" if encoder else "KL"),
                                    context=f"{figures.context_line(analysis)} · scope {scope}"),
          key="prune_ckl", filename="compression-vs-kl")
    downloads = st.container(horizontal=True)
    downloads.download_button("Download the pruned checkpoint", data=lambda: save_pruned(session.pruner),
                       file_name=f"{loaded.label.split('/')[-1].rsplit('.', 1)[0]}-{choice.strategy}.safetensors",
                       mime="application/octet-stream", icon=":material/download:", on_click="ignore",
                       key="prune_download", help="safetensors with the current cuts applied (dense); the loader "
                                                  "and this app read it back")
    downloads.download_button("Result as JSON", data=json.dumps(result.to_dict(), indent=2), file_name="prune.json",
                       mime="application/json", on_click="ignore", key="prune_json", icon=":material/data_object:")
    st.session_state["prune_choice"] = choice.__dict__


live_panel()

st.subheader("Sensitivity: where does the model break?")
st.caption("Cut one matrix (or one role) at a time with the current strategy and report the KL it alone causes.")
choice = whatif.Choice(**st.session_state.get("prune_choice", {"strategy": "mp", "value": 2.0, "scope": "all",
                                                               "precision": "fp32"}))
c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
by = c1.segmented_control("Unit", ["matrix", "role"], default="matrix", key="sens_by", required=True)
if c2.button("Run the scan with the current strategy", key="sens_run", icon=":material/grid_on:"):
    st.session_state["sens_request"] = {"choice": choice.__dict__, "by": by}
request = st.session_state.get("sens_request")
if request:
    req_choice = whatif.Choice(**request["choice"])
    rows = whatif.sensitivity(loaded.sha256, settings, req_choice, request["by"], loaded, ev,
                              whatif.eval_key())
    fig = figures.sensitivity_from_scan(rows, by=request["by"], title=f"Sensitivity: KL when one {request['by']} "
                                        f"alone is cut ({req_choice.label})", context=figures.context_line(analysis))
    chart(fig, key="sens_heatmap", filename="sensitivity")
