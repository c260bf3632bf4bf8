"""Playwright for Python on the host attaches to Chromium in a `browser` sandbox through the router.

Single-port mode: the router's own address with E2b-Sandbox-Id / E2b-Sandbox-Port: 9222 (the
SDK's get_host() names the public E2B domain: never opened). The page is served from inside the
sandbox by a server started there; nothing is fetched from the internet (the guest's DNS goes
nowhere). Opt-in: tests/browser/conftest.py.
"""

from __future__ import annotations

import io
import time

import browsing
import pytest
import umlguests
from e2b import Sandbox
from PIL import Image
from playwright.sync_api import sync_playwright

pytestmark = [pytest.mark.uml, pytest.mark.root]


def test_playwright_on_the_host_reads_a_page_served_inside_the_sandbox(
    browser_service: umlguests.UmlService,
) -> None:
    key = browser_service.key("browser")
    sandbox = Sandbox.create("browser", timeout=600, api_key=key)
    try:
        url = browsing.serve_page(sandbox)
        with sync_playwright() as playwright:
            browser = browsing.attach(playwright, browser_service, sandbox)
            page = browser.contexts[0].new_page()
            page.goto(url)
            assert page.title() == "cube"
            assert page.inner_text("#greeting") == "Hello from inside the sandbox"
            png = page.screenshot()
            browser.close()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(io.BytesIO(png))
        assert image.size[0] > 100 and image.size[1] > 100
        # Rendered text: not a blank page.
        darkest, lightest = image.convert("L").getextrema()
        assert darkest < lightest
        # Playwright inside the sandbox drives the same Debian Chromium (no browser download).
        inside = sandbox.commands.run(
            "python3 -c 'from playwright.sync_api import sync_playwright\n"
            "with sync_playwright() as p:\n"
            '    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])\n'
            f'    pg = b.new_page(); pg.goto("{url}"); print(pg.inner_text("h1")); b.close()\'',
            timeout=300,
        )
        assert inside.stdout.strip() == "Hello from inside the sandbox"
    finally:
        print(browsing.guest_logs(sandbox))  # shown when the test fails
        sandbox.kill()


def test_a_cdp_client_that_disconnects_leaves_no_tabs_or_processes(
    browser_service: umlguests.UmlService,
) -> None:
    key = browser_service.key("browser")
    sandbox = Sandbox.create("browser", timeout=600, api_key=key)
    try:
        url = browsing.serve_page(sandbox)
        assert browsing.pages(sandbox) == ["about:blank"]
        before = browsing.chromium_processes(sandbox)
        with sync_playwright() as playwright:
            browser = browsing.attach(playwright, browser_service, sandbox)
            for _ in range(3):
                browser.contexts[0].new_page().goto(url)
            assert sorted(browsing.pages(sandbox)) == sorted(["about:blank", url, url, url])
            assert browsing.chromium_processes(sandbox) > before
        # The client is gone (its driver exited): the browser is back to one blank tab. Bounded
        # wait: the front resets the tabs once it sees the WebSocket close.
        deadline = time.monotonic() + 60
        blank = (["about:blank"], before)
        while (seen := (browsing.pages(sandbox), browsing.chromium_processes(sandbox))) != blank:
            assert time.monotonic() < deadline, (seen, blank)
            time.sleep(1)
    finally:
        sandbox.kill()


def test_the_template_is_listed(browser_service: umlguests.UmlService) -> None:
    response = umlguests.httpx.get(
        f"{browser_service.url}/templates", headers={"X-API-KEY": browser_service.key("lister")}
    )
    assert response.status_code == 200, response.text
    assert any(t["templateID"] == "browser" for t in response.json())
