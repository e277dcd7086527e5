"""Pages-side glue for what-ifs: the shared evaluator per checkpoint, this session's pruner, cached scans.

The engine (spectral/pruning.py, spectral/evaluation.py) does all the work; this module only decides what is shared
(the runnable model and the untouched model's reference outputs: read-only, one per checkpoint) and what is per
session (the `WhatIf` holding the one working copy of the cut matrices), and caches results as plain dicts.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import streamlit as st

from spectral.analysis import Settings
from spectral.evaluation import EvaluationError, Evaluator, WhatIf, make_eval_batch
from ui import state, tables

# strategy -> (label, slider kind, help); the values a slider offers are choices, not numerics
STRATEGY_LABELS = {
    "mp": "MP z-score (keep z > threshold)",
    "energy": "Energy (keep a fraction of Σs²)",
    "rank": "Rank fraction",
    "optimal": "Gavish-Donoho optimal threshold",
    "band": "Remove one decile of the spectrum",
    "rank1": "Replace by rank-1 part",
    "random": "Replace by random (same norm)",
    "zero": "Replace by zeros",
    "none": "No cut (precision only)",
}
ENERGY_STEPS = [0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999]
SCOPES = {"all": "All matrices", "attention": "Attention", "mlp": "MLP", "embedding": "Embedding / head"}

# the standard strategies drawn as reference points (PhotonicGPT study's rows): (label, strategy, value, precision,
# group); points of one group are joined by a line
STANDARD = [
    ("MP z>2", "mp", 2.0234, "fp32", None),
    ("Gavish-Donoho", "optimal", None, "fp32", None),
    ("fp16", "none", None, "fp16", None),
    ("int8", "none", None, "int8", None),
    ("99.9%", "energy", 0.999, "fp32", "energy rank"),
    ("99.5%", "energy", 0.995, "fp32", "energy rank"),
    ("99%", "energy", 0.99, "fp32", "energy rank"),
    ("98%", "energy", 0.98, "fp32", "energy rank"),
    ("95%", "energy", 0.95, "fp32", "energy rank"),
]


@dataclass(frozen=True)
class Choice:
    strategy: str
    value: float | None
    scope: str
    precision: str

    @property
    def label(self) -> str:
        """'MP z > 2', 'energy 99.9%, int8, mlp' ..."""
        v = self.value
        text = {"mp": f"MP z > {v:g}" if v is not None else "MP",
                "energy": f"energy {100 * v:g}%" if v is not None else "energy",
                "rank": f"rank {100 * v:g}%" if v is not None else "rank",
                "optimal": "Gavish-Donoho", "band": f"decile {int(v)} removed" if v is not None else "band",
                "rank1": "rank-1", "random": f"random (seed {int(v)})" if v is not None else "random",
                "zero": "zeros", "none": "no cut"}.get(self.strategy, self.strategy)
        if self.precision != "fp32":
            text = self.precision if self.strategy == "none" else f"{text}, {self.precision}"
        if self.scope != "all":
            text += f", {self.scope}"
        return text


EVAL_TEXT = "eval_text"  # session state: the user's own evaluation text (a choice, like the sliders), or absent


def eval_key() -> str:
    """Names this session's evaluation batch: "" for the model's default (bundled text or samples), else the
    digest of the user's text. Shared evaluators and cached results are keyed by it."""
    text = st.session_state.get(EVAL_TEXT)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16] if text else ""


def evaluator_key(key: str) -> str:
    return "evaluator" if not key else f"evaluator:{key}"


def evaluator(loaded: state.Loaded):
    """The untouched model's reference outputs on the fixed evaluation batch: built once per checkpoint and text,
    shared by every session that evaluates on the same text."""
    runnable, why_not = tables.runnable_or_reason(loaded)
    if runnable is None:
        return None, why_not
    text = st.session_state.get(EVAL_TEXT) or None

    def build():
        with loaded.forward_lock:
            return Evaluator(runnable, make_eval_batch(runnable, text))

    try:
        with st.spinner("Running the untouched model once on the evaluation batch…"):
            return loaded.shared(evaluator_key(eval_key()), build), None
    except EvaluationError as exc:  # the user's text cannot make a batch: say why, go back to the default
        st.session_state.pop(EVAL_TEXT, None)
        st.error(f"Your evaluation text was not used: {exc}. Evaluating on the model's default batch instead.")
        return evaluator(loaded)


def run(loaded: state.Loaded, session: WhatIf, plan, plan_seconds: float = 0.0):
    """One what-if on this session's working copy; forward passes on the shared model are serialised."""
    with loaded.forward_lock:
        return session.run_plan(plan, plan_seconds=plan_seconds)


def session_whatif(loaded: state.Loaded, ev: Evaluator, settings: Settings) -> WhatIf:
    """This session's what-if (its own working copy of the cut matrices), kept in a bounded per-session registry."""
    key = (state.session_id(), loaded.sha256, "whatif", eval_key())
    whatif = state.session_objects().get_or_create(
        key, lambda: WhatIf(loaded.workspace, ev.runnable, evaluator=ev, settings=settings))
    whatif.settings = settings  # mp/optimal plans read the analysis at the sidebar's settings
    return whatif


def prepare_factors(loaded: state.Loaded, plan, slow: float = 0.05) -> None:
    """Compute the SVD factors a plan needs before it runs, with a progress bar that appears only once a
    factorisation is actually computed (cached ones return at once, so slider moves draw nothing extra)."""
    todo = [name for name, cut in plan.cuts.items() if cut.needs_factors]
    bar = None
    for i, name in enumerate(todo):
        start = time.perf_counter()
        loaded.workspace.factors(name)
        if bar is None and time.perf_counter() - start > slow and i + 1 < len(todo):
            bar = st.progress(0.0, text="SVD factors…")
        if bar is not None:
            bar.progress((i + 1) / len(todo), text=f"SVD factors {i + 1}/{len(todo)}: {name}")
    if bar is not None:
        bar.empty()


def result_point(label: str, result, group: str | None = None, short: str | None = None) -> dict:
    d = result.to_dict()
    return {"label": label, "short": short or label, "compression": d["compression"], "kl": d["kl"],
            "agreement": d["agreement"],
            "cosine": d.get("cosine"), "params_after": d["params_after"], "group": group,
            "perplexity_after": d["perplexity_after"]}


@st.cache_data(show_spinner=False, max_entries=32)
def standard_points(sha256: str, settings: Settings, scope: str, _loaded: state.Loaded, _ev: Evaluator,
                    eval_key: str = "") -> list[dict]:
    """Compression and KL of the standard strategies in this scope (a private what-if, so the session's working copy
    is untouched). Cached per (checkpoint, settings, scope, evaluation text)."""
    whatif = WhatIf(_loaded.workspace, _ev.runnable, evaluator=_ev, settings=settings)
    points = []
    bar = st.progress(0.0, text="Reference strategies…")
    for i, (label, strategy, value, precision, group) in enumerate(STANDARD):
        bar.progress(i / len(STANDARD), text=f"Reference strategies: {label}")
        with _loaded.forward_lock:
            result = whatif.run(strategy, value, scope=scope, precision=precision)
        points.append(result_point(label if group is None else f"energy {label}", result, group, short=label))
    bar.empty()
    return points


@st.cache_data(show_spinner=False, max_entries=16)
def sensitivity(sha256: str, settings: Settings, choice: Choice, by: str, _loaded: state.Loaded,
                _ev: Evaluator, eval_key: str = "") -> list[dict]:
    """The engine's sensitivity scan (one matrix or one role cut at a time), cached per checkpoint and choice."""
    whatif = WhatIf(_loaded.workspace, _ev.runnable, evaluator=_ev, settings=settings)
    bar = st.progress(0.0, text="Sensitivity scan…")

    def progress(i, total, name):
        bar.progress(min(i / max(total, 1), 1.0), text=f"Sensitivity scan {i}/{total}: {name}")

    with _loaded.forward_lock:
        rows = whatif.scan(choice.strategy, choice.value, by=by, scope=choice.scope,
                           precision=choice.precision if choice.precision != "fp32" else None, progress=progress)
    bar.empty()
    return rows
