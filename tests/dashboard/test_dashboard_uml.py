"""A sandbox the real E2B SDK made, in a real UML guest, seen and killed in headless Chromium;
and what its owner wrote in its metadata shown as text, never run as the dashboard's script.

One service, one sandbox, one browser: the lean part of the dashboard's tests that boots a guest.
"""

from __future__ import annotations

from typing import Any

import pytest
import umlguests
from browser import open_browser, screenshot, sign_in
from e2b import Sandbox
from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.uml, pytest.mark.root]
# Markup and script in the metadata: any of it that ran would set window.__xss.
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>"><svg onload="window.__xss=3">'


def assert_nothing_ran(page: Page) -> None:
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.locator("#content img, #content script, #content svg:not(#latency-chart)").count() == 0


def test_an_sdk_sandbox_is_seen_and_killed_in_the_dashboard(
    start_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with umlguests.uml_service(start_service, monkeypatch) as service, open_browser() as browser:
        key = service.key("dashboard")
        sandbox = Sandbox.create(api_key=key, metadata={"owner": XSS, "purpose": "demo"}, timeout=300)
        try:
            page = sign_in(browser, service.url, service.harness.admin_token)
            expect(page.locator("#running-count")).to_have_text("1", timeout=10_000)
            expect(page.locator("#latency-chart")).to_be_visible()
            screenshot(page, "overview")

            page.goto(f"{service.url}/dashboard/sandboxes")
            row = page.locator(f'tr[data-sandbox="{sandbox.sandbox_id}"]')
            expect(row).to_have_count(1, timeout=10_000)
            expect(row.locator("td.metadata")).to_have_text(f"owner={XSS}, purpose=demo")
            expect(row.locator("td.state")).to_have_text("running")
            assert_nothing_ran(page)
            screenshot(page, "sandboxes")

            row.locator("a").click()
            page.wait_for_url(f"{service.url}/dashboard/sandboxes/{sandbox.sandbox_id}")
            expect(page.locator("#metadata")).to_have_text(f"owner={XSS}, purpose=demo")
            expect(page.locator("#network")).to_contain_text("internet allowed")
            expect(page.locator("#usage")).to_contain_text("MiB used")  # live, from the guest's agent
            expect(page.locator("#logs pre")).not_to_be_empty(timeout=10_000)  # the guest's console
            assert_nothing_ran(page)
            screenshot(page, "sandbox")

            page.once("dialog", lambda dialog: dialog.accept())
            page.click("#action-kill")
            expect(page.locator("#state")).to_contain_text("dead", timeout=30_000)
            assert not sandbox.is_running()
            expect(page.locator("#events li", has_text="killed by request")).to_have_count(1)

            page.goto(f"{service.url}/dashboard/events")
            expect(page.locator("#event-list tr", has_text=sandbox.sandbox_id).first).to_be_visible(
                timeout=10_000
            )
            assert_nothing_ran(page)
            screenshot(page, "events")
        finally:
            if sandbox.is_running():
                sandbox.kill()
