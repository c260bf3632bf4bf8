"""A cluster of real processes: one etcd member and two `cube serve` nodes (private services with
real UML guests, each with its own state directory, ports, sandbox network and uid range),
driven by the unmodified E2B SDK pointed at node A only.

- A drained: a create through A runs on B; the SDK runs a command in it through A (the API call
  and the envd traffic forwarded A→B);
- kill -9 of B: A reports B's sandbox ended, naming the node, within the lease TTL + 5 s.

Traffic goes only to the private services and etcd on loopback and, through them, to the
sandboxes' addresses in namespaces they made.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from click.testing import CliRunner
from freeports import free_ports

from appliance.bench.private import PrivateService
from appliance.cli.main import main
from appliance.cluster.etcd import EtcdClient
from appliance.cluster.membership import set_drained

if TYPE_CHECKING:
    from conftest import EtcdCluster

pytestmark = [pytest.mark.uml, pytest.mark.slow]

LEASE_TTL_S = 5
# Each node's own sandbox network and uids: none of another test's (private_service's default
# is 10.224.0.0/22, uid 540000).
NODES = {
    "a": ("10.226.0.0/24", 580_000),
    "b": ("10.226.4.0/24", 581_000),
    "c": ("10.226.8.0/24", 582_000),  # CUBE_CLUSTER_FULL=1 only
}
VIEW_WAIT_S = 60.0
NODE_PORTS = range(20_000, 32_000)  # the private services' range (tests/conftest.py)


def wait_until(what: str, done: Callable[[], bool], timeout: float) -> float:
    """Seconds it took; fails after `timeout`."""
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def node_ids(etcd_endpoints: str) -> set[str]:
    result = CliRunner().invoke(
        main,
        ["node", "list", "--json"],
        env={"CUBE_CONFIG": "/nonexistent", "CUBE_ETCD_ENDPOINTS": etcd_endpoints},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return {n["node_id"] for n in json.loads(result.output)}


async def drain(endpoints: list[str], node_id: str) -> None:
    async with EtcdClient(endpoints) as client:
        await set_drained(client, node_id, True)


def make_nodes(
    private_service: Callable[..., PrivateService], endpoints: str, token_file: Path, names: str
) -> dict[str, PrivateService]:
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    nodes = {}
    for node_id in names:
        network, uid_base = NODES[node_id]
        nodes[node_id] = private_service(
            host_network=network,
            uid_base=uid_base,
            extra_env={
                "CUBE_ETCD_ENDPOINTS": endpoints,
                "CUBE_NODE_ID": node_id,
                "CUBE_CLUSTER_TOKEN_FILE": str(token_file),
                "CUBE_NODE_LEASE_TTL_S": str(LEASE_TTL_S),
                "CUBE_CLUSTER_PORT": str(free_ports(1, NODE_PORTS)[0]),  # node to node: TLS
            },
        )
    return nodes


def start_in_order(nodes: dict[str, PrivateService], endpoints: str) -> None:
    """One after the other, each once the ones before it are in etcd: the view a node loads before
    its API serves has them all (the last one started sees every other)."""
    for node_id, node in nodes.items():
        node.start()
        node.wait_ready()
        wait_until(f"{node_id} joined", lambda n=node_id: n in node_ids(endpoints), VIEW_WAIT_S)


def point_sdk_at(node: PrivateService, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (
        ("E2B_API_URL", node.url),
        ("E2B_SANDBOX_URL", node.url),
        ("E2B_API_KEY", node.create_key()),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)


def test_sdk_through_a_reaches_a_sandbox_on_b_and_b_killed_ends_it(
    etcd: Callable[..., EtcdCluster],  # before private_service: etcd outlives the nodes' teardown
    private_service: Callable[..., PrivateService],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoints = ",".join(etcd().endpoints)
    nodes = make_nodes(private_service, endpoints, tmp_path / "cluster-token", "ba")
    # A drained before it starts: its view has the drain before its API answers.
    trio.run(drain, endpoints.split(","), "a")
    start_in_order(nodes, endpoints)
    a, b = nodes["a"], nodes["b"]
    assert node_ids(endpoints) == {"a", "b"}
    point_sdk_at(a, monkeypatch)
    from e2b import Sandbox

    sandbox = Sandbox.create(timeout=600)
    with b.admin() as admin_b:
        assert admin_b.get(f"/sandboxes/{sandbox.sandbox_id}").status_code == 200  # it runs on B
    assert owner_of(nodes, sandbox.sandbox_id) == "b"  # every node's admin list says so
    with a.admin() as admin_a:  # B's own record of it, through A
        assert admin_a.get(f"/cube/sandboxes/{sandbox.sandbox_id}").json()["sandboxID"] == sandbox.sandbox_id
    ran = sandbox.commands.run("echo from $(hostname) && id -un")
    assert ran.exit_code == 0 and ran.stdout.splitlines()[-1] == "user", ran

    b.stop(signal.SIGKILL)
    killed_at = time.monotonic()

    def reported_ended() -> bool:
        with a.admin() as admin_a:
            answer = admin_a.get(f"/sandboxes/{sandbox.sandbox_id}")
        return answer.status_code == 404 and "its node b left the cluster" in answer.json()["message"]

    wait_until("B's sandbox reported ended through A", reported_ended, LEASE_TTL_S + 5)
    assert time.monotonic() - killed_at <= LEASE_TTL_S + 5
    assert node_ids(endpoints) == {"a"}


@pytest.mark.skipif(
    os.environ.get("CUBE_CLUSTER_FULL") != "1", reason="the heavier cluster test: set CUBE_CLUSTER_FULL=1"
)
def test_full_three_nodes_over_three_etcd_members(
    etcd: Callable[..., EtcdCluster],
    private_service: Callable[..., PrivateService],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    members = etcd(members=3)
    endpoints = ",".join(members.endpoints)
    nodes = make_nodes(private_service, endpoints, tmp_path / "cluster-token", "cba")
    start_in_order(nodes, endpoints)
    a = nodes["a"]
    point_sdk_at(a, monkeypatch)
    from e2b import Sandbox

    sandboxes = [Sandbox.create(timeout=600) for _ in range(3)]
    owners = {s.sandbox_id: owner_of(nodes, s.sandbox_id) for s in sandboxes}
    for sandbox in sandboxes:
        assert sandbox.commands.run("echo ok").stdout == "ok\n"

    members.members[0].stop(signal.SIGKILL)  # 2 of 3: the cluster goes on
    after_one = Sandbox.create(timeout=600)
    assert after_one.commands.run("echo ok").stdout == "ok\n"

    for member in members.members[1:]:
        member.stop(signal.SIGKILL)  # none: creates are refused, running sandboxes answer
    with a.admin() as admin_a:
        refused = admin_a.post("/sandboxes", json={})
    assert refused.status_code == 503, refused.text
    assert refused.json()["message"].startswith("the cluster's etcd is unavailable, retry later: ")
    for sandbox in [*sandboxes, after_one]:
        assert sandbox.commands.run("echo still").stdout == "still\n"
    assert owners == {s.sandbox_id: owner_of(nodes, s.sandbox_id) for s in sandboxes}


def owner_of(nodes: dict[str, PrivateService], sandbox_id: str) -> str:
    """The node running the sandbox, as every node's admin list (merged across the cluster, each
    sandbox naming its node) has it: they must agree on exactly one."""
    named = []
    for node in nodes.values():
        with node.admin() as admin:
            listed = admin.get("/cube/sandboxes").json()
            named += [s["nodeID"] for s in listed if s["sandboxID"] == sandbox_id]
    assert len(named) == len(nodes) and len(set(named)) == 1, named
    return named[0]
