"""What a page cannot do to anything outside its sandbox's browser: exhaust memory (the tab dies,
the sandbox, another sandbox, the service and the CDP front live on), reach an address its
sandbox's egress policy does not allow (Chromium is a process like any other in the guest).

The egress world: one network namespace of the test's with an HTTP server on two addresses,
reached only by the service's sandbox network (umlguests.routed_world). Opt-in: conftest.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import browsing
import httpx
import pytest
import umlguests
from e2b import Sandbox
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

from appliance.net import netns

pytestmark = [pytest.mark.uml, pytest.mark.root]

# A page whose script keeps everything it allocates: V8's heap limit or the guest kernel's OOM
# killer ends its renderer (whichever comes first; Chromium makes renderers the OOM killer's
# first choice).
HOG = (
    "<html><head><title>hog</title></head><body><script>"
    "const kept = []; for (;;) { kept.push(new Array(1 << 20).fill(Math.random())); }"
    "</script></body></html>"
)
CRASH_WAIT_MS = 600_000  # bounded: filling 1 GiB under UML on a busy host takes a while


def test_a_page_that_exhausts_memory_kills_only_its_tab(browser_service: umlguests.UmlService) -> None:
    key = browser_service.key("browser")
    other = Sandbox.create("browser", timeout=900, api_key=key)
    sandbox = Sandbox.create("browser", timeout=900, api_key=key)
    try:
        url = browsing.serve_page(sandbox)
        sandbox.files.write("/home/user/site/hog.html", HOG)
        with sync_playwright() as playwright:
            browser = browsing.attach(playwright, browser_service, sandbox)
            hog = browser.contexts[0].new_page()
            with hog.expect_event("crash", timeout=CRASH_WAIT_MS):
                hog.goto(f"{url}hog.html", wait_until="commit")
        # The sandbox, the other sandbox and the service are unharmed.
        assert sandbox.commands.run("echo alive").stdout.strip() == "alive"
        assert other.commands.run("echo alive").stdout.strip() == "alive"
        assert httpx.get(f"{browser_service.url}/health", timeout=30).status_code == 200
        # A new client gets a new page from the same sandbox's CDP front.
        with sync_playwright() as playwright:
            browser = browsing.attach(playwright, browser_service, sandbox)
            page = browser.contexts[0].new_page()
            page.goto(url)
            assert page.inner_text("#greeting") == "Hello from inside the sandbox"
            browser.close()
    finally:
        print(browsing.guest_logs(sandbox))  # shown when the test fails
        sandbox.kill()
        other.kill()


ALLOWED_IP = "203.0.113.30"
DENIED_IP = "203.0.113.31"
TABLE = 26918  # policy routing of the uml_service network (its users hold the shared lock)
LINK_NET = "198.51.100.8"  # a /30 for the veth to the world


@dataclass
class World:
    netns: str
    seen: list[str] = field(default_factory=list)  # the address each request arrived at


def _server(world: World) -> ThreadingHTTPServer:
    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            address = self.connection.getsockname()[0]
            world.seen.append(address)
            body = f"<html><head><title>{address}</title></head><body>reached</body></html>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with netns.entered(netns.netns_path(world.netns)):
        return ThreadingHTTPServer(("0.0.0.0", 80), Answer)


@pytest.fixture
def world() -> Iterator[World]:
    name = f"cubetest-brw-{os.getpid() % 0x10000:04x}"
    with umlguests.routed_world(name, (ALLOWED_IP, DENIED_IP), TABLE, LINK_NET):
        world = World(name)
        server = _server(world)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield world
        finally:
            server.shutdown()
            server.server_close()
            thread.join()


BLOCKED_WAIT_MS = 20_000  # how long the blocked load is given to (not) arrive


def test_the_browser_obeys_its_sandbox_egress_allow_list(
    world: World, browser_service: umlguests.UmlService
) -> None:
    key = browser_service.key("browser")
    sandbox = Sandbox.create(
        "browser",
        timeout=600,
        api_key=key,
        allow_internet_access=False,
        network={"allow_out": [f"{ALLOWED_IP}/32"]},
    )
    try:
        with sync_playwright() as playwright:
            browser = browsing.attach(playwright, browser_service, sandbox)
            page = browser.contexts[0].new_page()
            page.goto(f"http://{ALLOWED_IP}/", timeout=120_000)
            assert page.title() == ALLOWED_IP
            with pytest.raises(PlaywrightError):
                page.goto(f"http://{DENIED_IP}/", timeout=BLOCKED_WAIT_MS)
            assert page.title() != DENIED_IP
            browser.close()
        # The allow-list holds for every process, the browser's and a command's alike.
        curl = sandbox.commands.run(f"curl -s -m 10 -o /dev/null http://{DENIED_IP}/ || echo blocked")
        assert curl.stdout.strip() == "blocked"
        assert DENIED_IP not in world.seen and ALLOWED_IP in world.seen
    finally:
        print(browsing.guest_logs(sandbox))  # shown when the test fails
        sandbox.kill()
