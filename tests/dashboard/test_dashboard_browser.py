"""The dashboard in headless Chromium against a `cube serve` with fake guests (no UML): keys,
template builds and their log stream, a cross-site page's attack, signing out.

Marked `slow` (a real browser): they run in the root/slow run, not the developer loop.
test_dashboard_uml.py drives a real SDK sandbox in a UML guest through the same pages.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from browser import open_browser, screenshot, sign_in
from playwright.sync_api import Browser, Page, expect

if TYPE_CHECKING:
    from conftest import ServiceHarness

pytestmark = pytest.mark.slow
ATTACKER = "http://attacker.test"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with open_browser() as started:
        yield started


@pytest.fixture
def admin_page(browser: Browser, service: ServiceHarness) -> Iterator[Page]:
    page = sign_in(browser, service.url, service.admin_token)
    yield page
    page.context.close()


def test_keys_are_created_shown_once_and_revoked(admin_page: Page, service: ServiceHarness) -> None:
    page = admin_page
    page.goto(f"{service.url}/dashboard/keys")
    page.fill("#key-name", "from-the-browser")
    page.click("#key-form button[type=submit]")
    key = page.locator("#new-key-value").inner_text(timeout=10_000)
    assert key.startswith("e2b_") or len(key) > 20
    works = httpx.get(f"{service.url}/sandboxes", headers={"X-API-KEY": key})
    assert works.status_code == 200
    row = page.locator("#keys tr", has_text="from-the-browser")
    expect(row).to_have_count(1)
    screenshot(page, "keys")
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button.revoke").click()
    expect(row.locator("td.revoked")).not_to_have_text("—", timeout=10_000)
    assert httpx.get(f"{service.url}/sandboxes", headers={"X-API-KEY": key}).status_code == 401
    page.reload()  # shown once: the key's value is nowhere on the page any more
    expect(page.locator("#keys tr", has_text="from-the-browser")).to_have_count(1)
    assert key not in page.content()


def test_without_a_session_the_browser_is_sent_to_sign_in(browser: Browser, service: ServiceHarness) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{service.url}/dashboard/sandboxes")
    assert page.url == f"{service.url}/dashboard/login"
    response = page.request.get(f"{service.url}/dashboard/api/sandboxes")
    assert response.status == 401
    screenshot(page, "sign-in")
    context.close()


def test_a_cross_site_page_cannot_act_for_the_signed_in_operator(
    admin_page: Page, service: ServiceHarness, api_key: str
) -> None:
    created = httpx.post(
        f"{service.url}/sandboxes", json={"templateID": "ci"}, headers={"X-API-KEY": api_key}
    )
    sandbox_id = created.json()["sandboxID"]
    target = f"{service.url}/dashboard/api/sandboxes/{sandbox_id}/kill"
    # The attacker's page (another origin) posts a form and a fetch at the dashboard, in the same
    # browser where the operator is signed in.
    attack = f"""<html><body>
      <form id="f" method="post" action="{target}"><input name="x" value="1"></form>
      <script>
        fetch("{target}", {{method: "POST", credentials: "include", mode: "no-cors"}})
          .finally(() => document.getElementById("f").submit());
      </script></body></html>"""
    page = admin_page
    page.route(
        f"{ATTACKER}/**", lambda route: route.fulfill(status=200, content_type="text/html", body=attack)
    )
    with page.expect_navigation(url=target):
        page.goto(f"{ATTACKER}/")
    assert json.loads(page.inner_text("body"))["code"] in (401, 403)
    alive = httpx.get(f"{service.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": api_key})
    assert alive.status_code == 200 and alive.json()["state"] == "running"


def tiny_image(root: Path) -> str:
    """An OCI layout at `root` holding one small image; its `oci:` reference."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        content = b"hello from a tiny image\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    diff_id = "sha256:" + hashlib.sha256(layer.getvalue()).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(layer.getvalue(), "application/vnd.oci.image.layer.v1.tar")],
    }
    descriptor = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    descriptor["annotations"] = {"org.opencontainers.image.ref.name": "v1"}
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [descriptor]}))
    return f"oci:{root}:v1"


def test_a_template_build_streams_its_log(admin_page: Page, service: ServiceHarness, tmp_path: Path) -> None:
    page = admin_page
    page.goto(f"{service.url}/dashboard/templates")
    page.fill("#build-image", tiny_image(tmp_path / "image"))
    page.fill("#build-alias", "tiny")
    page.click("#build-form button[type=submit]")
    page.wait_for_url(f"{service.url}/dashboard/builds/**")
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#build-phase")).to_contain_text("READY 100 %", timeout=60_000)
    screenshot(page, "build")
    job = httpx.get(
        f"{service.url}/templates/builds/{job_id}", headers={"X-API-KEY": service.admin_token}
    ).json()
    assert job["log"] and page.locator("#build-log").inner_text().splitlines() == job["log"]
    assert page.locator("#build-progress").get_attribute("value") == "100"
    page.goto(f"{service.url}/dashboard/templates")
    expect(page.locator("#templates tr", has_text="tiny")).to_have_count(1, timeout=10_000)
    expect(page.locator("#build-history tr", has_text=job_id)).to_have_count(1)
    screenshot(page, "templates")
    page.locator("#templates a", has_text=job["template_id"]).click()
    expect(page.locator("#build-history tr", has_text=job_id)).to_have_count(1, timeout=10_000)
    screenshot(page, "template")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-template")
    page.wait_for_url(f"{service.url}/dashboard/templates")
    listed = httpx.get(f"{service.url}/templates", headers={"X-API-KEY": service.admin_token}).json()
    assert all("tiny" not in t["aliases"] for t in listed)


def test_sandboxes_are_filtered_paused_resumed_and_given_time(
    admin_page: Page, service: ServiceHarness, api_key: str
) -> None:
    def create(metadata: dict[str, str]) -> str:
        body = {"templateID": "ci", "metadata": metadata, "timeout": 120}
        response = httpx.post(f"{service.url}/sandboxes", json=body, headers={"X-API-KEY": api_key})
        assert response.status_code == 201, response.text
        return str(response.json()["sandboxID"])

    web, batch = create({"role": "web"}), create({"role": "batch"})
    page = admin_page
    page.goto(f"{service.url}/dashboard/sandboxes")
    rows = page.locator("#sandboxes tbody tr")
    expect(rows).to_have_count(2, timeout=10_000)
    expect(rows.first.locator("td").nth(4)).to_contain_text("%")  # live CPU, from the guest's metrics
    page.fill("#filter-metadata", "role=web")
    page.click("#filters button[type=submit]")
    expect(rows).to_have_count(1, timeout=10_000)
    expect(rows.first).to_have_attribute("data-sandbox", web)
    page.fill("#filter-metadata", "")
    page.fill("#search", batch[:8])
    page.click("#filters button[type=submit]")
    expect(rows).to_have_count(1, timeout=10_000)
    expect(rows.first).to_have_attribute("data-sandbox", batch)

    def state() -> dict[str, object]:
        found = httpx.get(f"{service.url}/sandboxes/{web}", headers={"X-API-KEY": api_key})
        assert found.status_code == 200, found.text
        return dict(found.json())

    page.goto(f"{service.url}/dashboard/sandboxes/{web}")
    expect(page.locator("#usage")).to_contain_text("12.5 % CPU")  # what the guest's agent reports
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#action-pause")
    expect(page.locator("#state")).to_have_text("paused", timeout=10_000)
    assert state()["state"] == "paused"
    page.click("#action-resume")
    expect(page.locator("#state")).to_have_text("running", timeout=10_000)
    assert state()["state"] == "running"
    before = str(state()["endAt"])
    page.fill("#timeout-minutes", "30")
    page.click("#action-timeout")
    expect(page.locator("#details dd").nth(5)).not_to_have_text(before, timeout=10_000)
    assert str(state()["endAt"]) > before
    kills: list[str] = []
    page.on("request", lambda request: kills.append(request.url) if request.url.endswith("/kill") else None)
    page.once("dialog", lambda dialog: dialog.dismiss())  # a kill not confirmed is not asked for
    page.click("#action-kill")
    page.evaluate("() => fetch('/dashboard/api/overview')")  # a request made after the click's
    assert kills == [] and state()["state"] == "running"
