"""Slider move → updated metrics, measured in a real browser (Debian's Chromium) against a real `streamlit run`.

    python bench/bench_browser.py                # the demo, 12 moves of the Pruning page's rank-fraction slider
    python bench/bench_browser.py --moves 20 --checkpoint path/to/model.safetensors   # uploaded through the page

Each move is one ArrowLeft/ArrowRight key press on the focused slider thumb. Three clocks per move:
- metrics: from the key press to the end of the first frame after the new metrics entered the page (the caption
  drawn right under them names the value they were computed for), timed by the page's own clock
  (`tests.browser.key_to_change`);
  this is the number issues 5 and 11 ask for (targets: median ≤ 1 s; ≤ 0.3 s);
- driver: the same as the Python driver saw it, from before it sent the key to when it learned of the change;
- idle: until the whole fragment has finished (the compression-vs-KL chart with the moved star included).
Before the evening of 2026-12-01 the metrics clock was the driver's, with Playwright's `wait_for`, which re-checks
after 0, 20, 50, 100, 100, then every 500 ms: its figures were that grid (0.17, 0.27, 0.37 s), up to 0.1 s after
the numbers were on screen.
Printed side by side with the engine time the page reports for the same move (plan, rebuild, evaluation), so the
difference is Streamlit's and the browser's share.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ["SPECTRA_CACHE"] = "off"  # measure the work itself, not the disk cache (children inherit it)
sys.path.insert(0, str(ROOT))

from tests.browser import (  # noqa: E402
    chromium_path,
    goto_page,
    key_to_change,
    launch_chromium,
    start_page_clock,
    streamlit_server,
    wait_idle,
)

STEP = 0.05  # the rank-fraction slider's step


def _caption(page):
    return page.locator('[data-testid="stCaptionContainer"]', has_text="matrices cut")


def _label(fraction: float) -> str:
    return f"rank {100 * fraction:g}%:"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=12)
    parser.add_argument("--checkpoint", default="demo", help="demo, or a file to upload through the page")
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "bench_browser.json"))
    args = parser.parse_args()
    if chromium_path() is None:
        print("bench_browser: Debian's chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with streamlit_server(log_path=Path(args.json).with_suffix(".log")) as url, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(180_000)
        page.goto(url)
        wait_idle(page)
        if args.checkpoint != "demo":
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(args.checkpoint)
            page.wait_for_timeout(300)
            wait_idle(page)
        t0 = time.perf_counter()
        goto_page(page, url, "Pruning")
        first_visit = time.perf_counter() - t0
        page.locator(".st-key-prune_strategy").click()
        page.get_by_role("option", name="Rank fraction", exact=True).click()
        wait_idle(page)
        fraction = 0.5
        _caption(page).filter(has_text=_label(fraction)).wait_for()
        thumb = page.locator('.st-key-prune_rank input[type="range"]')
        thumb.focus()
        start_page_clock(page, '[data-testid="stCaptionContainer"]', "matrices cut")
        browser_s, driver_s, idle_s, engine_ms = [], [], [], []
        for i in range(args.moves):
            key, delta = ("ArrowLeft", -STEP) if (i // 4) % 2 == 0 else ("ArrowRight", STEP)  # 0.5 → 0.3 → 0.5 …
            fraction = round(fraction + delta, 2)
            start = time.perf_counter()
            thumb.press(key)
            browser_s.append(key_to_change(page, _label(fraction)))
            driver_s.append(time.perf_counter() - start)
            wait_idle(page)
            idle_s.append(time.perf_counter() - start)
            text = _caption(page).inner_text()
            engine_ms.append(float(text.rsplit("·", 1)[-1].split("ms")[0]))
        browser.close()
    result = {
        "checkpoint": args.checkpoint, "moves": args.moves, "first_visit_s": round(first_visit, 3),
        "median_s": round(statistics.median(browser_s), 4), "min_s": round(min(browser_s), 4),
        "max_s": round(max(browser_s), 4), "idle_median_s": round(statistics.median(idle_s), 4),
        "engine_median_s": round(statistics.median(engine_ms) / 1000, 4),
        "driver_median_s": round(statistics.median(driver_s), 4),
        "browser_s": [round(x, 4) for x in browser_s], "driver_s": [round(x, 4) for x in driver_s],
        "idle_s": [round(x, 4) for x in idle_s],
        "engine_s": [round(x / 1000, 4) for x in engine_ms],
    }
    result["overhead_median_s"] = round(result["median_s"] - result["engine_median_s"], 4)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"slider move -> updated metrics in the browser ({args.checkpoint}, {args.moves} moves): "
          f"median {result['median_s']:.3f} s (min {result['min_s']:.3f}, max {result['max_s']:.3f}; as the driver saw "
          f"it {result['driver_median_s']:.3f} s); "
          f"fragment done (chart redrawn) {result['idle_median_s']:.3f} s; "
          f"engine median {result['engine_median_s']:.3f} s, Streamlit + browser "
          f"{result['overhead_median_s']:.3f} s; first visit of the page {first_visit:.1f} s; target <= 1 s")
    return 0 if result["median_s"] <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
