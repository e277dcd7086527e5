"""The Compare page's widgets: choosing the two checkpoints (or a training run), the per-matrix table, one matrix's
panels, the trajectory view and the evaluation of B against A. Display only: every number comes from
spectral/compare.py and spectral/trajectory.py; opened checkpoints live in the process-wide library (ui/state.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from models.contract import NotRunnable
from spectral import compare_figures as cf
from spectral.checkpoint import DEMO_DIR, CheckpointError, load_checkpoint_files, open_in_folder
from spectral.compare import CompareError, Comparison, comparer, evaluate_pair
from spectral.evaluation import EvaluationError
from spectral.library import Opened
from spectral.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_from, merge_adapter
from spectral.runtime import BatchSpec
from spectral.trajectory import Trajectory, find_checkpoints, run_folders, trajectory
from ui import state
from ui.tables import chart

DEMO_RUN = DEMO_DIR / "trajectory"  # the shipped snapshots of the demo's training (models/train_demo.py)
LOADED, SNAPSHOT, SERVER, UPLOAD = ("This session's checkpoint", "Demo training snapshot", "Server folder",
                                    "Upload")
METRICS = {"n_signal": "MP signal rank", "energy_rank": "energy rank", "sigma": "σ̂", "alpha": "α",
           "stable_rank": "stable rank"}


def demo_snapshots() -> list[str]:
    """The shipped snapshots' file names, in step order (empty when the folder is missing)."""
    try:
        return [p.path for p in find_checkpoints(DEMO_RUN)[0]]
    except CheckpointError:
        return []


def _open(action) -> Opened | None:
    try:
        return action()
    except CheckpointError as exc:
        st.error(str(exc), icon=":material/error:")
    except Exception as exc:  # noqa: BLE001 - anything unexpected is one line in place, the page stays usable
        st.error(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", icon=":material/error:")
    return None


def _with_adapter(base: Opened | None, weights, config: bytes | None, label: str) -> Opened | None:
    """B = A with a LoRA adapter merged (weights opened by the loader; config from its adapter_config.json)."""
    if base is None:
        st.info("Choose A first: an adapter is merged onto A.")
        return None
    merged = merge_adapter(base.checkpoint, adapter_from(weights, config, label))
    return state.library().open_checkpoint(merged, f"{base.label} + {label}", "upload")


def pick_checkpoint(side: str, current: Opened | None, options: state.AppOptions, *,
                    base: Opened | None = None) -> Opened | None:
    """One side's checkpoint from this session's, the demo's training snapshots, the server folder or an upload.
    On side B an adapter (adapter_config.json with adapter_model.safetensors) is merged onto A."""
    sources = ([LOADED] if side == "A" else []) + [SNAPSHOT] + ([SERVER] if options.models_dir else []) + [UPLOAD]
    source = st.segmented_control(side, sources, default=sources[0], key=f"cmp_{side}_source", required=True)
    library = state.library()
    if source == LOADED:
        st.caption(f"`{current.label}`" if current else "nothing loaded")
        return current
    if source == SNAPSHOT:
        names = demo_snapshots()
        if not names:
            st.warning("The demo's training snapshots are missing (models/demo/trajectory).")
            return None
        name = st.selectbox("Snapshot", names, key=f"cmp_{side}_snapshot")
        return _open(lambda: library.open_path(str(DEMO_RUN / name), f"demo trajectory/{name}", "demo"))
    if source == SERVER:
        root = options.models_dir
        name = st.selectbox("Server checkpoint", state.server_checkpoints(options), key=f"cmp_{side}_server")
        if name is None:
            return None
        adapter_folder = (root / name).parent
        if side == "B" and Path(name).name in ADAPTER_WEIGHTS and (adapter_folder / ADAPTER_CONFIG).is_file():
            def adapter() -> Opened | None:
                weights = open_in_folder(root, name)
                return _with_adapter(base, weights, weights.side_file(ADAPTER_CONFIG), name)
            return _open(adapter)
        return _open(lambda: library.open_path(str(root / name), name, "server",
                                               loader=lambda _path: open_in_folder(root, name)))
    files = st.file_uploader(f"Upload {side}", type=state.UPLOAD_TYPES, accept_multiple_files=True,
                             key=f"cmp_{side}_upload", help="one checkpoint, a Hugging Face set, or on side B a LoRA "
                             "adapter: adapter_config.json with adapter_model.safetensors")
    if not files:
        return None
    data = {f.name: f.getvalue() for f in files}
    if side == "B" and ADAPTER_CONFIG in data:
        config = data.pop(ADAPTER_CONFIG)
        return _open(lambda: _with_adapter(base, load_checkpoint_files(data), config, "adapter"))
    return _open(lambda: library.open_checkpoint(load_checkpoint_files(data), ", ".join(sorted(data)), "upload"))


def comparison(a: Opened, b: Opened, settings) -> Comparison | None:
    """The comparison (cached per pair and settings by the engine), or None with the reason shown in place."""
    try:
        return comparer(a.workspace, b.workspace).compare(settings, progress=state.progress_bar("Comparing"))
    except (CompareError, CheckpointError, ValueError) as exc:
        st.error(str(exc))
        return None


def summary(result: Comparison) -> None:
    changed = [m for m in result.matrices if m.delta.relative_norm > 0]
    low_rank = [m for m in changed if 0 < m.delta.n_signal <= max(1, min(m.shape) // 10)]
    c = st.columns(4)
    c[0].metric("Matched matrices", len(result.matrices), help="by name (and shape) in the analysed layout")
    c[1].metric("Changed", len(changed))
    c[2].metric("Low-rank updates", len(low_rank), help="ΔW signal rank ≤ 10% of the full rank, and > 0")
    c[3].metric("Only in A / only in B", f"{len(result.unmatched_a)} / {len(result.unmatched_b)}")
    for note in result.notes:
        st.caption(note)
    for side, names in (("A", result.unmatched_a), ("B", result.unmatched_b)):
        if names:
            st.caption(f"Only in {side}: " + ", ".join(f"`{n}`" for n in names))


def matrix_table(result: Comparison) -> None:
    rows = [{"matrix": m.name, "role": m.role, "σ̂ A": m.a.sigma, "σ̂ B": m.b.sigma, "signal A": m.a.n_signal,
             "signal B": m.b.n_signal, "energy A": m.a.energy_rank, "energy B": m.b.energy_rank,
             "Δ stable rank": m.change["stable_rank"], "ΔW signal": m.delta.n_signal,
             "‖ΔW‖/‖W_A‖": m.delta.relative_norm,
             "max angle °": max(m.subspace.angles_deg) if m.subspace.angles_deg else None,
             "LoRA rank": m.lora.rank if m.lora else None} for m in result.matrices]
    fmt = st.column_config.NumberColumn
    st.dataframe(rows, hide_index=True, key="cmp_table", column_config={
        "σ̂ A": fmt(format="%.4g"), "σ̂ B": fmt(format="%.4g"), "Δ stable rank": fmt(format="%+.2f"),
        "‖ΔW‖/‖W_A‖": fmt(format="%.3g"), "max angle °": fmt(format="%.1f")})


def matrix_panels(result: Comparison, a: Opened, b: Opened) -> None:
    """One matrix: both spectra with both fits, ΔW's spectrum with its fit, the principal-angle curves."""
    names = [m.name for m in result.matrices]
    default = max(range(len(names)), key=lambda i: result.matrices[i].delta.relative_norm)
    name = st.selectbox("Matrix", names, index=default, key="cmp_matrix")
    row = result.row(name)
    context = cf.comparison_context(result)
    spectra_a, spectra_b = a.workspace.spectra(), b.workspace.spectra()
    left, right = st.columns(2)
    with left:
        chart(cf.overlay_histogram(row, spectra_a[row.name], spectra_b[row.name_b], context=context),
              key="cmp_overlay", filename=f"compare-{name}")
    with right:
        chart(cf.delta_histogram(row, settings=result.settings, context=context), key="cmp_delta",
              filename=f"delta-{name}")
    if row.lora is not None:
        st.caption(f"LoRA: rank {row.lora.rank}, α = {row.lora.alpha:g}, scaling α/r = {row.lora.scaling:g} "
                   f"(module `{row.lora.module}`)")
    chart(cf.angle_curves([row], context=context), key="cmp_angles", filename=f"angles-{name}")


def downloads(result: Comparison) -> None:
    st.download_button("Comparison as JSON", data=result.to_json(), file_name="compare.json",
                       mime="application/json", on_click="ignore", key="cmp_json", icon=":material/data_object:")


def evaluation_panel(a: Opened, b: Opened) -> None:
    """B's weights in A's model on A's evaluation batch: agreement and KL of B against A (behind a button)."""
    if not st.button("Evaluate B against A", key="cmp_evaluate", icon=":material/play_arrow:",
                     help="run B's weights in A's model on A's evaluation batch (needs both to run, one "
                          "architecture)"):
        return
    try:
        with st.spinner("Running both models on A's evaluation batch…"):
            result = evaluate_pair(a.runtime, b.runtime, BatchSpec(st.session_state.get(state.EVAL_TEXT) or None))
    except (NotRunnable, CompareError, EvaluationError) as exc:
        st.info(f"No evaluation: {exc}")
        return
    m = result.metrics
    c = st.columns(3)
    c[0].metric("Top-1 agreement" if m.kl is not None else "Neighbour agreement", f"{100 * m.agreement:.2f}%")
    c[1].metric("KL(A ‖ B) per position" if m.kl is not None else "Cosine",
                f"{m.kl:.4g}" if m.kl is not None else f"{m.cosine:.4f}")
    if m.perplexity_before is not None and m.perplexity_after is not None:
        c[2].metric("Perplexity B", f"{m.perplexity_after:.2f}", f"{m.perplexity_after - m.perplexity_before:+.2f} "
                    f"vs A's {m.perplexity_before:.2f}", delta_color="inverse")
    st.caption(f"{result.batch.positions:,} positions of A's evaluation batch ({result.batch.source}).")


# ------------------------------------------------------------------------------------------------ trajectories

def pick_run(options: state.AppOptions, settings) -> Trajectory | None:
    """The shipped demo run, or a run folder of the server folder; its trajectory (cached by the engine)."""
    runs = ["demo training (shipped snapshots)"] + (run_folders(options.models_dir) if options.models_dir else [])
    choice = st.selectbox("Training run", runs, key="traj_run",
                          help="a folder of checkpoint-N folders, nanoGPT files with iter_num, or numbered files")
    try:
        if choice == runs[0]:
            return trajectory(DEMO_RUN, settings, progress=state.progress_bar("Spectra"))
        return trajectory(choice, settings, root=options.models_dir, progress=state.progress_bar("Spectra"))
    except (CheckpointError, ValueError) as exc:
        st.error(str(exc))
        return None


def trajectory_view(result: Trajectory) -> None:
    steps = ", ".join(str(s) for s in result.steps)
    st.caption(f"{len(result.checkpoints)} checkpoints at steps {steps} · {len(result.matrices)} matrices · "
               f"{result.seconds:.2f} s")
    for note in result.notes:
        st.caption(note)
    chart(cf.trajectory_ranks(result), key="traj_ranks", filename="trajectory-ranks")
    c = st.columns(2)
    metric = c[0].selectbox("Metric", list(METRICS), key="traj_metric", format_func=METRICS.get)
    by = c[1].segmented_control("One line per", ["role", "matrix"], default="role", key="traj_by", required=True)
    chart(cf.trajectory_metric(result, metric, by=by), key="traj_metric_chart", filename=f"trajectory-{metric}")
    st.download_button("Trajectory as JSON", data=json.dumps(result.to_dict(), indent=2), file_name="trajectory.json",
                       mime="application/json", on_click="ignore", key="traj_json", icon=":material/data_object:")
