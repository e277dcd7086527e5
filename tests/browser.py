"""Drive the real app in Debian's Chromium: start `streamlit run`, wait for it, and wait for reruns to finish.

Used by tests/test_browser.py and bench/bench_browser.py; not part of the app. Playwright's own browser download is
not needed: Chromium comes from the system (`apt-get install chromium`), or $SPECTRA_CHROMIUM.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
PAGES = {"Overview": "", "Spectra": "spectra", "Ranks": "ranks", "Pruning": "pruning", "Report": "report"}


def chromium_path() -> str | None:
    """Debian's chromium (or $SPECTRA_CHROMIUM); None when absent."""
    env = os.environ.get("SPECTRA_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_PIDS: dict[str, int] = {}  # base URL -> the streamlit process serving it


def server_rss_mib(url: str) -> float:
    """Resident memory of the streamlit process serving `url` (VmRSS), in MiB."""
    status = Path(f"/proc/{SERVER_PIDS[url]}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


@contextmanager
def streamlit_server(*app_args: str, port: int | None = None, timeout: float = 90.0, log_path: Path | None = None):
    """`streamlit run app.py` on 127.0.0.1:<free port>; yields the base URL; kills the process group at the end."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    if app_args:
        cmd += ["--", *app_args]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    SERVER_PIDS[url] = proc.pid
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with code {proc.returncode} (log: {log_path})")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamlit did not answer /_stcore/health within {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if log is not subprocess.DEVNULL:
            log.close()


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)


def wait_idle(page, timeout: float = 120.0) -> None:
    """Wait until the script (or fragment) run finished: stApp's data-test-script-state leaves "running"."""
    page.wait_for_selector('[data-testid="stApp"][data-test-connection-state="CONNECTED"]', timeout=timeout * 1000)
    page.wait_for_function(
        """() => { const app = document.querySelector('[data-testid="stApp"]');
                   const s = app && app.getAttribute('data-test-script-state');
                   return s === 'notRunning'; }""", timeout=timeout * 1000, polling=50)


def goto_page(page, base_url: str, name: str, timeout: float = 120.0) -> None:
    """Open a page through the sidebar navigation (same session), then wait for its run to finish."""
    link = page.locator('[data-testid="stSidebarNavLink"]', has_text=name)
    link.first.click()
    page.wait_for_url(f"{base_url}/{PAGES[name]}" if PAGES[name] else f"{base_url}/", timeout=timeout * 1000)
    page.wait_for_selector(f'h1:has-text("{name if name != "Overview" else "Spectra Explorer"}")',
                           timeout=timeout * 1000)
    wait_idle(page, timeout)


# Playwright re-checks a condition it waits for after 0, 20, 50, 100, 100, then every 500 ms (its backoff), so a
# latency taken from `wait_for` lands on that grid: 0.17, 0.27, 0.37, 0.87 s... A page clock times the change itself.
_PAGE_CLOCK = """([selector, contains]) => {
  const clock = window.__spectraClock = {keys: [], changes: []};
  let last = null;
  document.addEventListener('keydown', e => clock.keys.push(e.timeStamp), true);  // when the key reached the page
  new MutationObserver(() => {
    const el = [...document.querySelectorAll(selector)].find(e => e.textContent.includes(contains));
    const text = el ? el.textContent : null;
    if (text === null || text === last) return;
    last = text;
    const change = {text, dom: performance.now(), frame: null};
    clock.changes.push(change);
    requestAnimationFrame(() => setTimeout(() => { change.frame = performance.now(); }));  // that frame drawn
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def start_page_clock(page, selector: str, contains: str) -> None:
    """Time key presses and changes of the element matching `selector` whose text has `contains`, in the page's own
    clock (performance.now): read with `key_to_change`."""
    page.evaluate(_PAGE_CLOCK, [selector, contains])


def key_to_change(page, has_text: str, timeout: float = 120.0) -> float:
    """Seconds from the last key press (its event's timestamp: when the input reached the page, so time spent in
    the renderer's input queue counts) to the end of the first frame after the watched element's text came to
    contain `has_text` (the DOM change, the next animation frame, then the task after it, once that frame's style,
    layout and paint are done: what a user sees), by the page's clock."""
    handle = page.wait_for_function(
        """(want) => { const c = window.__spectraClock, key = c.keys[c.keys.length - 1];
                       const hit = c.changes.find(x => x.dom >= key && x.text.includes(want));
                       return hit && hit.frame !== null ? hit.frame - key : null; }""",
        arg=has_text, timeout=timeout * 1000, polling="raf")
    return handle.json_value() / 1000


def wait_charts(page, timeout: float = 60.0) -> None:
    """Wait until every plotly chart on the page has drawn its SVG (plotly.js renders after the script run)."""
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
                 .every(el => el.querySelector('.main-svg'))""", timeout=timeout * 1000, polling=100)


def screenshot(page, path: Path, width: int = 1440, max_height: int = 9000) -> None:
    """A screenshot of the whole page: the viewport is grown to the main area's height (Streamlit scrolls inside
    its own container, so Playwright's full_page alone would stop at the window)."""
    wait_charts(page)
    height = page.evaluate("""() => { const m = document.querySelector('[data-testid="stMain"]');
                                      return m ? m.scrollHeight : document.body.scrollHeight; }""")
    page.set_viewport_size({"width": width, "height": int(min(max(height, 900), max_height))})
    page.wait_for_timeout(300)  # let plotly resize to the new viewport
    wait_charts(page)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": width, "height": 900})
