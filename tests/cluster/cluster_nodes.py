"""Helpers of the tests with in-process cluster nodes (the `two_nodes` fixture, conftest.py): each
node's config, its `ClusterNode`, waiting for its view, and `cube node` against its etcd."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from click.testing import CliRunner

from appliance.cli.main import main
from appliance.cluster.node import ClusterNode
from appliance.config import Config
from appliance.records import TemplateManifest

if TYPE_CHECKING:
    from conftest import EtcdCluster, ServiceHarness

VIEW_WAIT_S = 30.0  # a watch event on a loaded host


def node_config(base: Config, root: Path, node_id: str, etcd: EtcdCluster, token_file: Path) -> Config:
    config = dataclasses.replace(
        base,
        state_dir=root / node_id / "state",
        cache_dir=root / node_id / "cache",
        run_dir=root / node_id / "run",
        etcd_endpoints=",".join(etcd.endpoints),
        node_id=node_id,
        cluster_token_file=token_file,
        node_lease_ttl_s=5,
    )
    TemplateManifest(
        template_id="code-interpreter",
        directory=config.templates_dir / "code-interpreter",
        aliases=("ci",),
        memory_mb=256,
        created_at="2026-01-01T00:00:00Z",
    ).save()
    return config


def cluster_of(node: ServiceHarness) -> ClusterNode:
    assert node.running is not None and node.running.cluster is not None
    return node.running.cluster


def wait_for(node: ServiceHarness, seen: Callable[[ClusterNode], bool]) -> None:
    deadline = time.monotonic() + VIEW_WAIT_S
    while not node.run_sync_in_service(seen, cluster_of(node)):
        assert time.monotonic() < deadline, f"{node.config.node_id}'s view: {cluster_of(node).view}"
        time.sleep(0.05)


def cube_node(node: ServiceHarness, *args: str, exit_code: int = 0) -> Any:
    """`cube node ARGS` with this node's etcd endpoints (as its config would name them)."""
    result = CliRunner().invoke(
        main,
        ["node", *args],
        env={"CUBE_CONFIG": "/nonexistent", "CUBE_ETCD_ENDPOINTS": node.config.etcd_endpoints},
        catch_exceptions=False,
    )
    assert result.exit_code == exit_code, result.output
    return json.loads(result.output) if "--json" in args and exit_code == 0 else result.output
