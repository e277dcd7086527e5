"""The user's path in a real browser: Debian's Chromium (Playwright) against a real `streamlit run` on 127.0.0.1.

Opens on the demo, visits every page (screenshots saved to docs/screenshots/, used by README), uploads a checkpoint
through the real file input, moves a Pruning slider and reads the new metrics, and uploads a malicious pickle whose
payload must not run. One server for the module; about a minute on 2 cores.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from spectral.checkpoint import DEMO_DIR
from tests.browser import (
    chromium_path,
    goto_page,
    launch_chromium,
    screenshot,
    streamlit_server,
    wait_charts,
    wait_idle,
)
from tests.test_app import malicious_pickle_bytes, tiny_gpt_bytes

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
ARTIFACTS = ROOT / "tests" / "artifacts"

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (/usr/bin/chromium); "
                                                       "apt-get install chromium"),
]
needs_demo = pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").is_file(),
                                reason="the bundled demo is not built (python -m models.train_demo)")


@pytest.fixture(scope="module")
def app_url():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with streamlit_server(log_path=ARTIFACTS / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture
def page(browser, app_url, request):
    context = browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    pg = context.new_page()
    pg.set_default_timeout(120_000)
    pg.goto(app_url)
    wait_idle(pg)
    yield pg
    try:  # the last state of every test, kept as a CI artifact (tests/artifacts/ is not committed)
        pg.screenshot(path=str(ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', request.node.name)}.png"))
    finally:
        context.close()


def sidebar_box(page) -> str:
    return page.locator(".st-key-checkpoint_box").inner_text()


def errors(page) -> list[str]:
    return page.locator('[data-testid="stAlertContentError"]').all_inner_texts()


def assert_no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator(
        '[data-testid="stException"]').all_inner_texts()


def upload(page, path: Path) -> None:
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))
    page.wait_for_timeout(300)  # the upload's rerun starts after the file is sent
    wait_idle(page)


def metric_values(page) -> dict[str, str]:
    labels = page.locator('[data-testid="stMetricLabel"]').all_inner_texts()
    values = page.locator('[data-testid="stMetricValue"]').all_inner_texts()
    return {label.strip(): value.strip() for label, value in zip(labels, values)}


def choose(page, key: str, option: str, attempts: int = 4) -> None:
    # typed into the combobox, the list holds only the match: a long one scrolls and re-renders under the click.
    # A rerun that redraws the widget while it is typed into (a loaded machine: a fragment still finishing) closes
    # the list and drops the text, so an option that does not show within a few seconds is typed again.
    box = page.locator(f'.st-key-{key} input[role="combobox"]')
    item = page.get_by_role("option", name=option, exact=True)
    for attempt in range(attempts):
        box.fill(option)
        try:
            item.wait_for(state="visible", timeout=10_000)
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: the list was closed under us
            if attempt == attempts - 1:
                raise
            page.keyboard.press("Escape")
            wait_idle(page)
            continue
        item.click()
        break
    page.wait_for_timeout(300)  # the rerun starts after the choice is sent; idle before that is the old run's
    wait_idle(page)


# ------------------------------------------------------------------------------------------------ tests
@needs_demo
def test_app_opens_on_the_demo_without_error(page):
    assert_no_exception(page)
    assert errors(page) == []
    assert "demo" in sidebar_box(page)
    assert page.locator("h1").first.inner_text() == "Spectra Explorer"
    page.wait_for_selector('[data-testid="stDataFrame"]')
    screenshot(page, SCREENSHOTS / "overview.png")


@needs_demo
def test_every_page_renders_and_is_screenshotted(page, app_url):
    for name in ["Spectra", "Ranks", "Pruning", "Report"]:
        goto_page(page, app_url, name)
        assert_no_exception(page)
        assert errors(page) == [], (name, errors(page))
        assert "demo" in sidebar_box(page), name
        page.wait_for_selector('[data-testid="stPlotlyChart"] .main-svg')  # plotly.js loads after the run
        if name == "Pruning":  # the sensitivity heatmap belongs in the screenshot (and then in the report)
            page.locator(".st-key-sens_run button").click()
            page.wait_for_timeout(300)
            wait_idle(page)
            page.locator(".st-key-sens_heatmap").wait_for()
        screenshot(page, SCREENSHOTS / f"{name.lower()}.png")
    # the Report page's server-side export (kaleido + the same Chromium) delivers a real SVG
    with page.expect_download(timeout=120_000) as download:
        page.locator(".st-key-report_dl_0_svg button").first.click()
    svg = Path(download.value.path()).read_bytes()
    assert b"<svg" in svg[:400] and b"Signal rank vs energy rank" in svg


def test_checkpoint_uploaded_through_the_file_input(page, tmp_path):
    path = tmp_path / "tiny-upload.safetensors"
    path.write_bytes(tiny_gpt_bytes(seed=7))
    upload(page, path)
    assert_no_exception(page)
    assert "tiny-upload.safetensors" in sidebar_box(page)
    assert not [e for e in errors(page) if "tiny-upload" in e]
    page.get_by_text("Architecture: spectra-demo-gpt").wait_for()
    goto_page(page, page.url.rstrip("/"), "Spectra")
    assert "tiny-upload.safetensors" in sidebar_box(page)
    wait_charts(page)


def test_malicious_pickle_upload_shows_an_error_and_runs_nothing(page, tmp_path, app_url):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(malicious_pickle_bytes(marker))
    before = sidebar_box(page)
    upload(page, path)
    page.locator('[data-testid="stAlertContentError"]', has_text="evil.pt").wait_for()
    assert not marker.exists(), "the pickle's payload ran"
    assert sidebar_box(page) == before  # the previous checkpoint stays loaded
    goto_page(page, app_url, "Ranks")  # and the app stays usable
    assert_no_exception(page)
    assert not marker.exists()


@needs_demo
def test_pruning_slider_moves_and_the_metrics_change(page, app_url):
    goto_page(page, app_url, "Pruning")
    choose(page, "prune_strategy", "Rank fraction")
    page.locator('.st-key-prune_rank input[type="range"]').wait_for()
    caption = page.locator('[data-testid="stCaptionContainer"]', has_text="matrices cut")
    caption.filter(has_text="rank 50%").wait_for()
    before = metric_values(page)
    thumb = page.locator('.st-key-prune_rank input[type="range"]')
    thumb.focus()
    for _ in range(4):  # 0.50 -> 0.30 in steps of 0.05
        thumb.press("ArrowLeft")
    caption.filter(has_text="rank 30%").wait_for()
    wait_idle(page)
    after = metric_values(page)
    assert_no_exception(page)
    assert after["KL (nats/position)"] != before["KL (nats/position)"]
    assert float(after["KL (nats/position)"]) > float(before["KL (nats/position)"])
    assert re.fullmatch(r"[\d.]+%", after["Top-1 agreement"])
    assert after["Compression"] != before["Compression"]
    # every figure shows the same move as the numbers: the chart's "current" star is the new cut
    legend = page.locator('[data-testid="stPlotlyChart"] .legendtext', has_text="current:")
    legend.first.wait_for()
    assert legend.evaluate_all("els => els.map(e => e.textContent.trim())") == ["current: rank 30%"]


@needs_demo
def test_a_per_matrix_override_reaches_the_numbers(page, app_url):
    goto_page(page, app_url, "Pruning")
    choose(page, "prune_strategy", "No cut (precision only)")
    before = metric_values(page)
    page.locator('[data-testid="stExpander"] summary', has_text="Per-matrix overrides").click()
    page.locator('.st-key-override_matrix input[role="combobox"]').wait_for(state="visible")
    page.wait_for_timeout(500)  # the expander's opening animation: a list opened during it closes again
    choose(page, "override_matrix", "tok_emb.weight")
    choose(page, "override_strategy", "Replace by zeros")
    page.locator(".st-key-override_add button").click()
    page.wait_for_timeout(300)
    wait_idle(page)
    page.locator('[data-testid="stCaptionContainer"]', has_text="1 override").first.wait_for()
    after = metric_values(page)
    assert before["KL (nats/position)"] == "0.0000" and float(after["KL (nats/position)"]) > 1.0
