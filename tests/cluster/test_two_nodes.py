"""Two `run_service` nodes in this process (guests: the FakeRuntime's loopback HTTP servers) over
one real etcd member: placement, forwarding of API calls and sandbox traffic, the merged list,
node-to-node auth attacked, a node leaving.

The same with real `cube serve` processes and UML guests: test_processes.py."""

from __future__ import annotations

import base64
import json
import re
import signal
import time
from typing import TYPE_CHECKING, Any

import httpx
from click.testing import CliRunner
from cluster_nodes import PLAINTEXT_REFUSED, as_node, cluster_of, cube_node, wait_for

from appliance.cli.main import main
from appliance.cluster.forwarding import NAME_HEADER, TEAM_HEADER, TOKEN_HEADER

if TYPE_CHECKING:
    from conftest import EtcdCluster, ServiceHarness


def test_a_create_through_a_drained_node_runs_on_the_other_and_is_reached_through_it(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str],
) -> None:
    a, b, key = two_nodes
    with httpx.Client(base_url=a.url, headers={"X-API-KEY": key}, timeout=30, trust_env=False) as api:
        listed = cube_node(a, "list", "--json")
        assert [(n["node_id"], n["state"], n["api_url"]) for n in listed] == [
            ("a", "ready", a.url),
            ("b", "ready", b.url),
        ]
        info = cube_node(a, "info", "b", "--json")
        assert info["state"] == "ready" and info["memory_budget_mb"] == 4096
        assert {"code-interpreter", "ci"} <= set(info["templates"])
        cube_node(a, "drain", "a")
        assert [n["state"] for n in cube_node(a, "list", "--json")] == ["drained", "ready"]
        wait_for(a, lambda c: "a" in c.view.drained)

        created = api.post("/sandboxes", json={"templateID": "ci"})
        assert created.status_code == 201, created.text
        sandbox = created.json()
        sandbox_id = sandbox["sandboxID"]
        assert b.run_sync_in_service(lambda: b.running.cubelet.live(sandbox_id) is not None)  # type: ignore[union-attr]
        assert a.run_sync_in_service(lambda: a.running.cubelet.live(sandbox_id) is None)  # type: ignore[union-attr]

        assert api.get(f"/sandboxes/{sandbox_id}").json()["sandboxID"] == sandbox_id
        assert sandbox_id in [s["sandboxID"] for s in api.get("/sandboxes").json()]
        assert sandbox_id in [s["sandboxID"] for s in api.get("/v2/sandboxes").json()]
        # The SDK's batch metrics (`Sandbox.get_metrics` of many) through A: B's sandbox is in it.
        for params in ({"sandbox_ids": sandbox_id}, {}):
            many = api.get("/sandboxes/metrics", params=params)
            assert many.status_code == 200 and sandbox_id in many.json()["sandboxes"], many.text

        # Sandbox traffic for B's sandbox, sent to A: answered by the guest on B.
        echoed = api.post(
            "/echo",
            content=b"through a",
            headers={
                "E2b-Sandbox-Id": sandbox_id,
                "E2b-Sandbox-Port": "49983",
                "X-Access-Token": sandbox["envdAccessToken"],
            },
        )
        assert echoed.status_code == 200 and echoed.content == b"through a"
        refused = api.post(
            "/echo", content=b"x", headers={"E2b-Sandbox-Id": sandbox_id, "X-Access-Token": "wrong"}
        )
        # B's own access check still holds (its router's answer to a wrong token).
        assert refused.json() == {"code": 502, "message": f"The sandbox {sandbox_id} was not found"}
        # Chunked uploads B answers before their end, each followed by a call through A: B closes
        # such a connection, A never pools it, so the next call is answered (it used to hang
        # now and then on a connection B had left open and unread: proxy/complete_close.py).
        for _ in range(3):
            early = api.post(
                "/echo",
                content=iter([b"x"]),
                headers={"E2b-Sandbox-Id": sandbox_id, "X-Access-Token": "wrong"},
            )
            assert early.json() == refused.json()  # B's answer, not "node b is unreachable"
            assert api.get(f"/sandboxes/{sandbox_id}").status_code == 200

        assert api.delete(f"/sandboxes/{sandbox_id}").status_code == 204
        assert b.run_sync_in_service(lambda: b.running.cubelet.live(sandbox_id) is None)  # type: ignore[union-attr]
        assert api.get(f"/sandboxes/{sandbox_id}").status_code == 404

        cube_node(a, "drain", "b")
        wait_for(a, lambda c: c.view.drained == {"a", "b"})
        refused_create = api.post("/sandboxes", json={})
        assert refused_create.json() == {
            "code": 503,
            "message": "no node of the cluster can take a sandbox of 'code-interpreter' now"
            " (this one is drained)",
        }


def test_node_to_node_auth_cannot_be_forged(two_nodes: tuple[ServiceHarness, ServiceHarness, str]) -> None:
    a, b, key = two_nodes
    forged = {TOKEN_HEADER: "x" * 64, TEAM_HEADER: "system", NAME_HEADER: "attacker"}
    for sender, node in ((b, a), (a, b)):
        # At the cluster listener (a node's certificate), a wrong token is refused...
        with as_node(sender, node) as from_node:
            wrong_token = from_node.get("/sandboxes", headers=forged)
        assert wrong_token.status_code == 401, wrong_token.text
        assert wrong_token.json() == {"code": 401, "message": "invalid cluster token"}
        # ...and any token, the right one too, in plain HTTP at the API port (node_tls.py).
        for token in ("x" * 64, cluster_of(a).token):
            plain = httpx.get(
                f"{node.url}/sandboxes", headers={**forged, TOKEN_HEADER: token}, trust_env=False
            )
            assert plain.json() == {"code": 401, "message": PLAINTEXT_REFUSED}
        # A team without the token is no one: the request is authenticated as any other.
        no_token = httpx.get(f"{node.url}/cube/keys", headers={TEAM_HEADER: "system"}, trust_env=False)
        assert no_token.status_code == 401, no_token.text
    # A key made at A works at B too: keys are the cluster's (test_keys.py).
    for node in (a, b):
        assert (
            httpx.get(f"{node.url}/sandboxes", headers={"X-API-KEY": key}, trust_env=False).status_code == 200
        )


def etcd_record(etcd: EtcdCluster, key: bytes) -> Any:
    """A key's JSON value as etcd has it (read through its JSON gateway), None if absent."""
    answer = httpx.post(
        f"{etcd.endpoints[0]}/v3/kv/range", json={"key": base64.b64encode(key).decode()}, trust_env=False
    )
    kvs = answer.json().get("kvs", [])
    return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


def test_a_sandbox_of_a_node_that_left_is_reported_ended(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str], etcd_of: EtcdCluster
) -> None:
    a, b, key = two_nodes
    headers = {"X-API-KEY": key}
    created = as_node(a, b, "t").post("/sandboxes", json={})
    assert created.status_code == 201, created.text  # as A forwards: B's own create, recorded by B
    sandbox_id = created.json()["sandboxID"]
    wait_for(a, lambda c: sandbox_id in c.view.owners)
    b.stop()  # a clean stop revokes B's lease: A sees B gone at once
    wait_for(a, lambda c: "b" not in c.view.nodes)
    admin = httpx.get(
        f"{a.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": a.admin_token}, trust_env=False
    )
    assert admin.status_code == 404
    assert (
        admin.json()["message"] == f"sandbox {sandbox_id} not found (it ended: its node b left the cluster)"
    )
    # The leader (A, the one node left) writes it ended into the cluster's records, with the
    # reason: what every node, and one that joins later, reports.
    record_key = f"/cube/sandboxes/{sandbox_id}".encode()
    wait_for(a, lambda c: c.view.leader == "a" and bool(c.view.owners[sandbox_id].ended_at))
    record = etcd_record(etcd_of, record_key)
    assert record["node_id"] == "b" and record["reason"] == "its node b left the cluster"
    assert 0 < time.time() - record["ended_at"] < 600
    again = httpx.get(
        f"{a.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": a.admin_token}, trust_env=False
    )
    assert again.json()["message"] == admin.json()["message"]
    # Past the retention period, the leader collects the record.
    a.run_sync_in_service(lambda c: setattr(c, "record_retention_s", 0.0), cluster_of(a))
    wait_for(a, lambda c: sandbox_id not in c.view.owners)
    assert etcd_record(etcd_of, record_key) is None
    traffic = httpx.get(f"{a.url}/health", headers={"E2b-Sandbox-Id": sandbox_id}, trust_env=False)
    assert traffic.status_code == 502  # what the SDKs read as "the sandbox is gone"
    assert traffic.json()["message"] == f"The sandbox {sandbox_id} was not found"
    other_team = httpx.get(f"{a.url}/sandboxes/{sandbox_id}", headers=headers, trust_env=False)
    assert other_team.json() == {"code": 404, "message": f"sandbox {sandbox_id} not found"}


def test_a_sandbox_that_ended_on_its_node_is_reported_ended_everywhere_then_collected(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str], etcd_of: EtcdCluster
) -> None:
    a, b, _key = two_nodes
    as_a = as_node(a, b, "t")  # what A sends when it forwards
    created = as_a.post("/sandboxes", json={})
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["sandboxID"]
    wait_for(a, lambda c: sandbox_id in c.view.owners)
    assert as_a.delete(f"/sandboxes/{sandbox_id}").status_code == 204
    # B writes its record ended, with its own store's reason; every node answers so.
    wait_for(a, lambda c: bool(c.view.owners[sandbox_id].ended_at))
    record = etcd_record(etcd_of, f"/cube/sandboxes/{sandbox_id}".encode())
    assert (record["node_id"], record["reason"]) == ("b", "killed by request")
    answer = httpx.get(
        f"{a.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": a.admin_token}, trust_env=False
    )
    assert answer.json() == {
        "code": 404,
        "message": f"sandbox {sandbox_id} not found (it ended: killed by request)",
    }
    for node in (a, b):  # whichever leads collects it past the retention period
        node.run_sync_in_service(lambda c: setattr(c, "record_retention_s", 0.0), cluster_of(node))
    wait_for(a, lambda c: sandbox_id not in c.view.owners)
    assert etcd_record(etcd_of, f"/cube/sandboxes/{sandbox_id}".encode()) is None


def test_with_etcd_down_a_create_is_a_503_and_running_sandboxes_keep_answering(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str], etcd_of: Any
) -> None:
    a, _b, key = two_nodes
    with httpx.Client(base_url=a.url, headers={"X-API-KEY": key}, timeout=30, trust_env=False) as api:
        running = api.post("/sandboxes", json={})
        assert running.status_code == 201, running.text
        running_id = running.json()["sandboxID"]
        for member in etcd_of.members:
            member.stop(signal.SIGKILL)
        refused = api.post("/sandboxes", json={})
        assert refused.status_code == 503, refused.text
        assert refused.json()["message"].startswith("the cluster's etcd is unavailable, retry later: ")
        live = [s["sandboxID"] for s in api.get("/sandboxes").json()]
        assert live == [running_id]  # the refused create's sandbox was not kept
        assert api.get(f"/sandboxes/{running_id}").status_code == 200
        # Keys are checked against each node's watched view: the key made at A still works at B;
        # a change to the keys needs etcd: a clear 503, nothing changed.
        at_b = httpx.get(f"{_b.url}/sandboxes/{running_id}", headers={"X-API-KEY": key}, trust_env=False)
        assert at_b.status_code == 200, at_b.text
        for answer in (
            api.post("/cube/keys", json={"name": "x"}, headers={"X-API-KEY": a.admin_token}),
            api.get("/cube/keys", headers={"X-API-KEY": a.admin_token}),
        ):
            assert answer.status_code == 503, answer.text
            assert answer.json()["message"].startswith("the cluster's etcd is unavailable, retry later: ")


def test_node_remove_refuses_a_live_node_unless_drained_and_empty_or_forced(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str],
) -> None:
    a, b, _key = two_nodes
    assert "live and not drained" in cube_node(a, "remove", "b", exit_code=1)
    created = as_node(a, b, "t").post("/sandboxes", json={})
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["sandboxID"]
    cube_node(a, "drain", "b")
    wait_for(a, lambda c: "b" in c.view.drained and sandbox_id in c.view.owners)
    assert f"still runs 1 sandbox(es) ({sandbox_id})" in cube_node(a, "remove", "b", exit_code=1)
    assert "b" in cube_node(a, "list")
    assert "1 sandbox(es) reported ended" in cube_node(a, "remove", "b", "--force")
    # B leaves and stays out (it does not join again on its next tick); its sandbox is reported ended.
    wait_for(b, lambda c: not c.joined)
    wait_for(a, lambda c: "b" not in c.view.nodes and bool(c.view.owners[sandbox_id].ended_at))
    assert [n["node_id"] for n in cube_node(a, "list", "--json")] == ["a"]
    gone = httpx.get(f"{a.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": a.admin_token}, trust_env=False)
    assert gone.json()["message"] == f"sandbox {sandbox_id} not found (it ended: its node b left the cluster)"
    assert "no node nope" in cube_node(a, "remove", "nope", exit_code=1)
    assert "may join the cluster again" in cube_node(a, "remove", "b", "--undo")


def test_bench_cluster_measures_local_and_forwarded_creates(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str],
) -> None:
    a, _b, key = two_nodes
    env = {"CUBE_CONFIG": "/nonexistent", "CUBE_ETCD_ENDPOINTS": a.config.etcd_endpoints, "CUBE_API_KEY": key}
    for drained, path in (("b", "local"), ("a", "forwarded")):
        cube_node(a, "drain", drained)
        cube_node(a, "drain", "b" if drained == "a" else "a", "--undo")
        wait_for(a, lambda c, drained=drained: c.view.drained == {drained})  # type: ignore[misc]
        result = CliRunner().invoke(
            main,
            ["bench", "cluster", "--via", "a", "--creates", "5", "--json"],
            env=env,
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.output.strip().splitlines()[-1])  # after the nodes' own log lines
        print(report["rows"], report["notes"])
        creates, placed = report["rows"]
        assert (creates["create"], creates["n"], placed["create"]) == (path, 5, "placement")
        assert 0 < creates["p50_ms"] <= creates["p95_ms"] and placed["mean_us"] > 0
        # The create-only sandbox record: at least one etcd transaction per create.
        txn = re.search(r"Txn ([0-9.]+)", report["notes"][0])
        assert txn is not None and float(txn.group(1)) >= 1.0, report["notes"]


def test_the_dashboard_shows_the_admin_every_node(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str],
) -> None:
    a, b, key = two_nodes
    for credential, shown in ((a.admin_token, [("a", "ready", a.url), ("b", "ready", b.url)]), (key, [])):
        with httpx.Client(base_url=a.url, trust_env=False, timeout=30) as dashboard:
            assert dashboard.post("/dashboard/login", data={"credential": credential}).status_code == 303
            nodes = dashboard.get("/dashboard/api/overview").json()["nodes"]
            assert [(n["node_id"], n["state"], n["api_url"]) for n in nodes] == shown
