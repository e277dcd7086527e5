"""A long-running server's memory levels off (issue 17 item 5): twenty different checkpoints uploaded one after
another into one real `streamlit run` through Chromium; at most four stay open (SPECTRA_MAX_CHECKPOINTS), so the
server's RSS after twenty must stay within 1.3x its RSS after the first five."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from models.gpt import GPT, GPTConfig
from tests.browser import chromium_path, launch_chromium, server_rss_mib, streamlit_server, wait_idle

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (apt-get install chromium)"),
]
CONFIG = GPTConfig(vocab_size=2048, block_size=64, n_layer=4, n_head=4, n_embd=256)  # 3.7 M parameters, 15 MB


def checkpoint(path, seed: int):
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"architecture": "spectra-demo-gpt",
                                            "config": json.dumps(CONFIG.to_dict())})
    return path


def test_server_memory_levels_off_over_twenty_uploads(tmp_path):
    from playwright.sync_api import sync_playwright

    rss = []
    with streamlit_server() as url, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.set_default_timeout(180_000)
        page.goto(url)
        wait_idle(page)
        for i in range(20):
            path = checkpoint(tmp_path / f"model-{i:02d}.safetensors", seed=i)
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))
            page.locator(".st-key-checkpoint_box", has_text=path.name).wait_for()
            wait_idle(page)
            path.unlink()
            rss.append(server_rss_mib(url))
        browser.close()
    print(f"server RSS after each upload (MiB): {[round(r) for r in rss]}")
    assert rss[-1] <= 1.3 * rss[4], f"server RSS after each upload (MiB): {[round(r) for r in rss]}"
