"""What the `browser` sandbox tests share: a page served inside the sandbox, Playwright on the host
attached over CDP through the router (single-port mode: E2b-Sandbox-Id / E2b-Sandbox-Port headers),
what Chromium lists and logs inside the guest."""

from __future__ import annotations

import json

import umlguests
from e2b import Sandbox
from playwright.sync_api import Browser, Playwright

from appliance.templates.browser import CDP_PORT, CHROMIUM_DEBUG_PORT

PAGE = (
    "<html><head><title>cube</title></head>"
    "<body><h1 id='greeting'>Hello from inside the sandbox</h1></body></html>"
)
SITE_PORT = 8000
# Chromium's processes (browser, zygotes, utility, renderers) by their executable.
COUNT_CHROMIUM = "pgrep -c -f ^/usr/lib/chromium/chromium || true"


def serve_page(sandbox: Sandbox, page: str = PAGE) -> str:
    """An HTTP server inside the sandbox (loopback only) serving `page` as index.html (other files
    may be written beside it, in /home/user/site); returns its URL there."""
    sandbox.files.write("/home/user/site/index.html", page)
    sandbox.commands.run(
        f"python3 -m http.server {SITE_PORT} --bind 127.0.0.1 --directory /home/user/site", background=True
    )
    url = f"http://127.0.0.1:{SITE_PORT}/"
    # Bounded: the server's start is what is awaited.
    sandbox.commands.run(
        f"for i in $(seq 100); do curl -sf -o /dev/null {url} && exit 0; sleep 0.2; done; exit 1"
    )
    return url


def attach(playwright: Playwright, service: umlguests.UmlService, sandbox: Sandbox) -> Browser:
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": str(CDP_PORT)}
    return playwright.chromium.connect_over_cdp(service.url, headers=headers, timeout=120_000)


def pages(sandbox: Sandbox) -> list[str]:
    """The page targets' URLs, as Chromium itself lists them (inside the guest)."""
    out = sandbox.commands.run(f"curl -sf http://127.0.0.1:{CHROMIUM_DEBUG_PORT}/json/list").stdout
    return [t["url"] for t in json.loads(out) if t["type"] == "page"]


def guest_logs(sandbox: Sandbox) -> str:
    """Chromium's log (without its D-Bus complaints: the guest runs no bus), the front's, memory."""
    script = "grep -v dbus /tmp/chromium.log | tail -40; tail -c 2000 /tmp/cdp-front.log; free -m"
    return sandbox.commands.run(script, user="root").stdout


def chromium_processes(sandbox: Sandbox) -> int:
    return int(sandbox.commands.run(COUNT_CHROMIUM).stdout.strip() or 0)
