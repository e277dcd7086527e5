"""Research: the five studies behind the project, reproduced on the loaded model, plus activation-aware SVD.

One tab per view (spectral/research/, drawn by ui/research.py); each runs behind a button (the views cost tens of
forward passes) and is cached per (checkpoint, settings, controls).
"""
import streamlit as st

from ui import research, state

st.title("Research")
opened = state.require_current()
settings = state.settings()
runtime = opened.runtime

with st.spinner("Building the model…"):
    runnable = runtime.runnable
if runnable is None:
    st.info(f"This checkpoint cannot be run ({runtime.why_not}). Two truths, threshold quality and redundancy show "
            "their spectral half; the other views need a forward pass.", icon=":material/info:")
elif runnable.kind == "encoder":
    st.caption("An encoder without a language-model head: damage is measured as 1 − cosine of the output "
               "embeddings (and nearest-neighbour agreement) instead of KL.")
else:
    st.caption("Every number compares the modified model with the untouched one on the fixed evaluation batch of "
               "the Pruning page (the model's held-out text, your own text, or sequences sampled from the model).")

for tab, (title, draw) in zip(st.tabs([title for title, _ in research.TABS]), research.TABS):
    with tab:
        draw(opened, settings)
