"""Compare: two checkpoints side by side (what changed in each matrix, whether the update is low-rank, how far the
top singular subspaces moved), a LoRA adapter against its base, or a training run's metrics against step.

Widgets and panels are in ui/compare.py; the numbers are one engine call each (`PairComparer.compare`,
`trajectory`), both cached by the engine, so changing a setting redoes arithmetic only.
"""
import streamlit as st

from spectral import compare_figures as cf
from ui import compare as ui
from ui import state
from ui.tables import chart

st.title("Compare")
options = state.app_options()
settings = state.settings()
mode = st.segmented_control("What", ["Two checkpoints", "Training run"], default="Two checkpoints", key="cmp_mode",
                            required=True)

if mode == "Training run":
    st.markdown("Every metric of every matrix against the training step: when do singular values leave the MP bulk, "
                "and does the energy rank move with them?")
    result = ui.pick_run(options, settings)
    if result is not None:
        ui.trajectory_view(result)
    st.stop()

st.markdown("**A** is the reference (the base model), **B** the other checkpoint (a fine-tune, a later step, or "
            "a LoRA adapter merged onto A). Per matrix: both analyses, the spectrum of the update ΔW = W_B − W_A "
            "with its own MP fit, and the principal angles between A's and B's top singular subspaces.")
current = state.current()
left, right = st.columns(2)
with left:
    a = ui.pick_checkpoint("A", current, options)
with right:
    b = ui.pick_checkpoint("B", current, options, base=a)
if a is None or b is None:
    st.info("Choose both checkpoints.")
    st.stop()

result = ui.comparison(a, b, settings)
if result is None:
    st.stop()
ui.summary(result)
chart(cf.delta_bars(result), key="cmp_bars", filename="compare-delta")
ui.matrix_table(result)
st.subheader("One matrix")
ui.matrix_panels(result, a, b)
ui.downloads(result)
st.subheader("What-if across the pair")
ui.evaluation_panel(a, b)
