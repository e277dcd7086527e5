"""Concurrent sessions (issue 17): slider latency with four browsers on one server, against one browser alone.

    python bench/bench_load.py                      # 1 session, then 4 at once, 12 moves each, on the demo
    python bench/bench_load.py --sessions 4 --moves 20

One real `streamlit run` (the demo), and each session a process of its own with its own headless Chromium. A session
opens the Pruning page, picks "Rank fraction", waits at a barrier until every session is ready, then moves the
slider one key press at a time and times each move until its own new metrics are on screen (the caption under
them names the value they were computed for). Reported side by side: p50 and p95 of every move of every session,
alone and together, and their ratio. Target (issue 17): four sessions, p95 ≤ 1.0 s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ["SPECTRA_CACHE"] = "off"  # measure the work itself, not the disk cache (children inherit it)
sys.path.insert(0, str(ROOT))

from tests.browser import (  # noqa: E402
    chromium_path,
    goto_page,
    launch_chromium,
    streamlit_server,
    wait_idle,
)

STEP = 0.05


def session(url: str, moves: int, ready: Path, go: Path, out: Path) -> None:
    """One browser session: get ready, wait for `go`, time `moves` slider moves, write the seconds to `out`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(180_000)
        page.goto(url)
        wait_idle(page)
        goto_page(page, url, "Pruning")
        page.locator('.st-key-prune_strategy input[role="combobox"]').fill("Rank fraction")
        page.get_by_role("option", name="Rank fraction", exact=True).click()
        caption = page.locator('[data-testid="stCaptionContainer"]', has_text="matrices cut")
        fraction = 0.5
        caption.filter(has_text=f"rank {100 * fraction:g}%:").wait_for()
        wait_idle(page)
        thumb = page.locator('.st-key-prune_rank input[type="range"]')
        thumb.focus()
        ready.touch()
        while not go.exists():
            time.sleep(0.02)
        seconds, engine = [], []
        for i in range(moves):
            key, delta = ("ArrowLeft", -STEP) if (i // 4) % 2 == 0 else ("ArrowRight", STEP)
            fraction = round(fraction + delta, 2)
            start = time.perf_counter()
            thumb.press(key)
            caption.filter(has_text=f"rank {100 * fraction:g}%:").wait_for()
            seconds.append(time.perf_counter() - start)
            engine.append(float(caption.inner_text().rsplit("·", 1)[-1].split("ms")[0]) / 1000)
            wait_idle(page)
        browser.close()
    out.write_text(json.dumps({"seconds": seconds, "engine": engine}))


def run(url: str, n: int, moves: int, tmp: Path) -> tuple[list[float], list[float]]:
    """`n` sessions at once: every move's seconds to its metrics, and the engine's part of it, all sessions."""
    tag = f"{n}-{time.monotonic_ns()}"
    go = tmp / f"go-{tag}"
    procs, outs, readies = [], [], []
    for i in range(n):
        ready, out = tmp / f"ready-{tag}-{i}", tmp / f"out-{tag}-{i}.json"
        readies.append(ready)
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, __file__, "--session", url, "--moves", str(moves),
                                       "--ready", str(ready), "--go", str(go), "--out", str(out)]))
    while not all(r.exists() for r in readies):
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError("a session failed before it was ready")
        time.sleep(0.1)
    go.touch()
    for p in procs:
        if p.wait(timeout=900) != 0:
            raise RuntimeError("a session failed")
    found = [json.loads(out.read_text()) for out in outs]
    return [s for f in found for s in f["seconds"]], [s for f in found for s in f["engine"]]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--moves", type=int, default=12)
    parser.add_argument("--session", help=argparse.SUPPRESS)
    parser.add_argument("--ready", help=argparse.SUPPRESS)
    parser.add_argument("--go", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.session:
        session(args.session, args.moves, Path(args.ready), Path(args.go), Path(args.out))
        return 0
    if chromium_path() is None:
        print("bench_load: Debian's chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, streamlit_server() as url:
        alone = run(url, 1, args.moves, Path(tmp))
        together = run(url, args.sessions, args.moves, Path(tmp))
    print(f"machine: {len(os.sched_getaffinity(0))} cores; demo, rank-fraction slider, {args.moves} moves per session")
    print("(the browsers run on the server's own cores here; the engine column is the server's time for the move: "
          "plan, rebuild, evaluation, waiting for the forward lock included)")
    print(f"{'':28} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'engine p50':>11} {'engine p95':>11}")
    for label, (values, engine) in (("1 session", alone), (f"{args.sessions} sessions at once", together)):
        print(f"{label:28} {pct(values, 50):7.3f} {pct(values, 95):7.3f} {max(values):7.3f} "
              f"{pct(engine, 50):11.3f} {pct(engine, 95):11.3f}")
    alone, together = alone[0], together[0]
    ratio = pct(together, 95) / pct(alone, 95)
    print(f"p95 {args.sessions} sessions / 1 session = {ratio:.2f}x; target p95 <= 1.0 s: "
          f"{'met' if pct(together, 95) <= 1.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
