"""`cube node list|info|drain|remove|setup`: the cluster's nodes as etcd has them (docs/CLUSTER.md).

Reads etcd directly (the endpoints of the config's `etcd_endpoints`), so it answers while
any node's API is down; a single node (no endpoints) has no cluster to show.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from appliance.cli.common import emit, json_option
from appliance.cluster.etcd import EtcdClient, EtcdError
from appliance.cluster.membership import (
    live_sandboxes,
    read_view,
    remove_node,
    set_drained,
    undo_remove,
)
from appliance.cluster.node import ClusterConfigError, etcd_endpoints, etcd_security
from appliance.cluster.setup import ETCD_CLIENT_PORT, ETCD_PEER_PORT, ETCD_UNIT_NAME, SetupError, setup_node
from appliance.config import DEFAULT_CONFIG_PATH, Config

T = TypeVar("T")
COLUMNS = ("node_id", "state", "api_url", "runtime", "cpus", "memory_free_mb", "free_pool_slots", "sandboxes")


def _with_etcd(config: Config, call: Callable[[EtcdClient], Awaitable[T]]) -> T:
    endpoints = etcd_endpoints(config)
    if not endpoints:
        raise click.ClickException("this node is not in a cluster (the config names no etcd_endpoints)")

    async def run() -> T:
        async with EtcdClient(endpoints, security=etcd_security(config)) as etcd:
            return await call(etcd)

    try:
        return trio.run(run)
    except (EtcdError, ClusterConfigError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def node() -> None:
    """The cluster's nodes (needs etcd_endpoints in the config)."""


@node.command("list")
@json_option
@click.pass_obj
def node_list(config: Config, as_json: bool) -> None:
    """Every node whose lease is alive."""
    view = _with_etcd(config, read_view)
    emit(view.node_rows(), as_json, COLUMNS)


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
    row = view.node_row(found)
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


@node.command("remove")
@click.argument("node_id")
@click.option("--force", is_flag=True, help="Remove a live node even if it is not drained or runs sandboxes.")
@click.option("--undo", is_flag=True, help="Let a removed node join again.")
@click.pass_obj
def node_remove(config: Config, node_id: str, force: bool, undo: bool) -> None:
    """Take NODE_ID out of the cluster: it leaves and does not join again (until --undo); its
    sandboxes are reported ended. A live node must be drained and run no sandboxes, or --force."""

    async def remove(etcd: EtcdClient) -> str:
        if undo:
            if not await undo_remove(etcd, node_id):
                raise click.ClickException(f"node {node_id} was not removed")
            return f"{node_id}: may join the cluster again"
        view = await read_view(etcd)
        running = live_sandboxes(view, node_id)
        if node_id in view.nodes and not force:
            if node_id not in view.drained:
                raise click.ClickException(
                    f"node {node_id} is live and not drained: `cube node drain {node_id}` first, or --force"
                )
            if running:
                raise click.ClickException(
                    f"node {node_id} still runs {len(running)} sandbox(es) ({', '.join(running[:5])});"
                    " wait for them to end, or --force (they are then reported ended)"
                )
        elif node_id not in view.nodes and node_id not in view.drained and not running:
            raise click.ClickException(f"no node {node_id} in the cluster")
        await remove_node(etcd, node_id)
        return f"{node_id}: removed from the cluster" + (
            f" ({len(running)} sandbox(es) reported ended)" if running else ""
        )

    click.echo(_with_etcd(config, remove))


@node.command("setup")
@click.option(
    "--new",
    "address",
    metavar="ADDRESS",
    help="Start a new cluster: this node hosts its etcd member at ADDRESS.",
)
@click.option(
    "--join", "endpoints", metavar="ENDPOINTS", help="Join the cluster whose etcd client URLs these are."
)
@click.option("--node-id", help="This node's name in the cluster (default: the host name).")
@click.option("--node-address", help="Where the other nodes reach this node (default: the --new ADDRESS).")
@click.option(
    "--token-file",
    type=click.Path(path_type=Path),
    help="The cluster token's file (default: beside the config).",
)
@click.option(
    "--etcd-dir", type=click.Path(path_type=Path), help="--new: etcd's data (default: <state_dir>/etcd)."
)
@click.option(
    "--etcd-config",
    type=click.Path(path_type=Path),
    help="--new: etcd's config file (default: beside the config).",
)
@click.option(
    "--etcd-unit",
    type=click.Path(path_type=Path),
    default=Path("/etc/systemd/system") / ETCD_UNIT_NAME,
    show_default=True,
)
@click.option("--etcd-client-port", type=int, default=ETCD_CLIENT_PORT, show_default=True)
@click.option("--etcd-peer-port", type=int, default=ETCD_PEER_PORT, show_default=True)
@click.pass_obj
def node_setup(config: Config, address: str | None, endpoints: str | None, **options: Any) -> None:
    """Write this node's cluster configuration (installer/install.sh --cluster / --join; the ISO's
    first boot): the cluster keys in the config file, the token file (0600; a new one for --new,
    else --token-file or CUBE_CLUSTER_TOKEN), and for --new etcd's config and systemd unit.
    Starts nothing. The token is never printed."""
    try:
        written = setup_node(config, _config_path(), address, endpoints, **options)
    except (SetupError, ClusterConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    for line in written:
        click.echo(line)


def _config_path() -> Path:
    given = click.get_current_context().find_root().params.get("config_path")
    return Path(given or os.environ.get("CUBE_CONFIG") or DEFAULT_CONFIG_PATH)
