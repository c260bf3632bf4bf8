"""The dashboard of one node shows the whole cluster: two `run_service` nodes (FakeRuntime guests)
over a real etcd member, a sandbox on each; a session at node A sees both on the overview and the
events page, each naming its node, and B's sandbox's page, log and buttons reach B. Another team
sees none of it; the node-to-node door the pages use is attacked."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest
from browser import open_browser, screenshot, sign_in
from cluster_nodes import as_node, cube_node, wait_for
from dashboard_session import signed_in
from playwright.sync_api import expect

from appliance.cluster.forwarding import NAME_HEADER, TEAM_HEADER, TOKEN_HEADER

if TYPE_CHECKING:
    from conftest import ServiceHarness


def create_on(node_id: str, a: ServiceHarness, key: str) -> str:
    """A sandbox created through A's API on `node_id` (the other node drained meanwhile)."""
    other = "b" if node_id == "a" else "a"
    cube_node(a, "drain", other)
    wait_for(a, lambda c: c.view.drained == {other})
    created = httpx.post(
        f"{a.url}/sandboxes", json={"templateID": "ci"}, headers={"X-API-KEY": key}, timeout=30
    )
    assert created.status_code == 201, created.text
    cube_node(a, "drain", other, "--undo")
    wait_for(a, lambda c: not c.view.drained)
    return str(created.json()["sandboxID"])


def live_on(node: ServiceHarness, sandbox_id: str) -> bool:
    return bool(node.run_sync_in_service(lambda: node.running.cubelet.live(sandbox_id) is not None))  # type: ignore[union-attr]


def test_the_dashboard_pages_show_every_node(two_nodes: tuple[ServiceHarness, ServiceHarness, str]) -> None:
    a, b, key = two_nodes
    on_a, on_b = create_on("a", a, key), create_on("b", a, key)
    assert live_on(a, on_a) and live_on(b, on_b)
    with signed_in(a.url, key) as dashboard:
        overview = dashboard.get("/dashboard/api/overview").json()
        assert overview["sandboxes"]["running"] == 2 and overview["nodeID"] == "a"
        assert [(n["nodeID"], n["sandboxes"]["running"]) for n in overview["perNode"]] == [("a", 1), ("b", 1)]
        assert all(n["host"]["memoryBudgetMB"] == 4096 for n in overview["perNode"])

        events = dashboard.get("/dashboard/api/events?limit=500").json()
        nodes_of = {(e["sandboxID"], e["nodeID"]) for e in events}
        assert {(on_a, "a"), (on_b, "b")} <= nodes_of and len({s for s, _ in nodes_of}) == len(nodes_of)
        assert [e["at"] for e in events] == sorted((e["at"] for e in events), reverse=True)
        assert len(dashboard.get("/dashboard/api/events?limit=1").json()) == 1

        # B's sandbox's page, from B: its record, network and events, naming B.
        page = dashboard.get(f"/dashboard/api/sandboxes/{on_b}")
        assert page.status_code == 200, page.text
        shown = page.json()
        assert (shown["sandboxID"], shown["nodeID"], shown["state"]) == (on_b, "b", "running")
        assert shown["events"] and "network" in shown and "consoleLog" not in shown
        only_b = dashboard.get(f"/dashboard/api/events?sandbox={on_b}").json()
        assert only_b and {(e["sandboxID"], e["nodeID"]) for e in only_b} == {(on_b, "b")}
        assert dashboard.get(f"/dashboard/api/sandboxes/{on_b}/logs?limit=10").status_code == 200
        assert dashboard.get(f"/dashboard/api/sandboxes/{on_a}").json()["nodeID"] == "a"

        # Its buttons act on B.
        csrf = {"X-CSRF-Token": dashboard.csrf}  # type: ignore[attr-defined]
        timeout = dashboard.post(
            f"/dashboard/api/sandboxes/{on_b}/timeout", json={"timeout": 900}, headers=csrf
        )
        assert timeout.status_code == 204, timeout.text
        killed = dashboard.post(f"/dashboard/api/sandboxes/{on_b}/kill", headers=csrf)
        assert killed.status_code == 204, killed.text
        assert not live_on(b, on_b) and live_on(a, on_a)
        ended = dashboard.get(f"/dashboard/api/sandboxes/{on_b}").json()  # an ended sandbox's page, from B
        assert (ended["nodeID"], ended["state"]) == ("b", "dead"), ended

    # Another team sees none of it, on any page.
    other = httpx.post(
        f"{a.url}/cube/keys", json={"name": "other"}, headers={"X-API-KEY": a.admin_token}, timeout=30
    ).json()["key"]
    with signed_in(a.url, other) as theirs:
        assert theirs.get("/dashboard/api/overview").json()["sandboxes"]["running"] == 0
        assert theirs.get(f"/dashboard/api/sandboxes/{on_b}").status_code == 404
        assert theirs.get(f"/dashboard/api/events?sandbox={on_b}").status_code == 404
        assert not [e for e in theirs.get("/dashboard/api/events").json() if e["sandboxID"] in (on_a, on_b)]
        csrf = {"X-CSRF-Token": theirs.csrf}  # type: ignore[attr-defined]
        assert theirs.post(f"/dashboard/api/sandboxes/{on_a}/kill", headers=csrf).status_code == 404
    assert live_on(a, on_a)


def test_the_node_to_node_door_of_the_dashboard_opens_to_the_cluster_token_for_reads_only(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str],
) -> None:
    """Another node asks B's pages for a caller with the cluster token; nothing else gets in."""
    a, b, key = two_nodes
    on_b = create_on("b", a, key)
    listed = httpx.get(f"{b.url}/cube/keys", headers={"X-API-KEY": b.admin_token}, timeout=30).json()
    (team,) = {k["team"] for k in listed if k["name"] == "t"}  # the key of two_nodes
    token = b.run_sync_in_service(lambda: b.running.cluster.token)  # type: ignore[union-attr]
    with as_node(a, b, team) as from_a:  # A's certificate at B's cluster listener, with the token
        from_a.headers[NAME_HEADER] = "t"
        # With the token: B's own figures only (never asked of the other nodes again).
        mine = from_a.get("/dashboard/api/overview", timeout=30)
        assert mine.status_code == 200 and mine.json()["nodeID"] == "b" and "perNode" not in mine.json()
        assert from_a.get(f"/dashboard/api/sandboxes/{on_b}", timeout=30).json()["nodeID"] == "b"
        # A wrong token: no way in.
        wrong = {TOKEN_HEADER: "x" * 64}
        assert from_a.get("/dashboard/api/overview", headers=wrong, timeout=30).status_code == 401
        # The token opens the three reads only: no key list, no page, no action.
        assert from_a.get("/dashboard/api/keys", timeout=30).status_code == 401
        assert from_a.get("/dashboard/api/sandboxes", timeout=30).status_code == 401
        assert from_a.get("/dashboard/", follow_redirects=False, timeout=30).status_code == 303
        killed = from_a.post(f"/dashboard/api/sandboxes/{on_b}/kill", timeout=30)
        assert killed.status_code == 401, killed.text
    as_node_headers = {TOKEN_HEADER: token, TEAM_HEADER: team, NAME_HEADER: "t"}
    with httpx.Client(base_url=b.url, trust_env=False, timeout=30) as client:
        # On the public port the token itself is refused, and a forged team alone gets nothing.
        for headers in (as_node_headers, {TEAM_HEADER: team}):
            refused = client.get("/dashboard/api/overview", headers=headers)
            assert refused.status_code == 401, refused.text
            assert client.get(f"/dashboard/api/sandboxes/{on_b}", headers=headers).status_code == 401
    assert live_on(b, on_b)


@pytest.mark.slow
def test_the_cluster_pages_in_a_browser(two_nodes: tuple[ServiceHarness, ServiceHarness, str]) -> None:
    """The same pages in headless Chromium at A: each node in the overview's table, the events page
    naming B, B's sandbox's page naming B, and its kill button ending it on B."""
    a, b, key = two_nodes
    on_b = create_on("b", a, key)
    with open_browser() as browser:
        page = sign_in(browser, a.url, key)
        expect(page.locator("#per-node tr[data-node=b] td").nth(1)).to_have_text("1", timeout=10_000)
        expect(page.locator("#per-node tr[data-node=a] td").nth(1)).to_have_text("0")
        expect(page.locator("#running-count")).to_have_text("1")
        screenshot(page, "cluster-overview")
        page.goto(f"{a.url}/dashboard/events")
        expect(page.locator("#event-list tr[data-node=b]", has_text=on_b).first).to_be_visible(timeout=10_000)
        page.goto(f"{a.url}/dashboard/sandboxes/{on_b}")
        expect(page.locator("#node")).to_have_text("b", timeout=10_000)
        page.on("dialog", lambda dialog: dialog.accept())
        page.locator("#action-kill").click()
        expect(page.locator("#state")).not_to_have_text("running", timeout=10_000)
        page.context.close()
    assert not live_on(b, on_b)
