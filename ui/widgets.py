"""Composite widgets the pages share: the hyperparameter form, the what-if controls, the metric row, the evaluation
text box. They read and write widget values only; every number they show comes from spectral/."""
from __future__ import annotations

import streamlit as st

from spectral.evaluation import ESTIMATE_TOKENS
from spectral.pruning import DEFAULT_VALUES, PRECISIONS
from spectral.whatif import SCOPE_LABELS, STRATEGY_LABELS, Choice, WhatIfResult
from ui import state
from ui.sidebar import human_count

ENERGY_STEPS = [0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999]
OVERRIDES = "prune_overrides"  # session key: [(matrix, strategy, value), ...] given on the Pruning page


def ask_hyperparameters(opened) -> None:
    """Where the weights do not fix a hyperparameter (heads, RoPE base, norm epsilon), ask; never guess."""
    needs = opened.runtime.needs
    if not needs:
        return
    with st.form("hyperparameters", border=True):
        st.markdown("**The weights do not fix these; give them to run what-ifs**")
        values = {}
        for need in needs:
            key, hint = f"need_{need.name}", f"e.g. {need.typical:g}" if need.typical else ""
            if need.choices:
                values[need.name] = st.selectbox(need.name, need.choices, index=None, help=need.help,
                                                 placeholder="choose", key=key)
            elif need.kind == "int":
                values[need.name] = st.number_input(need.name, min_value=1, value=None, step=1, help=need.help,
                                                    placeholder=hint, key=key)
            else:
                values[need.name] = st.number_input(need.name, min_value=0.0, value=None, format="%g",
                                                    help=need.help, placeholder=hint, key=key)
        if st.form_submit_button("Build the model"):
            if blank := [name for name, value in values.items() if value is None]:
                st.error(f"Give {', '.join(blank)} first.")
            elif (problem := state.give_hyperparameters(opened, values)) is not None:
                st.error(problem)
            else:
                st.rerun()


def value_widget(strategy: str, where=st):
    """The threshold control of a strategy (None for strategies without a value)."""
    if strategy == "mp":
        return where.slider("z-score threshold", 0.0, 10.0, 2.0, 0.1, key="prune_mp",
                            help="Keep singular values whose MP z-score exceeds this (2.02 = the 99% TW point)")
    if strategy == "energy":
        return where.select_slider("Energy kept", ENERGY_STEPS, value=0.999, key="prune_energy",
                                   format_func=lambda p: f"{100 * p:g}%")
    if strategy == "rank":
        return where.slider("Fraction of rank kept", 0.0, 1.0, 0.5, 0.05, key="prune_rank")
    if strategy == "band":
        return where.slider("Decile removed (0 = largest singular values)", 0, 9, 0, 1, key="prune_band")
    if strategy == "random":
        return where.number_input("Seed", 0, 2**31 - 1, 0, key="prune_seed")
    where.caption("This strategy has no threshold.")
    return None


def choice_widgets() -> Choice:
    """Strategy, its value, scope and precision in one row, plus this session's per-matrix overrides."""
    c = st.columns([2, 2, 1.2, 1])
    strategy = c[0].selectbox("Strategy", list(STRATEGY_LABELS), key="prune_strategy",
                              format_func=STRATEGY_LABELS.get)
    value = value_widget(strategy, c[1])
    scope = c[2].selectbox("Scope", list(SCOPE_LABELS), key="prune_scope", format_func=SCOPE_LABELS.get)
    precision = c[3].selectbox("Precision", list(PRECISIONS), key="prune_precision",
                               help="Storage precision of the matrices in scope after the cut (int8: symmetric, "
                                    "per output channel)")
    overrides = tuple(tuple(o) for o in st.session_state.get(OVERRIDES, []))
    return Choice(strategy, None if value is None else float(value), scope, precision, overrides)


def overrides_editor(matrix_names: list[str]) -> None:
    """Give one matrix its own strategy (it ignores the scope); the list is this session's choice."""
    current = st.session_state.setdefault(OVERRIDES, [])
    with st.expander(f"Per-matrix overrides ({len(current)})", expanded=bool(current)):
        c = st.columns([3, 2, 1.2, 1], vertical_alignment="bottom")
        name = c[0].selectbox("Matrix", matrix_names, key="override_matrix")
        strategy = c[1].selectbox("Its strategy", list(STRATEGY_LABELS), key="override_strategy",
                                  format_func=STRATEGY_LABELS.get)
        default = DEFAULT_VALUES.get(strategy)
        value = c[2].number_input("Value", value=default, key=f"override_value_{strategy}",
                                  disabled=default is None, format="%g")
        if c[3].button("Add", key="override_add", width="stretch"):
            st.session_state[OVERRIDES] = [o for o in current if o[0] != name] + [
                (name, strategy, None if default is None else float(value))]
            st.rerun()
        for i, (matrix, strat, val) in enumerate(current):
            row = st.columns([6, 1], vertical_alignment="center")
            row[0].caption(f"`{matrix}`: {STRATEGY_LABELS[strat]}" + ("" if val is None else f" = {val:g}"))
            if row[1].button("Remove", key=f"override_remove_{i}"):
                st.session_state[OVERRIDES] = [o for o in current if o[0] != matrix]
                st.rerun()


def factors_progress(runtime) -> None:
    """While the background SVD factors are computed, a progress line that follows them (a fragment polling once a
    second); when they are all ready, one full rerun removes it."""
    if not runtime.prefetching:
        return

    @st.fragment(run_every=1.0)
    def line() -> None:
        done, total = runtime.prefetch_progress
        if not runtime.prefetching:
            st.rerun()
        st.progress(done / max(total, 1), text=f"SVD factors in the background: {done} of {total} matrices ready "
                    "(a move that needs one sooner computes it at once)")

    line()


def _pm(se: float | None, scale: float = 1.0, spec: str = ".2f") -> str:
    return "" if se is None or se != se else f" ± {scale * se:{spec}}"


def metrics_row(result: WhatIfResult, encoder: bool) -> None:
    """Agreement, KL (or cosine), perplexity, compression and parameters kept of one what-if; an estimate on the
    fixed subset is labelled as such, with ± one standard error."""
    m, cols = result.metrics, st.columns(5)
    tag = " (estimate)" if m.estimate else ""
    if encoder:
        cols[0].metric("Neighbour agreement", f"{100 * m.agreement:.2f}%", help="share of sentences whose nearest "
                       "neighbour (by embedding cosine) is the same with the cut model as with the untouched one")
        cols[1].metric("Cosine", f"{m.cosine:.4f}", help="mean cosine of original and cut embeddings")
    else:
        cols[0].metric(f"Top-1 agreement{tag}", f"{100 * m.agreement:.2f}%{_pm(m.agreement_se, 100, '.1f')}",
                       help="share of positions where the cut model's most likely next token equals the untouched "
                            "model's")
        kl = f"{m.kl:.4f}" if m.kl >= 1e-3 or m.kl == 0 else f"{m.kl:.2e}"
        cols[1].metric(f"KL (nats/position){tag}", kl + _pm(m.kl_se, 1, ".2g"),
                       help="mean KL(original ‖ cut) per predicted position")
    if m.perplexity_after is not None and m.perplexity_before is not None:
        cols[2].metric(f"Perplexity{tag}", f"{m.perplexity_after:.2f}{_pm(m.perplexity_se, 1, '.1f')}",
                       f"{m.perplexity_after - m.perplexity_before:+.2f} vs {m.perplexity_before:.2f}",
                       delta_color="inverse", help="on the evaluation text")
    else:
        cols[2].metric("Perplexity", "—", help="needs labelled text (the model's held-out text or yours)")
    cols[3].metric("Compression", f"{result.prune.compression:.2f}×",
                   help="stored bytes before / after (rank-k factors k·(m+n) where smaller, precision counted)")
    cols[4].metric("Parameters kept", human_count(result.prune.params_after),
                   f"of {human_count(result.prune.params_before)}", delta_color="off", delta_arrow="off")
    if m.estimate:
        st.caption(f"Estimate from {m.positions:,} fixed positions (the first {ESTIMATE_TOKENS} of "
                   f"{m.positions // ESTIMATE_TOKENS} sequences spread over the batch), ± one standard error over "
                   "those sequences; the full batch is running.")


def _use_text() -> None:
    upload = st.session_state.get("eval_text_file")
    text = upload.getvalue().decode("utf-8", errors="replace") if upload is not None else ""
    text = text or st.session_state.get("eval_text_area", "")
    if text.strip():
        st.session_state[state.EVAL_TEXT] = text
    else:
        st.session_state.pop(state.EVAL_TEXT, None)


def eval_text_box() -> None:
    """Paste or upload an evaluation text; the what-ifs then compare the models on it."""
    with st.expander("Evaluate on your own text", expanded=False):
        st.caption("Paste text or upload a .txt file; the model's tokenizer reads it and the metrics compare the cut "
                   "and untouched models on it (2,048 predicted positions, or sentences for an encoder).")
        st.text_area("Evaluation text", key="eval_text_area", height=120, label_visibility="collapsed")
        st.file_uploader("or a text file", type=["txt", "md", "py", "rst"], key="eval_text_file")
        use, back = st.columns(2)
        use.button("Use this text", on_click=_use_text, key="eval_text_use", icon=":material/check:",
                   width="stretch")
        back.button("Back to the default batch", on_click=lambda: st.session_state.pop(state.EVAL_TEXT, None),
                    key="eval_text_default", disabled=state.EVAL_TEXT not in st.session_state, width="stretch")
