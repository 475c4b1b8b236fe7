"""Debian's Chromium, driven by Playwright, for the tests of minidiff's two web pages (the caption annotator and
`minidiff serve`). Playwright never downloads a browser here: it launches /usr/bin/chromium (`make setup` installs it;
MINIDIFF_CHROMIUM names another). Call `require_chromium()` at the top of a browser test module: it skips the module
where the browser or Playwright is missing."""
import os
import shutil
from contextlib import contextmanager

import pytest

# flags for a quiet, offline headless browser: no sandbox (tests run as root), no background requests of its own
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_chromium():
    """-> (playwright.sync_api, the Chromium executable); skips the calling test module when either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[test]')")
    chromium = os.environ.get("MINIDIFF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip(f"no Chromium at {chromium}: `make setup` installs Debian's chromium (needs apt-get and root)",
                    allow_module_level=True)
    return sync_api, chromium


@contextmanager
def chromium_page(sync_api, chromium: str, viewport: dict, timeout_ms: int):
    """A new page of a headless Chromium (skips the test where the browser is installed but cannot start); the
    browser is closed and Playwright stopped afterwards."""
    pw = sync_api.sync_playwright().start()
    try:
        try:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=ARGS, timeout=60_000)
        except Exception as e:                        # installed but unusable (no shared libs, ...): say so
            pytest.skip(f"Chromium at {chromium} does not start: {e}")
        page = browser.new_page(viewport=viewport)
        page.set_default_timeout(timeout_ms)
        yield page
        browser.close()
    finally:
        pw.stop()
