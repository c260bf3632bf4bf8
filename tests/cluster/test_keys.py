"""API keys across the cluster (appliance/cluster/keys.py): a key made at any node works at every
node; one revoked at any node stops working at every node; etcd holds only hashes; a team never
reaches another team's sandboxes or templates at any node; a record forged into etcd makes no
admin; a node's own keys join the cluster at its start and a revoked one does not come back."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from cluster_nodes import (
    as_node,
    make_template,
    new_key,
    node_config,
    publish_templates,
    wait_for,
)

from appliance.master.store import SqliteStore

if TYPE_CHECKING:
    from conftest import EtcdCluster, ServiceHarness

PROPAGATION_S = 30.0  # a watch event reaching the other node on a loaded host


def status(node: ServiceHarness, key: str, path: str = "/sandboxes", method: str = "GET") -> int:
    return httpx.request(method, node.url + path, headers={"X-API-KEY": key}, trust_env=False).status_code


def etcd_keys(etcd: EtcdCluster) -> dict[str, Any]:
    """Every `/cube/keys/` record as etcd has it: {etcd key: its JSON value}, raw bytes checked."""
    answer = httpx.post(
        f"{etcd.endpoints[0]}/v3/kv/range",
        json={
            "key": base64.b64encode(b"/cube/keys/").decode(),
            "range_end": base64.b64encode(b"/cube/keys0").decode(),
        },
        trust_env=False,
    )
    found = {}
    for kv in answer.json().get("kvs", []):
        found[base64.b64decode(kv["key"]).decode()] = json.loads(base64.b64decode(kv["value"]))
    return found


def etcd_put(etcd: EtcdCluster, key: str, value: bytes) -> None:
    answer = httpx.post(
        f"{etcd.endpoints[0]}/v3/kv/put",
        json={"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()},
        trust_env=False,
    )
    assert answer.status_code == 200, answer.text


def until_status(node: ServiceHarness, key: str, expected: int) -> None:
    """Bounded wait for a change made at another node to reach `node` (what is under test)."""
    deadline = time.monotonic() + PROPAGATION_S
    while (answered := status(node, key)) != expected:
        assert time.monotonic() < deadline, f"{node.config.node_id} still answers {answered}"
        time.sleep(0.05)


def test_a_key_made_at_either_node_works_at_both_and_a_revoked_one_at_neither(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str], etcd_of: EtcdCluster
) -> None:
    a, b, key_of_a = two_nodes
    made_at_b = new_key(b, "made at b")
    for node in (a, b):
        assert status(node, key_of_a) == 200
        until_status(node, made_at_b["key"], 200)
    # etcd has each key's SHA-256 and never a key itself.
    stored = etcd_keys(etcd_of)
    assert f"/cube/keys/{hashlib.sha256(key_of_a.encode()).hexdigest()}" in stored
    assert f"/cube/keys/{hashlib.sha256(made_at_b['key'].encode()).hexdigest()}" in stored
    raw = json.dumps(stored)
    assert key_of_a not in raw and made_at_b["key"] not in raw
    # Every node's admin lists every key; a key made at A can share its team at B.
    listed_at_b = httpx.get(
        f"{b.url}/cube/keys", headers={"X-API-KEY": b.admin_token}, trust_env=False
    ).json()
    team_of_a = next(k["team"] for k in listed_at_b if k["name"] == "t")
    same_team = httpx.post(
        f"{b.url}/cube/keys",
        json={"name": "second", "team": team_of_a},
        headers={"X-API-KEY": b.admin_token},
        trust_env=False,
    )
    assert same_team.status_code == 201 and same_team.json()["team"] == team_of_a, same_team.text

    # Revoked at B: refused at B at once, and at A as soon as the change reaches it.
    key_id = next(k["id"] for k in listed_at_b if k["name"] == "t")
    revoked = httpx.delete(
        f"{b.url}/cube/keys/{key_id}", headers={"X-API-KEY": b.admin_token}, trust_env=False
    )
    assert revoked.status_code == 204, revoked.text
    assert status(b, key_of_a) == 401
    until_status(a, key_of_a, 401)
    again = httpx.delete(f"{a.url}/cube/keys/{key_id}", headers={"X-API-KEY": a.admin_token}, trust_env=False)
    assert again.status_code == 404  # no active key with that id, at either node
    listed_at_a = httpx.get(
        f"{a.url}/cube/keys", headers={"X-API-KEY": a.admin_token}, trust_env=False
    ).json()
    assert next(k for k in listed_at_a if k["id"] == key_id)["revokedAt"] is not None
    # The team's other key is not touched.
    assert status(a, same_team.json()["key"]) == 200


def test_a_team_reaches_no_other_teams_sandbox_or_template_at_any_node(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str],
) -> None:
    a, b, key_of_a = two_nodes
    intruder = new_key(b, "intruder")["key"]
    until_status(a, intruder, 200)
    created = httpx.post(f"{b.url}/sandboxes", json={}, headers={"X-API-KEY": key_of_a}, trust_env=False)
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["sandboxID"]
    wait_for(a, lambda c: sandbox_id in c.view.owners)
    for node in (a, b):
        assert status(node, key_of_a, f"/sandboxes/{sandbox_id}") == 200
        for method, path in (
            ("GET", f"/sandboxes/{sandbox_id}"),
            ("GET", f"/sandboxes/{sandbox_id}/metrics"),
            ("GET", f"/sandboxes/{sandbox_id}/logs"),
            ("POST", f"/sandboxes/{sandbox_id}/pause"),
            ("DELETE", f"/sandboxes/{sandbox_id}"),
        ):
            assert status(node, intruder, path, method) == 404, (node.config.node_id, method, path)
        for path in ("/sandboxes", "/v2/sandboxes"):
            listed = httpx.get(node.url + path, headers={"X-API-KEY": intruder}, trust_env=False)
            assert listed.status_code == 200 and listed.json() == [], listed.text
        # An admin's route is no team's.
        assert status(node, intruder, "/cube/keys") == 403
    assert status(a, key_of_a, f"/sandboxes/{sandbox_id}") == 200  # still there: nothing was killed

    # A template of A's team on A: the intruder neither sees it nor creates from it, at either node.
    team_of_a = next(
        k["team"]
        for k in httpx.get(f"{a.url}/cube/keys", headers={"X-API-KEY": a.admin_token}, trust_env=False).json()
        if k["name"] == "t"
    )
    make_template(a, "tpl-team-a", "team-a-alias", team_of_a)
    publish_templates(a)
    assert status(a, key_of_a, "/templates/tpl-team-a") == 200
    for node in (a, b):
        assert status(node, intruder, "/templates/tpl-team-a") == 404
        listed = httpx.get(f"{node.url}/templates", headers={"X-API-KEY": intruder}, trust_env=False).json()
        assert "tpl-team-a" not in json.dumps(listed)
        for name in ("tpl-team-a", "team-a-alias"):
            refused = httpx.post(
                f"{node.url}/sandboxes",
                json={"templateID": name},
                headers={"X-API-KEY": intruder},
                trust_env=False,
            )
            assert refused.status_code == 404, (node.config.node_id, name, refused.text)


def test_a_key_record_forged_into_etcd_makes_no_admin(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str], etcd_of: EtcdCluster
) -> None:
    """Whoever can write etcd cannot mint the admin: a record in the system team (or no team) is
    refused at every node, while a proper record written the same way would be taken."""
    a, b, _key = two_nodes
    forged = {team: "e2b_" + secrets.token_hex(20) for team in ("system", "")}
    fair = "e2b_" + secrets.token_hex(20)
    for team, key in [*forged.items(), ("team-fair", fair)]:
        record = {"key_id": secrets.token_hex(4), "name": "x", "prefix": key[:8], "created_at": 1.0}
        record |= {"revoked_at": None, "team_id": team}
        etcd_put(
            etcd_of, f"/cube/keys/{hashlib.sha256(key.encode()).hexdigest()}", json.dumps(record).encode()
        )
    for node in (a, b):
        until_status(node, fair, 200)  # the forged ones were delivered by then too
        for key in forged.values():
            assert status(node, key) == 401
            assert status(node, key, "/cube/keys") == 401
            assert status(node, key, "/cube/sandboxes") == 401


def test_a_nodes_own_keys_join_the_cluster_and_a_revoked_one_stays_revoked(
    etcd_of: EtcdCluster, start_service: Any, service_config: Any, tmp_path: Path
) -> None:
    """A node that had keys before it joined (its SQLite's) publishes them at its start; revoked in
    the cluster, such a key stays refused when that node starts again and publishes once more."""
    token_file = tmp_path / "cluster-token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    config_a = node_config(service_config, tmp_path, "a", etcd_of, token_file)
    config_b = node_config(service_config, tmp_path, "b", etcd_of, token_file)
    config_a.state_dir.mkdir(parents=True, exist_ok=True)
    local = SqliteStore(config_a.db_path)
    _record, old_key = local.create_api_key("from before the cluster")
    _gone, revoked_before = local.create_api_key("revoked before the cluster")
    local.revoke_api_key(_gone.key_id)
    local.close()

    a = start_service(config_a)
    b = start_service(config_b)
    for node in (a, b):
        until_status(node, old_key, 200)
        assert status(node, revoked_before) == 401
    key_id = _record.key_id
    assert (
        httpx.delete(
            f"{b.url}/cube/keys/{key_id}", headers={"X-API-KEY": b.admin_token}, trust_env=False
        ).status_code
        == 204
    )
    until_status(a, old_key, 401)
    a.stop()  # its SQLite still has the key active: publishing it again must not revive it
    a_again = start_service(config_a)
    for node in (a_again, b):
        assert status(node, old_key) == 401


def sandbox_on(node: ServiceHarness, team: str) -> str:
    """A sandbox of `team` created at `node` itself, as another node forwards a create (recorded)."""
    created = as_node(node, node, team).post("/sandboxes", json={})
    assert created.status_code == 201, created.text
    return str(created.json()["sandboxID"])


def test_the_admin_routes_and_the_dashboard_list_answer_for_every_node(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str],
) -> None:
    a, b, key = two_nodes
    admin = {"X-API-KEY": a.admin_token}
    team = next(k["team"] for k in httpx.get(f"{a.url}/cube/keys", headers=admin, trust_env=False).json())
    on_a, on_b = sandbox_on(a, team), sandbox_on(b, team)
    wait_for(a, lambda c: on_b in c.view.owners)
    listed = httpx.get(f"{a.url}/cube/sandboxes", headers=admin, trust_env=False)
    assert listed.status_code == 200, listed.text
    assert {(s["sandboxID"], s["nodeID"]) for s in listed.json()} == {(on_a, "a"), (on_b, "b")}
    newest = httpx.get(f"{a.url}/cube/sandboxes", params={"limit": 1}, headers=admin, trust_env=False).json()
    assert [s["sandboxID"] for s in newest] == [on_b]  # created last, on the other node
    one = httpx.get(f"{a.url}/cube/sandboxes/{on_b}", headers=admin, trust_env=False)
    assert one.status_code == 200 and one.json()["sandboxID"] == on_b, one.text
    assert one.json()["events"], one.text  # B's own record of it, events and all
    # Ended on B: the admin at A reads B's own record of it (its end and why).
    killed = httpx.delete(f"{a.url}/sandboxes/{on_b}", headers={"X-API-KEY": key}, trust_env=False)
    assert killed.status_code == 204, killed.text
    wait_for(a, lambda c: c.view.owners[on_b].ended_at > 0)
    ended = httpx.get(f"{a.url}/cube/sandboxes/{on_b}", headers=admin, trust_env=False).json()
    assert (ended["sandboxID"], ended["endReason"]) == (on_b, "killed by request"), ended
    on_b = sandbox_on(b, team)  # a live one on B again, for the lists below
    wait_for(a, lambda c: on_b in c.view.owners)
    events = httpx.get(f"{a.url}/cube/events", headers=admin, trust_env=False).json()
    assert {on_a, on_b} <= {e["sandboxID"] for e in events}
    times = [e["at"] for e in events]
    assert times == sorted(times, reverse=True)
    for node in (a, b):  # a key is no admin at any node, and learns nothing of the other node
        for path in ("/cube/sandboxes", f"/cube/sandboxes/{on_b}", "/cube/events"):
            assert status(node, key, path) == 403, (node.config.node_id, path)

    # The dashboard's sandbox list (and its metrics), signed in with the key at A: both nodes'.
    # Another team, signed in at B: neither. The key revoked at B ends its session at A.
    other = new_key(b, "other team")["key"]
    until_status(a, other, 200)
    for node, credential, shown in ((a, key, {on_a, on_b}), (b, other, set())):
        with httpx.Client(base_url=node.url, trust_env=False, timeout=30) as dashboard:
            assert dashboard.post("/dashboard/login", data={"credential": credential}).status_code == 303
            seen = dashboard.get("/dashboard/api/sandboxes", params={"limit": 100, "state": "running"})
            assert seen.status_code == 200, seen.text
            assert {s["sandboxID"] for s in seen.json()} == shown
            metrics = dashboard.get("/dashboard/api/sandboxes/metrics").json()["sandboxes"]
            assert set(metrics) == shown
            if credential == key:
                key_id = next(
                    k["id"]
                    for k in httpx.get(f"{b.url}/cube/keys", headers={"X-API-KEY": b.admin_token}).json()
                    if k["team"] == team
                )
                revoked = httpx.delete(f"{b.url}/cube/keys/{key_id}", headers={"X-API-KEY": b.admin_token})
                assert revoked.status_code == 204
                deadline = time.monotonic() + PROPAGATION_S
                while (ended := dashboard.get("/dashboard/api/sandboxes")).status_code == 200:
                    assert time.monotonic() < deadline, "the revoked key's session still works at A"
                    time.sleep(0.05)
                assert ended.status_code == 401, ended.text
