"""Headless Chromium (Debian's `chromium`, never a downloaded browser) driven by Playwright, for
the dashboard's browser tests and its screenshots (docs/dashboard/*.png).

- `open_browser()`: a started Chromium; fails (never skips) when /usr/bin/chromium is missing.
- `sign_in(browser, url, credential)`: a new page signed in to the dashboard at `url`.
- `screenshot(page, name)`: the page into $CUBE_DASHBOARD_SCREENSHOTS/<name>.png when that is set
  (`CUBE_DASHBOARD_SCREENSHOTS=docs/dashboard pytest -m "uml or slow" tests/dashboard` refreshes
  the README's pictures); nothing otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = "CUBE_DASHBOARD_SCREENSHOTS"


@contextmanager
def open_browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("the dashboard's browser tests need Debian's chromium (installer/install.sh --dev)")
    with sync_playwright() as playwright:
        # Chromium's own sandbox needs user namespaces it may not get as root in CI; the pages
        # it loads here are our own.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), chromium_sandbox=False)
        try:
            yield browser
        finally:
            browser.close()


def sign_in(browser: Browser, url: str, credential: str) -> Page:
    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.goto(f"{url}/dashboard/")
    assert page.url == f"{url}/dashboard/login"  # no session yet: sent to sign in
    page.fill("#credential", credential)
    page.click("#sign-in")
    page.wait_for_url(f"{url}/dashboard/")
    return page


def screenshot(page: Page, name: str) -> None:
    directory = os.environ.get(SCREENSHOTS)
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(directory) / f"{name}.png"), full_page=True)
