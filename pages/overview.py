"""Overview: load a checkpoint (the demo opens by itself), see what it holds and the per-matrix table."""
import streamlit as st

from ui import state, tables
from ui.sidebar import human_count

options = state.app_options()


def _on_upload() -> None:
    files = st.session_state.get("uploads") or []
    if files:
        state.open_upload({f.name: f.getvalue() for f in files})


def _on_gallery_open() -> None:
    choice = st.session_state.get("gallery_choice")
    if choice:
        state.open_gallery(choice)


def _on_server_open() -> None:
    choice = st.session_state.get("server_choice")
    if choice:
        state.open_server_file(choice, options)


def _ask_hyperparameters(loaded) -> None:
    """Where the weights do not fix a hyperparameter (heads, RoPE base, norm epsilon), ask; never guess."""
    needs = state.hyperparameters_needed(loaded)
    if not needs:
        return
    with st.form("hyperparameters", border=True):
        st.markdown("**The weights do not fix these; give them to run what-ifs**")
        values = {}
        for need in needs:
            if need.choices:
                values[need.name] = st.selectbox(need.name, need.choices, index=None, help=need.help,
                                                 placeholder="choose", key=f"need_{need.name}")
            elif need.kind == "int":
                values[need.name] = st.number_input(need.name, min_value=1, value=None, step=1, help=need.help,
                                                    placeholder=f"e.g. {need.typical}" if need.typical else "",
                                                    key=f"need_{need.name}")
            else:
                values[need.name] = st.number_input(need.name, min_value=0.0, value=None, format="%g",
                                                    help=need.help, key=f"need_{need.name}",
                                                    placeholder=f"e.g. {need.typical:g}" if need.typical else "")
        if st.form_submit_button("Build the model"):
            blank = [name for name, value in values.items() if value is None]
            if blank:
                st.error(f"Give {', '.join(blank)} first.")
            elif (problem := state.give_hyperparameters(loaded, values)) is not None:
                st.error(problem)
            else:
                st.rerun()


st.title("Spectra Explorer")
st.markdown("Which weight matrices look like noise to random-matrix theory, how much of each matrix's energy is "
            "used, and what breaks if you cut it. Pick a checkpoint, then explore **Spectra**, **Ranks** and "
            "**Pruning**; **Report** collects the figures for a paper.")

load_col, card_col = st.columns([2, 3], gap="large")
with load_col:
    st.subheader("Checkpoint")
    st.file_uploader(
        "Upload a checkpoint", type=state.UPLOAD_TYPES, accept_multiple_files=True, key="uploads",
        on_change=_on_upload,
        help="One .safetensors/.pt/.pth/.bin file, or a Hugging Face set at once: config.json, the weight shards "
             "(and their index), tokenizer.json. Pickles are read with weights_only=True: code in them never runs.")
    if options.models_dir is not None:
        entries = state.server_checkpoints(options.models_dir)
        if entries:
            c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
            c1.selectbox("Or open one from the server folder", entries, key="server_choice",
                         help=f"Files under the folder given with --models ({options.models_dir.name}/); "
                              "large files are memory-mapped, not uploaded.")
            c2.button("Open", on_click=_on_server_open, key="server_open", width="stretch")
        else:
            st.caption(f"The server folder {options.models_dir.name}/ holds no checkpoints.")
    st.button("Open the bundled demo", on_click=state.open_demo, key="open_demo", icon=":material/restart_alt:")
    examples = state.gallery()
    if len(examples) > 1:
        g1, g2 = st.columns([3, 1], vertical_alignment="bottom")
        g1.selectbox("Or a real model from the gallery", list(examples), key="gallery_choice",
                     format_func=lambda label: f"{label}: {examples[label][1]}")
        g2.button("Open", on_click=_on_gallery_open, key="gallery_open", width="stretch")
    if error := st.session_state.get(state.LOAD_ERROR):
        st.error(error, icon=":material/error:")
    if notice := st.session_state.pop(state.NOTICE, None):
        st.info(notice)

loaded = state.current()
if loaded is None:
    st.warning("No checkpoint is loaded: the bundled demo is missing (see README: python -m models.train_demo). "
               "Upload a checkpoint above.")
    st.stop()

ck = loaded.workspace.checkpoint
with card_col:
    st.subheader(loaded.label)
    runnable, why_not = tables.runnable_or_reason(loaded)
    c = st.columns(3)
    c[0].metric("Parameters", human_count(ck.n_params), help=f"{ck.n_params:,} (tied tensors counted once)")
    c[1].metric("Weight matrices", len(loaded.workspace.matrices), help=f"of {ck.n_tensors} tensors")
    c[2].metric("Tied groups", len(ck.tied_groups))
    if runnable is not None:
        st.success(f"Architecture: **{runnable.architecture}** ({runnable.kind}): the Pruning page can run it.",
                   icon=":material/check_circle:")
    else:
        st.info(f"Spectra only: {why_not}", icon=":material/info:")
        _ask_hyperparameters(loaded)
    if runnable is not None and (given := loaded.peek("hyperparameters")):
        st.caption("Built with the hyperparameters given here: " + ", ".join(f"{k} = {v:g}" for k, v in given.items()))
    for note in runnable.notes if runnable is not None else []:
        st.caption(note)
    details = [f"format **{ck.format}** · files: {', '.join(f.split('/')[-1] for f in ck.files) or ck.source}",
               f"sha256 `{ck.sha256}`"]
    if ck.tied_groups:
        details.append("tied: " + "; ".join(" = ".join(f"`{n}`" for n in g) for g in ck.tied_groups))
    st.caption("  \n".join(details))
    for warning in ck.warnings:
        st.warning(warning)

analysis = state.analysis(loaded)
st.subheader("Weight matrices")
st.caption(f"{analysis.summary['n_matrices']} matrices analysed in {analysis.summary['seconds']:.2f} s · "
           f"σ̂ {analysis.settings.estimator}, TW confidence {analysis.settings.confidence:g}, "
           f"energy level {analysis.settings.energy:g} (change them in the sidebar)")
for item in analysis.summary.get("skipped", []):
    st.warning(f"{item['name']}: {item['reason']}")
tables.matrix_table(analysis)
