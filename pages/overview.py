"""Overview: open a checkpoint (the demo opens by itself), see what it holds and the per-matrix table."""
import streamlit as st

from spectral import gallery
from ui import state, tables
from ui.sidebar import human_count
from ui.widgets import ask_hyperparameters

options = state.app_options()

st.title("Spectra Explorer")
st.markdown("Which weight matrices look like noise to random-matrix theory, how much of each matrix's energy is "
            "used, and what breaks if you cut it. Pick a checkpoint, then explore **Spectra**, **Ranks** and "
            "**Pruning**; **Report** collects the figures for a paper.")

load_col, card_col = st.columns([2, 3], gap="large")
with load_col:
    st.subheader("Checkpoint")
    upload_key = f"uploads_{st.session_state.get('upload_round', 0)}"
    st.file_uploader(
        "Upload a checkpoint", type=state.UPLOAD_TYPES, accept_multiple_files=True, key=upload_key,
        on_change=state.on_upload, args=(upload_key,),
        help="One .safetensors/.pt/.pth/.bin/.gguf file, or a Hugging Face set at once: config.json, the weight "
             "shards (and their index), tokenizer.json. Pickles are read with weights_only=True: code in them never "
             "runs. Larger than the upload limit? Put it in the server folder (streamlit run app.py -- --models DIR).")
    if options.models_dir is not None:
        if entries := state.server_checkpoints(options):
            c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
            c1.selectbox("Or open one from the server folder", entries, key="server_choice",
                         help="Files in the folder given with --models; large files are memory-mapped, not uploaded.")
            c2.button("Open", on_click=state.on_server_open, key="server_open", width="stretch")
        else:
            st.caption("The server folder holds no checkpoints.")
    st.button("Open the bundled demo", on_click=state.open_demo, key="open_demo", icon=":material/restart_alt:")
    examples = {e.label: e for e in gallery.examples()}
    if len(examples) > 1:
        g1, g2 = st.columns([3, 1], vertical_alignment="bottom")
        g1.selectbox("Or a real model from the gallery", list(examples), key="gallery_choice",
                     format_func=lambda label: f"{label}: {examples[label].about}")
        g2.button("Open", on_click=state.on_gallery_open, key="gallery_open", width="stretch")
    if error := st.session_state.get(state.LOAD_ERROR):
        st.error(error, icon=":material/error:")
    if notice := st.session_state.pop(state.NOTICE, None):
        st.info(notice)

opened = state.current()
if opened is None:
    st.warning("No checkpoint is loaded: the bundled demo is missing (see README: python -m models.train_demo). "
               "Upload a checkpoint above.")
    st.stop()

ck, runtime = opened.checkpoint, opened.runtime
with card_col:
    st.subheader(opened.label)
    c = st.columns(3)
    c[0].metric("Parameters", human_count(ck.n_params), help=f"{ck.n_params:,} (tied tensors counted once)")
    c[1].metric("Weight matrices", len(opened.workspace.matrices), help=f"of {ck.n_tensors} tensors")
    c[2].metric("Tied groups", len(ck.tied_groups))
    with st.spinner("Building the model…"):
        runnable = runtime.runnable
    if runnable is not None:
        state.start_background_factors(opened)
        st.success(f"Architecture: **{runnable.architecture}** ({runnable.kind}): the Pruning page can run it.",
                   icon=":material/check_circle:")
        if runtime.hyperparameters:
            st.caption("Built with the hyperparameters given here: "
                       + ", ".join(f"{k} = {v:g}" for k, v in runtime.hyperparameters.items()))
        for note in runnable.notes:
            st.caption(note)
    else:
        st.info(f"Spectra only: {runtime.why_not}", icon=":material/info:")
        ask_hyperparameters(opened)
    details = [f"format **{ck.format}** · files: {', '.join(f.split('/')[-1] for f in ck.files) or ck.source}",
               f"sha256 `{ck.sha256}`"]
    if ck.tied_groups:
        details.append("tied: " + "; ".join(" = ".join(f"`{n}`" for n in g) for g in ck.tied_groups))
    details.append(f"spectra computed on: {state.library().compute_note}")
    st.caption("  \n".join(details))
    for warning in ck.warnings:
        st.warning(warning)

analysis = state.analysis(opened)
st.subheader("Weight matrices")
st.caption(f"{analysis.summary['n_matrices']} matrices analysed in {analysis.summary['seconds']:.2f} s · "
           f"σ̂ {analysis.settings.estimator}, TW confidence {analysis.settings.confidence:g}, "
           f"energy level {analysis.settings.energy:g} (change them in the sidebar)")
for item in analysis.summary.get("skipped", []):
    st.warning(f"{item['name']}: {item['reason']}")
tables.matrix_table(analysis)
