"""The Pruning page's Heal control: train the current cut a little and watch what it recovers (issue 16).

One call from pages/pruning.py, `heal_panel(session, choice, settings)`. A heal runs in a background thread
(`spectral.heal.HealJob`, which snapshots the cut when it starts), so the page stays usable: while it runs, a fragment
redraws the curve every second and offers Stop (the heal ends after the current step, with a last evaluation); once
done, the healed model can be downloaded with its factorised matrices kept factorised. No numerics here.
"""
from __future__ import annotations

import streamlit as st

from spectral.analysis import Settings
from spectral.evaluation import EvaluationError
from spectral.heal import HEAL_MODES, HEAL_TRAIN, HealConfig, HealError, HealJob, save_healed
from spectral.pruning import PlanError
from spectral.whatif import Choice, WhatIfSession

JOB = "heal_job"  # session key: this browser session's heal (HealJob)
SHOWN = "heal_shown"  # session key: id of the finished job already drawn by a full run (the curve stops polling)
REFRESH_SECONDS = 1.0
MODE_LABELS = {"distill": "Match the untouched model (distillation)", "lm": "Next-token loss (fine-tuning)"}
TRAIN_LABELS = {"factors": "Cut matrices' low-rank factors", "unfrozen": "Everything but frozen replacements",
                "all": "Everything"}


def heal_panel(session: WhatIfSession, choice: Choice, settings: Settings) -> None:
    """Steps, objective and what trains; Heal starts a background heal of `choice`'s cut; its curve, Stop, the
    before/after numbers and the download follow."""
    encoder = session.kind == "encoder"
    st.subheader("Heal: and if the model trains a little after the cut?")
    st.caption("Trains a copy of the cut model on text the metrics never see (the demo: its training text; yours: the "
               "parts the evaluation windows leave out; sampled batches: fresh samples), "
               + ("by cosine distillation to the untouched encoder" if encoder else
                  "by distillation to the untouched model or by next-token loss")
               + ", and measures it with the same evaluation as above. The shared model is never changed.")
    c1, c2, c3, c4 = st.columns([1, 2, 2, 1], vertical_alignment="bottom")
    steps = c1.number_input("Steps", min_value=1, max_value=5000, value=50, step=10, key="heal_steps")
    mode = c2.selectbox("Objective", ["distill"] if encoder else list(HEAL_MODES), key="heal_mode",
                        format_func=lambda m: MODE_LABELS.get(m, m))
    train = c3.selectbox("What trains", list(HEAL_TRAIN), key="heal_train", format_func=lambda t: TRAIN_LABELS.get(t, t),
                         help="Factors keep the cut's storage; frozen replacements are rank-1 / random / zero cuts")
    job: HealJob | None = st.session_state.get(JOB)
    if job is not None and job.healer.session is not session:
        job.stop()  # a heal of another checkpoint or evaluation text: not this page's any more
        job = None
        st.session_state.pop(JOB, None)
    if c4.button("Heal", key="heal_start", icon=":material/healing:", disabled=job is not None and job.running):
        try:
            session.run(choice, settings)  # the working copy holds this choice's cut (cached: no new evaluation)
            with st.spinner("Preparing the training text…"):
                job = HealJob(session, HealConfig(int(steps), mode, train), label=choice.label).start()
        except (HealError, PlanError, EvaluationError) as exc:
            st.error(str(exc))
            return
        st.session_state[JOB] = job
    if job is not None:
        _job_view(job, encoder)


def _job_view(job: HealJob, encoder: bool) -> None:
    @st.fragment(run_every=REFRESH_SECONDS if job.running else None)
    def live() -> None:
        running = job.running
        config = job.config
        st.caption(f"**{job.label}** · {config.mode}, {config.train}, lr {config.learning_rate:g} · step "
                   f"{job.step}/{config.steps} · training on {job.healer.data.source}")
        if job.error:
            st.error(f"The heal stopped: {job.error}")
            return
        if running:
            st.progress(job.step / max(config.steps, 1))
            st.button("Stop", key="heal_stop", on_click=job.stop, icon=":material/stop:")
        curve = list(job.curve)
        if curve:
            _numbers(curve[0], curve[-1], encoder)
            _chart(curve, encoder)
        if not running and st.session_state.get(SHOWN) != id(job):
            st.session_state[SHOWN] = id(job)
            st.rerun()  # one full run draws the finished heal without the polling fragment
        if not running and job.result is not None:
            result = job.result
            note = " (stopped)" if result.stopped else ""
            st.caption(f"{result.steps} steps{note} in {result.seconds:.1f} s · {result.trainable_params:,} trained "
                       f"parameters · the healed file stores {result.stored_params:,} parameters")
            st.download_button(
                "Download the healed checkpoint", data=lambda: save_healed(result), on_click="ignore",
                file_name=f"healed-{config.mode}-{config.train}-{result.steps}.safetensors",
                mime="application/octet-stream", icon=":material/download:", key="heal_download",
                help="safetensors; factorised matrices are stored as NAME.factor_a @ NAME.factor_b, and the file's "
                     "metadata (spectra_loader_note) says how to read it: spectral.heal.densify_file(in, out) "
                     "writes the dense checkpoint")

    live()


def _numbers(before, after, encoder: bool) -> None:
    """Before (the cut as it stands) and after healing, side by side."""
    cols = st.columns(3)
    cols[0].metric("Agreement after healing", f"{100 * after.agreement:.2f}%",
                   f"{100 * (after.agreement - before.agreement):+.2f} points from the cut")
    if encoder:
        cols[1].metric("Cosine after healing", f"{after.cosine:.4f}", f"{after.cosine - before.cosine:+.4f}")
    else:
        cols[1].metric("KL after healing", f"{after.kl:.4g}", f"{after.kl - before.kl:+.4g} nats",
                       delta_color="inverse")
    if after.perplexity is not None and before.perplexity is not None:
        cols[2].metric("Perplexity after healing", f"{after.perplexity:.2f}",
                       f"{after.perplexity - before.perplexity:+.2f}", delta_color="inverse")


def _chart(curve, encoder: bool) -> None:
    """The damage (KL, or 1 − cosine) and the agreement over the steps."""
    steps = [p.step for p in curve]
    damage = "1 − cosine" if encoder else "KL (nats)"
    left, right = st.columns(2)
    left.line_chart({"step": steps, damage: [p.damage for p in curve]}, x="step", y=damage, height=220)
    right.line_chart({"step": steps, "agreement (%)": [100 * p.agreement for p in curve]}, x="step",
                     y="agreement (%)", height=220)
