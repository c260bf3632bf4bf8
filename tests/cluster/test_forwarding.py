"""What node A forwards to a sandbox on node B (A drained): WebSockets, relayed both ways; the
cluster's token never reaches the guest (attacked: the guest reads the headers it gets); a
WebSocket with a wrong cluster token refused; the SDKs' paginated list (`limit`, `nextToken`)
walking every node's sandboxes exactly once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import pytest
import wsproto.events as ws
from cluster_nodes import cluster_of, cube_node, wait_for, websocket_echo

from appliance.cluster.forwarding import CLUSTER_HEADERS, TOKEN_HEADER

if TYPE_CHECKING:
    from conftest import ServiceHarness


def create_on(api: httpx.Client, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    created = api.post("/sandboxes", json={"metadata": metadata or {}})
    assert created.status_code == 201, created.text
    return dict(created.json())


def test_websockets_reach_b_through_a_and_the_guest_never_sees_the_cluster_token(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str],
) -> None:
    a, b, key = two_nodes
    cube_node(a, "drain", "a")
    wait_for(a, lambda c: "a" in c.view.drained)
    with httpx.Client(base_url=a.url, headers={"X-API-KEY": key}, timeout=30, trust_env=False) as api:
        sandbox = create_on(api)
    sandbox_id = sandbox["sandboxID"]
    assert b.run_sync_in_service(lambda: b.running.cubelet.live(sandbox_id) is not None)  # type: ignore[union-attr]
    routed = {"E2b-Sandbox-Id": sandbox_id, "X-Access-Token": sandbox["envdAccessToken"]}

    echoed = websocket_echo(a.url, routed, "through a")
    assert isinstance(echoed, ws.TextMessage) and echoed.data == "through a"
    refused = websocket_echo(a.url, {**routed, "X-Access-Token": "wrong"}, "x")
    assert isinstance(refused, ws.RejectConnection) and refused.status_code == 502  # B's router's answer
    forged = websocket_echo(b.url, {**routed, TOKEN_HEADER: "x" * 64}, "x")
    assert isinstance(forged, ws.RejectConnection) and forged.status_code == 401
    # The right token in plain HTTP is refused too: node to node is the cluster listener's TLS.
    plaintext = websocket_echo(b.url, {**routed, TOKEN_HEADER: cluster_of(a).token}, "x")
    assert isinstance(plaintext, ws.RejectConnection) and plaintext.status_code == 401

    # A adds the cluster token to what it forwards; B's router drops it before the guest.
    seen = httpx.get(f"{a.url}/headers", headers=routed, trust_env=False)
    assert seen.status_code == 200, seen.text
    assert not {h.lower() for h in seen.json()} & CLUSTER_HEADERS, seen.json()
    assert cluster_of(a).token not in seen.text


def test_the_paginated_list_walks_every_nodes_sandboxes_once(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _b, key = two_nodes
    made: dict[str, str] = {}
    with httpx.Client(base_url=a.url, headers={"X-API-KEY": key}, timeout=30, trust_env=False) as api:
        for drained, undrained, count in (("b", "a", 3), ("a", "b", 4)):
            cube_node(a, "drain", drained)
            cube_node(a, "drain", undrained, "--undo")
            wait_for(a, lambda c, d=drained: c.view.drained == {d})  # type: ignore[misc]
            for i in range(count):
                sandbox_id = create_on(api, {"n": f"{undrained}{i}"})["sandboxID"]
                made[sandbox_id] = undrained
        wait_for(a, lambda c: set(made) <= set(c.view.owners))
        for order in ("desc", "asc"):
            seen: list[str] = []
            pages = 0
            token: str | None = None
            while True:
                params = {"limit": "2", "order": order, **({"nextToken": token} if token else {})}
                page = api.get("/v2/sandboxes", params=params)
                assert page.status_code == 200, page.text
                assert len(page.json()) <= 2
                seen += [s["sandboxID"] for s in page.json()]
                pages += 1
                token = page.headers.get("x-next-token")
                if not token:
                    break
                assert pages < 10, seen
            assert sorted(seen) == sorted(made), (order, seen)  # each once, from both nodes
            assert pages == 4
        bad = api.get("/v2/sandboxes", params={"nextToken": "not-a-token"})
        assert bad.json() == {"code": 400, "message": "'nextToken' is not a token this server issued"}

    # The unmodified SDK's paginator, pointed at A, with metadata filtering on every node.
    for name, value in (("E2B_API_URL", a.url), ("E2B_SANDBOX_URL", a.url), ("E2B_API_KEY", key)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    from e2b import Sandbox, SandboxQuery

    paginator = Sandbox.list(limit=3)
    listed = paginator.next_items()
    while paginator.has_next:
        listed += paginator.next_items()
    assert sorted(s.sandbox_id for s in listed) == sorted(made)
    on_b = Sandbox.list(query=SandboxQuery(metadata={"n": "b2"}), limit=1).next_items()
    assert [made[s.sandbox_id] for s in on_b] == ["b"]
