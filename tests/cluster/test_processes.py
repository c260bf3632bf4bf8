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
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from click.testing import CliRunner

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
NODES = {"a": ("10.226.0.0/24", 580_000), "b": ("10.226.4.0/24", 581_000)}
VIEW_WAIT_S = 60.0


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


def test_sdk_through_a_reaches_a_sandbox_on_b_and_b_killed_ends_it(
    etcd: Callable[..., EtcdCluster],  # before private_service: etcd outlives the nodes' teardown
    private_service: Callable[..., PrivateService],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoints = ",".join(etcd().endpoints)
    token_file = tmp_path / "cluster-token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    nodes = {}
    for node_id, (network, uid_base) in NODES.items():
        nodes[node_id] = private_service(
            host_network=network,
            uid_base=uid_base,
            extra_env={
                "CUBE_ETCD_ENDPOINTS": endpoints,
                "CUBE_NODE_ID": node_id,
                "CUBE_CLUSTER_TOKEN_FILE": str(token_file),
                "CUBE_NODE_LEASE_TTL_S": str(LEASE_TTL_S),
            },
        )
    # A drained before it starts: its view has the drain before its API answers.
    trio.run(drain, endpoints.split(","), "a")
    for node in nodes.values():
        node.start()
    for node in nodes.values():
        node.wait_ready()
    a, b = nodes["a"], nodes["b"]
    wait_until("both nodes joined", lambda: node_ids(endpoints) == {"a", "b"}, VIEW_WAIT_S)

    for name, value in (("E2B_API_URL", a.url), ("E2B_SANDBOX_URL", a.url), ("E2B_API_KEY", a.create_key())):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    from e2b import Sandbox

    sandbox = Sandbox.create(timeout=600)
    with b.admin() as admin_b:
        assert admin_b.get(f"/sandboxes/{sandbox.sandbox_id}").status_code == 200  # it runs on B
    with a.admin() as admin_a:
        assert admin_a.get(f"/cube/sandboxes/{sandbox.sandbox_id}").status_code == 404  # not on A
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
