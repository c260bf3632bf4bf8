"""What the cluster shares beyond keys: a create's Idempotency-Key (cluster/idempotency.py) and a
key's last use (cluster/keys.py), over two in-process nodes and a real etcd.

- A create retried with the same Idempotency-Key through either node, whichever node placement
  would pick now, gets the first create's sandbox; at the same moment through both nodes, one
  sandbox. Another team's same key, or another key, makes another; an ended sandbox's key is a
  409 at both nodes. etcd holds the key and team hashed only.
- A key made at A and used at B has its `lastUsedAt` at A; used again and again, the cluster's
  record of it is written once a minute at most.
"""

from __future__ import annotations

import base64
import threading
from typing import TYPE_CHECKING, Any

import httpx
from cluster_nodes import cube_node, new_key, wait_for

from appliance.cluster.etcd import prefix_end
from appliance.cluster.idempotency import IDEMPOTENCY
from appliance.cluster.membership import KEY_USE
from appliance.tenancy import hash_api_key

if TYPE_CHECKING:
    from conftest import EtcdCluster, ServiceHarness

USE_WAIT_S = 30.0  # a membership tick (a third of the 5 s lease) and a watch event, on a loaded host


def etcd_prefix(etcd: EtcdCluster, prefix: bytes) -> list[dict[str, Any]]:
    """The keys under `prefix` as etcd's JSON gateway answers them (base64 keys and values)."""
    body = {
        "key": base64.b64encode(prefix).decode(),
        "range_end": base64.b64encode(prefix_end(prefix)).decode(),
    }
    answer = httpx.post(f"{etcd.endpoints[0]}/v3/kv/range", json=body, trust_env=False)
    assert answer.status_code == 200, answer.text
    return list(answer.json().get("kvs", []))


def create(node: ServiceHarness, key: str, idempotency_key: str) -> httpx.Response:
    return httpx.post(
        f"{node.url}/sandboxes",
        json={},
        headers={"X-API-KEY": key, "Idempotency-Key": idempotency_key},
        timeout=60,
        trust_env=False,
    )


def test_a_create_retried_through_any_node_gets_the_first_sandbox(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str], etcd_of: EtcdCluster
) -> None:
    a, b, key = two_nodes
    cube_node(a, "drain", "a")  # the first create, through A, runs on B
    wait_for(a, lambda c: "a" in c.view.drained)
    first = create(a, key, "retry-me")
    assert first.status_code == 201, first.text
    sandbox_id = first.json()["sandboxID"]
    assert b.run_sync_in_service(lambda: b.running.cubelet.live(sandbox_id) is not None)  # type: ignore[union-attr]
    cube_node(a, "drain", "--undo", "a")
    cube_node(a, "drain", "b")  # placement would now pick A: the retries must not
    wait_for(a, lambda c: "b" in c.view.drained and "a" not in c.view.drained)
    wait_for(b, lambda c: "b" in c.view.drained and "a" not in c.view.drained)
    for node in (b, a, a, b):
        again = create(node, key, "retry-me")
        assert again.status_code == 201, again.text
        same = ("sandboxID", "envdAccessToken")
        assert [again.json()[f] for f in same] == [first.json()[f] for f in same]  # the first one's
    assert a.run_sync_in_service(lambda: a.running.cubelet.live(sandbox_id) is None)  # type: ignore[union-attr]

    other_team = new_key(a, "other team")["key"]
    assert create(a, other_team, "retry-me").json()["sandboxID"] != sandbox_id
    assert create(b, key, "another key").json()["sandboxID"] != sandbox_id

    stored = etcd_prefix(etcd_of, IDEMPOTENCY)
    assert len(stored) == 3
    for kv in stored:  # hashed: etcd's readers learn neither the key nor the team
        text = base64.b64decode(kv["key"]) + base64.b64decode(kv["value"])
        assert b"retry-me" not in text and b"another key" not in text
        assert int(kv["lease"]) != 0  # kept a day, then gone

    assert httpx.delete(f"{a.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": key}).status_code == 204
    for node in (a, b):
        ended = create(node, key, "retry-me")
        assert ended.status_code == 409, ended.text
        assert (
            ended.json()["message"] == f"Idempotency-Key was used for sandbox {sandbox_id}, which has ended"
        )


def test_the_same_create_at_both_nodes_at_once_makes_one_sandbox(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str],
) -> None:
    a, b, key = two_nodes
    answers: dict[str, httpx.Response] = {}

    def create_at(name: str, node: ServiceHarness) -> None:
        answers[name] = create(node, key, "at-once")

    threads = [threading.Thread(target=create_at, args=(n, node)) for n, node in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers["a"].status_code == answers["b"].status_code == 201, (answers["a"].text, answers["b"].text)
    assert answers["a"].json()["sandboxID"] == answers["b"].json()["sandboxID"]
    listed = httpx.get(f"{a.url}/sandboxes", headers={"X-API-KEY": key}, trust_env=False).json()
    assert len(listed) == 1


def test_a_keys_last_use_at_any_node_is_the_clusters_and_written_once_a_minute(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str], etcd_of: EtcdCluster
) -> None:
    a, b, _key = two_nodes
    made = new_key(a, "used at b")

    def last_used_at(node: ServiceHarness) -> Any:
        keys = httpx.get(f"{node.url}/cube/keys", headers={"X-API-KEY": node.admin_token}, trust_env=False)
        return next(k for k in keys.json() if k["id"] == made["id"])["lastUsedAt"]

    assert last_used_at(a) is None
    for _ in range(20):
        assert (
            httpx.get(f"{b.url}/sandboxes", headers={"X-API-KEY": made["key"]}, trust_env=False).status_code
            == 200
        )
    key_use = KEY_USE + hash_api_key(made["key"]).encode()
    wait_for(a, lambda c: hash_api_key(made["key"]) in c.view.key_use)
    at_a = last_used_at(a)
    assert at_a is not None and last_used_at(b) >= at_a  # B may know a use not written yet
    # Used again over several ticks: the record is not written again within the minute.
    for _ in range(3):
        assert (
            httpx.get(f"{a.url}/sandboxes", headers={"X-API-KEY": made["key"]}, trust_env=False).status_code
            == 200
        )
        wait_for(a, lambda c: not c.keys.used)  # a tick flushed (or, within the minute, dropped) it
    (kv,) = [kv for kv in etcd_prefix(etcd_of, KEY_USE) if base64.b64decode(kv["key"]) == key_use]
    assert kv["version"] == "1", kv
