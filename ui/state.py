"""This browser session's choices, and the one process-wide cache of what sessions share.

- Shared: one `spectral.library.Library` per server process (`st.cache_resource`): open checkpoints by content,
  each with its `ModelRuntime` (spectra, model, evaluators), and every user's what-if session, both bounded.
- This session (`st.session_state`): only choices. Which checkpoint is current (its sha256 and how to reopen it), the
  widget values, the evaluation text, the last load error. Two sessions on different checkpoints see only their own.

No numerics here: everything numeric comes from `spectral/`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from models.contract import NotRunnable
from spectral import gallery
from spectral.analysis import Analysis, Settings
from spectral.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint_files,
    open_in_folder,
)
from spectral.devices import DeviceError, resolve_device
from spectral.distributed import DistributedError, RayMap
from spectral.evaluation import EvaluationError
from spectral.figures import ESTIMATOR_LABELS, NULL_LABELS
from spectral.library import Library, Opened
from spectral.noise import ESTIMATORS
from spectral.nulls import NULLS
from spectral.runtime import BatchSpec
from spectral.whatif import WhatIfSession

MAX_CHECKPOINTS = int(os.environ.get("SPECTRA_MAX_CHECKPOINTS", "4"))  # open checkpoints kept in memory
MAX_WHATIF_SESSIONS = int(os.environ.get("SPECTRA_MAX_WHATIF", "6"))  # what-if sessions (working copies) kept
UPLOAD_TYPES = ["safetensors", "pt", "pth", "bin", "ckpt", "gguf", "json", "txt", "model"]
CONFIDENCES = [0.5, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999]
ENERGIES = [0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999]

CURRENT = "current_checkpoint"  # session key: {"sha256", "label", "origin", "path"}
LOAD_ERROR = "load_error"  # session key: the last loading error, shown in place on the Overview page
NOTICE = "load_notice"
EVAL_TEXT = "eval_text"  # session key: the user's own evaluation text, or absent for the model's default batch


# ------------------------------------------------------------------------------------------------ command line
@dataclass(frozen=True)
class AppOptions:
    models_dir: Path | None  # server-side folder of checkpoints (`streamlit run app.py -- --models DIR`)
    ray: str | None = None  # Ray cluster for the spectra (`-- --ray ADDRESS`; "" means $RAY_ADDRESS)
    device: str = "cpu"  # where models and local spectra run (`-- --device cpu|cuda|auto`)


def app_options(argv: list[str] | None = None) -> AppOptions:
    """Options after `--` on the streamlit command line; $SPECTRA_MODELS is the same as --models."""
    parser = argparse.ArgumentParser(prog="app.py", add_help=False)
    parser.add_argument("--models", default=os.environ.get("SPECTRA_MODELS"))
    parser.add_argument("--ray", nargs="?", const="", default=None)
    parser.add_argument("--device", default="cpu")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    models = Path(args.models).expanduser().resolve() if args.models else None
    return AppOptions(models if models is not None and models.is_dir() else None, args.ray, args.device)


def server_checkpoints(options: AppOptions) -> list[str]:
    """Checkpoints in the server folder (relative paths), or none without one."""
    return list_checkpoints(options.models_dir) if options.models_dir is not None else []


@st.cache_resource(show_spinner=False)
def library() -> Library:
    """The process-wide cache of open checkpoints and what-if sessions, shared by every browser session; with
    `--ray`/`--device` its spectra go to the cluster or the GPU. A cluster or device that cannot be used leaves the
    server working on its CPU, and the Overview card says why."""
    options = app_options()
    try:
        device = resolve_device(options.device)
        mapper = None if options.ray is None else RayMap(options.ray or None, device=options.device)
    except (DeviceError, DistributedError) as exc:
        return Library(MAX_CHECKPOINTS, MAX_WHATIF_SESSIONS,
                       compute_note=f"this server, cpu: {' '.join(str(exc).split())[:300]}")
    note = mapper.describe() if mapper is not None else ""
    return Library(MAX_CHECKPOINTS, MAX_WHATIF_SESSIONS, mapper=mapper, device=device, compute_note=note)


def session_id() -> str:
    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else "no-session"


# ------------------------------------------------------------------------------------------------ opening
def _remember(opened: Opened) -> Opened:
    st.session_state[CURRENT] = {"sha256": opened.sha256, "label": opened.label, "origin": opened.origin,
                                 "path": opened.path}
    st.session_state.pop(LOAD_ERROR, None)
    return opened


def _open(action) -> Opened | None:
    """Run an opening action; a failure becomes this session's load error (one line), shown in place."""
    try:
        return _remember(action())
    except CheckpointError as exc:
        st.session_state[LOAD_ERROR] = str(exc)
    except Exception as exc:  # noqa: BLE001 - anything the loader did not anticipate is still one line, in place
        st.session_state[LOAD_ERROR] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return None


def open_demo() -> Opened | None:
    return _open(lambda: library().open_path("demo", "demo", "demo"))


def open_gallery(label: str) -> Opened | None:
    """A real model a package installed on this server (paths confined to its folder, like the server folder's)."""
    item = gallery.example(label)
    if item.root == "demo":
        return open_demo()
    return _open(lambda: library().open_path(item.path, item.label, "gallery",
                                             loader=lambda _path: open_in_folder(item.root, item.relative)))


def open_server_file(relative: str, options: AppOptions) -> Opened | None:
    """A checkpoint from the server folder: every path it reads is confined to the folder (spectral/checkpoint.py)."""
    if options.models_dir is None:
        st.session_state[LOAD_ERROR] = "no server folder was given (streamlit run app.py -- --models DIR)"
        return None
    root = options.models_dir
    return _open(lambda: library().open_path(str(root / relative), relative, "server",
                                             loader=lambda _path: open_in_folder(root, relative)))


def open_upload(files: dict[str, bytes]) -> Opened | None:
    """One uploaded file or a Hugging Face set (config.json, shards, tokenizer.json), from memory."""
    def load() -> Opened:
        checkpoint = load_checkpoint_files(files)
        return library().open_checkpoint(checkpoint, checkpoint.source, "upload")
    return _open(load)


# Widget callbacks live here, not in the pages: Streamlit keeps a widget's callback after the run, and a function
# defined in a page holds that run's globals (the open checkpoint among them) alive with it.
def on_upload(key: str) -> None:
    """Open what was just dropped, then give the uploader a new key: a fresh, empty widget, so the next drop is a
    new choice and Streamlit lets go of these bytes (the opened checkpoint holds its own)."""
    st.session_state.pop(LOAD_ERROR, None)  # a new choice replaces the message of the last one
    if files := st.session_state.get(key) or []:
        open_upload({f.name: f.getvalue() for f in files})
        st.session_state["upload_round"] = st.session_state.get("upload_round", 0) + 1
        ctx = get_script_run_ctx()  # Streamlit keeps uploaded bytes for the session's life unless told to drop them
        if ctx is not None and getattr(ctx, "uploaded_file_mgr", None) is not None:
            for f in files:
                ctx.uploaded_file_mgr.remove_file(ctx.session_id, f.file_id)


def on_gallery_open() -> None:
    if choice := st.session_state.get("gallery_choice"):
        open_gallery(choice)


def on_server_open() -> None:
    if choice := st.session_state.get("server_choice"):
        open_server_file(choice, app_options())


def current() -> Opened | None:
    """This session's checkpoint: the remembered one, reopened if evicted, else the demo (opens with no action)."""
    choice = st.session_state.get(CURRENT)
    if choice is not None:
        opened = library().get(choice["sha256"])
        if opened is not None:
            return opened
        if choice.get("path"):
            reopen = {"demo": open_demo, "gallery": lambda: open_gallery(choice["label"]),
                      "server": lambda: open_server_file(choice["label"], app_options())}[choice["origin"]]
            opened = reopen()
            if opened is not None:
                if opened.sha256 != choice["sha256"]:
                    st.session_state[NOTICE] = f"{choice['label']} changed on disk; the new content is loaded."
                return opened
        else:
            st.session_state[NOTICE] = (f"{choice['label']} was evicted from memory (at most {MAX_CHECKPOINTS} "
                                        "checkpoints are kept); upload it again. Showing the demo.")
        st.session_state.pop(CURRENT, None)
    if st.session_state.get("demo_failed"):
        return None
    opened = open_demo()
    if opened is None:
        st.session_state["demo_failed"] = True
    return opened


def require_current() -> Opened:
    """This session's checkpoint for a page that needs one; without one, says where to open it and stops the page."""
    opened = current()
    if opened is None:
        st.warning("No checkpoint is loaded; open one on the Overview page.")
        st.stop()
    return opened


# --------------------------------------------------------------------------------------------------- settings
def settings() -> Settings:
    """The analysis settings chosen in the sidebar (defaults of RMT.md before any choice)."""
    ss = st.session_state
    return Settings(ss.get("estimator", "bema"), float(ss.get("confidence", 0.99)), float(ss.get("energy", 0.999)),
                    ss.get("null", "mp"))


def settings_widgets() -> None:
    """Estimator, TW confidence and energy level: one set for every page, kept in session state."""
    st.selectbox("Noise estimator σ̂", list(ESTIMATORS), key="estimator",
                 format_func=lambda k: ESTIMATOR_LABELS.get(k, k),
                 help="How the noise level of each matrix is estimated (RMT.md §3-§5).")
    st.select_slider("Edge confidence c", CONFIDENCES, value=0.99, key="confidence",
                     help="Tracy-Widom confidence of the bulk edges: 0.99 is the 'z > 2' rule; 0.90 is BEMA's default.")
    st.select_slider("Energy level p", ENERGIES, value=0.999, key="energy",
                     help="The energy rank keeps this fraction of Σs² (0.999: the PhotonicGPT study's level).")
    st.selectbox("Null model", list(NULLS), key="null", format_func=lambda k: NULL_LABELS.get(k, k),
                 help="What 'signal' is measured against (RMT.md §11): i.i.d. Marchenko-Pastur; MP after "
                      "biwhitening (row/column variance profiles); or shuffles of the matrix's own entries "
                      "(heavy tails). Each matrix says whether its null fits.")


PROGRESS_AFTER_SECONDS = 0.3  # work that ends sooner draws no bar: a demo move's four evaluation chunks made six
# page updates for a bar nobody could read


def progress_bar(text: str):
    """A progress(i, total, label) callback drawing a bar that appears with the first report at least
    PROGRESS_AFTER_SECONDS after it was made (work done sooner shows none) and goes at the end."""
    bar = None
    start = time.perf_counter()

    def progress(i: int, total: int, label: str) -> None:
        nonlocal bar
        if total == 0:
            return
        if bar is None:
            if i >= total or time.perf_counter() - start < PROGRESS_AFTER_SECONDS:
                return
            bar = st.progress(0.0, text=text)
        bar.progress(min(i / total, 1.0), text=f"{text} {i}/{total}: {label}" if label else text)
        if i >= total:
            bar.empty()

    return progress


def analysis(opened: Opened, chosen: Settings | None = None) -> Analysis:
    """The analysis at the chosen settings; a progress bar while spectra are computed the first time."""
    return opened.workspace.analyze(chosen or settings(), progress=progress_bar("Singular values"))


# ----------------------------------------------------------------------------------------------- what-ifs
def whatif_session(opened: Opened) -> tuple[WhatIfSession | None, str | None]:
    """(this session's what-if session, None), or (None, why there is none): the model cannot run. A text of the
    user's that cannot make an evaluation batch is refused in place and the default batch is used."""
    runtime = opened.runtime
    with st.spinner("Building the model…"):
        why_not = runtime.why_not
    if why_not is not None:
        return None, why_not
    text = st.session_state.get(EVAL_TEXT) or None
    try:
        with st.spinner("Running the untouched model once on the evaluation batch…"):
            return library().session(session_id(), opened, BatchSpec(text)), None
    except EvaluationError as exc:
        st.session_state.pop(EVAL_TEXT, None)
        st.error(f"Your evaluation text was not used: {exc}. Evaluating on the model's default batch instead.")
        return whatif_session(opened)
    except NotRunnable as exc:
        return None, exc.reason


def start_background_factors(opened: Opened) -> None:
    """A model that runs gets every matrix's truncation factors computed in the background from now on, so the
    first slider moves find them ready (shared by every session on this checkpoint; once per checkpoint)."""
    if opened.runtime.runnable is not None:
        opened.runtime.start_prefetch()


def give_hyperparameters(opened: Opened, values: dict) -> str | None:
    """Rebuild the model with hyperparameters the user gave (shared by every session on this content); None on
    success, else why not (one line)."""
    try:
        opened.runtime.with_hyperparameters(values)
    except NotRunnable as exc:
        return exc.reason
    return None
