"""Playwright for Python on the host attaches to Chromium in a `browser` sandbox through the router.

Single-port mode: the router's own address with E2b-Sandbox-Id / E2b-Sandbox-Port: 9222 (the
SDK's get_host() names the public E2B domain: never opened). The page is served from inside the
sandbox by a server started there; nothing is fetched from the internet (the guest's DNS goes
nowhere). Opt-in: tests/browser/conftest.py.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import umlguests
from e2b import Sandbox
from PIL import Image
from playwright.sync_api import Browser, Playwright, sync_playwright

from appliance.templates.browser import CDP_PORT, CHROMIUM_DEBUG_PORT

pytestmark = [pytest.mark.uml, pytest.mark.root]

PAGE = (
    "<html><head><title>cube</title></head>"
    "<body><h1 id='greeting'>Hello from inside the sandbox</h1></body></html>"
)
SITE_PORT = 8000
# Chromium's processes (browser, zygotes, utility, renderers) by their executable.
COUNT_CHROMIUM = "pgrep -c -f ^/usr/lib/chromium/chromium || true"


def _serve_page(sandbox: Sandbox) -> str:
    """An HTTP server inside the sandbox (loopback only) serving PAGE; returns its URL there."""
    sandbox.files.write("/home/user/site/index.html", PAGE)
    sandbox.commands.run(
        f"python3 -m http.server {SITE_PORT} --bind 127.0.0.1 --directory /home/user/site", background=True
    )
    url = f"http://127.0.0.1:{SITE_PORT}/"
    # Bounded: the server's start is what is awaited.
    sandbox.commands.run(
        f"for i in $(seq 100); do curl -sf -o /dev/null {url} && exit 0; sleep 0.2; done; exit 1"
    )
    return url


def _attach(playwright: Playwright, service: umlguests.UmlService, sandbox: Sandbox) -> Browser:
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": str(CDP_PORT)}
    return playwright.chromium.connect_over_cdp(service.url, headers=headers, timeout=120_000)


def _pages(sandbox: Sandbox) -> list[str]:
    """The page targets' URLs, as Chromium itself lists them (inside the guest)."""
    out = sandbox.commands.run(f"curl -sf http://127.0.0.1:{CHROMIUM_DEBUG_PORT}/json/list").stdout
    return [t["url"] for t in json.loads(out) if t["type"] == "page"]


def _guest_logs(sandbox: Sandbox) -> str:
    """Chromium's log (without its D-Bus complaints: the guest runs no bus), the front's, memory."""
    script = "grep -v dbus /tmp/chromium.log | tail -40; tail -c 2000 /tmp/cdp-front.log; free -m"
    return sandbox.commands.run(script, user="root").stdout


def _chromium_processes(sandbox: Sandbox) -> int:
    return int(sandbox.commands.run(COUNT_CHROMIUM).stdout.strip() or 0)


def test_playwright_on_the_host_reads_a_page_served_inside_the_sandbox(
    browser_service: umlguests.UmlService,
) -> None:
    key = browser_service.key("browser")
    sandbox = Sandbox.create("browser", timeout=600, api_key=key)
    try:
        url = _serve_page(sandbox)
        with sync_playwright() as playwright:
            browser = _attach(playwright, browser_service, sandbox)
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
        print(_guest_logs(sandbox))  # shown when the test fails
        sandbox.kill()


def test_a_cdp_client_that_disconnects_leaves_no_tabs_or_processes(
    browser_service: umlguests.UmlService,
) -> None:
    key = browser_service.key("browser")
    sandbox = Sandbox.create("browser", timeout=600, api_key=key)
    try:
        url = _serve_page(sandbox)
        assert _pages(sandbox) == ["about:blank"]
        before = _chromium_processes(sandbox)
        with sync_playwright() as playwright:
            browser = _attach(playwright, browser_service, sandbox)
            for _ in range(3):
                browser.contexts[0].new_page().goto(url)
            assert sorted(_pages(sandbox)) == sorted(["about:blank", url, url, url])
            assert _chromium_processes(sandbox) > before
        # The client is gone (its driver exited): the browser is back to one blank tab. Bounded
        # wait: the front resets the tabs once it sees the WebSocket close.
        deadline = time.monotonic() + 60
        while (_pages(sandbox), _chromium_processes(sandbox)) != (["about:blank"], before):
            assert time.monotonic() < deadline, (_pages(sandbox), _chromium_processes(sandbox), before)
            time.sleep(1)
    finally:
        sandbox.kill()


def test_the_template_is_listed(browser_service: umlguests.UmlService) -> None:
    response = umlguests.httpx.get(
        f"{browser_service.url}/templates", headers={"X-API-KEY": browser_service.key("lister")}
    )
    assert response.status_code == 200, response.text
    assert any(t["templateID"] == "browser" for t in response.json())
