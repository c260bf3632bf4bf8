"""Playwright for Python on the host attaches to Chromium in a `browser` sandbox through the router.

Single-port mode: the router's own address with E2b-Sandbox-Id / E2b-Sandbox-Port: 9222 (the
SDK's get_host() names the public E2B domain: never opened). The page is served from inside the
sandbox by a server started there; nothing is fetched from the internet (the guest's DNS goes
nowhere). Opt-in: tests/browser/conftest.py.
"""

from __future__ import annotations

import io
import json
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import browsing
import httpx
import pytest
import umlguests
import wsproto
import wsproto.events
from e2b import Sandbox
from PIL import Image
from playwright.sync_api import sync_playwright

from appliance.proxy.tls import ca_cert_path
from appliance.templates.browser import CDP_PORT

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


def test_cdp_over_tls_through_host_routing(browser_service: umlguests.UmlService) -> None:
    """`9222-<id>.<domain>` on the TLS port (SNI and Host; the appliance's CA): /json/version names a
    `wss://` URL on that host, and a DevTools WebSocket opened there over TLS answers CDP."""
    sandbox = Sandbox.create("browser", timeout=600, api_key=browser_service.key("browser"))
    try:
        config = browser_service.config
        hostname = f"{CDP_PORT}-{sandbox.sandbox_id}.{config.domain}"
        context = ssl.create_default_context(cafile=str(ca_cert_path(config.state_dir)))
        port = int(browser_service.harness.tls_url.rsplit(":", 1)[1])
        with httpx.Client(verify=context) as client:
            version = client.get(
                f"https://127.0.0.1:{port}/json/version",
                headers={"Host": hostname},
                extensions={"sni_hostname": hostname},
                timeout=60,
            )
        assert version.status_code == 200, version.text
        url = urlsplit(version.json()["webSocketDebuggerUrl"])
        assert (url.scheme, url.netloc) == ("wss", hostname) and url.path.startswith("/devtools/browser/")
        answer = _cdp_call_over_tls(("127.0.0.1", port), hostname, url.path, context, "Browser.getVersion")
        assert answer["id"] == 1 and "Chrome/" in answer["result"]["product"]
    finally:
        sandbox.kill()


def _cdp_call_over_tls(
    address: tuple[str, int], hostname: str, path: str, context: ssl.SSLContext, method: str
) -> dict[str, Any]:
    """One CDP command on a DevTools WebSocket at wss://hostname/path, reached at `address`."""
    connection = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    with (
        socket.create_connection(address, timeout=60) as raw,
        context.wrap_socket(raw, server_hostname=hostname) as sock,
    ):
        sock.sendall(connection.send(wsproto.events.Request(host=hostname, target=path)))
        text = ""
        while True:
            received = sock.recv(65536)
            assert received, "the DevTools WebSocket closed"
            connection.receive_data(received)
            for event in connection.events():
                assert not isinstance(event, wsproto.events.RejectConnection), event
                if isinstance(event, wsproto.events.AcceptConnection):
                    command = json.dumps({"id": 1, "method": method})
                    sock.sendall(connection.send(wsproto.events.TextMessage(command)))
                if isinstance(event, wsproto.events.TextMessage):
                    text += event.data
                    if event.message_finished:
                        return dict(json.loads(text))
