"""Debian's Chromium, driven by Playwright, for the tests of minidiff's two web pages (the caption annotator and
`minidiff serve`). Playwright never downloads a browser here: it launches /usr/bin/chromium (`make setup` installs it;
MINIDIFF_CHROMIUM names another). Call `require_chromium()` at the top of a browser test module: it skips the module
where the browser or Playwright is missing."""
import os
import shutil

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
