"""`cube node list|info|drain`: the cluster's nodes as etcd has them (docs/CLUSTER.md).

Reads etcd directly (the endpoints of the config's `etcd_endpoints`), so it answers while
any node's API is down; a single node (no endpoints) has no cluster to show.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, TypeVar

import click
import trio

from appliance.cli.common import emit, json_option
from appliance.cluster.etcd import EtcdClient, EtcdError
from appliance.cluster.membership import ClusterView, NodeRecord, read_view, set_drained
from appliance.config import Config

T = TypeVar("T")
COLUMNS = ("node_id", "state", "api_url", "runtime", "cpus", "memory_free_mb", "free_pool_slots", "sandboxes")


def _with_etcd(config: Config, call: Callable[[EtcdClient], Awaitable[T]]) -> T:
    endpoints = [e.strip() for e in config.etcd_endpoints.split(",") if e.strip()]
    if not endpoints:
        raise click.ClickException("this node is not in a cluster (the config names no etcd_endpoints)")

    async def run() -> T:
        async with EtcdClient(endpoints) as etcd:
            return await call(etcd)

    try:
        return trio.run(run)
    except EtcdError as exc:
        raise click.ClickException(str(exc)) from exc


def _row(view: ClusterView, node: NodeRecord) -> dict[str, Any]:
    owned = sum(1 for owner in view.owners.values() if owner.node_id == node.node_id)
    return {
        **asdict(node),
        "state": "drained" if node.node_id in view.drained else "ready",
        "memory_free_mb": node.memory_free_mb,
        "sandboxes": owned,  # recorded on this node (ended ones too, until they are collected)
    }


@click.group()
def node() -> None:
    """The cluster's nodes (needs etcd_endpoints in the config)."""


@node.command("list")
@json_option
@click.pass_obj
def node_list(config: Config, as_json: bool) -> None:
    """Every node whose lease is alive."""
    view = _with_etcd(config, read_view)
    emit([_row(view, n) for n in sorted(view.nodes.values(), key=lambda n: n.node_id)], as_json, COLUMNS)


@node.command("info")
@click.argument("node_id")
@json_option
@click.pass_obj
def node_info(config: Config, node_id: str, as_json: bool) -> None:
    """One node: capacity, templates, state."""
    view = _with_etcd(config, read_view)
    found = view.nodes.get(node_id)
    if found is None:
        raise click.ClickException(
            f"no node {node_id} in the cluster (its lease expired, or it never joined)"
        )
    row = _row(view, found)
    emit(row, as_json, COLUMNS)
    if not as_json:
        click.echo(f"templates: {', '.join(found.templates) or '(none)'}")


@node.command("drain")
@click.argument("node_id")
@click.option("--undo", is_flag=True, help="Take new placements again.")
@click.pass_obj
def node_drain(config: Config, node_id: str, undo: bool) -> None:
    """No new sandboxes on NODE_ID (its running ones stay); --undo ends the drain."""

    async def drain(etcd: EtcdClient) -> bool:
        view = await read_view(etcd)
        if node_id not in view.nodes and not undo:
            return False
        await set_drained(etcd, node_id, not undo)
        return True

    if not _with_etcd(config, drain):
        raise click.ClickException(f"no node {node_id} in the cluster")
    click.echo(f"{node_id}: {'taking new sandboxes again' if undo else 'drained (no new sandboxes)'}")
