"""Helpers of the tests with in-process cluster nodes (the `two_nodes` fixture, conftest.py): each
node's config, its `ClusterNode`, waiting for its view, and `cube node` against its etcd."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import wsproto
import wsproto.events as ws
from click.testing import CliRunner

from appliance.cli.main import main
from appliance.cluster.forwarding import TEAM_HEADER, TOKEN_HEADER
from appliance.cluster.node import ClusterNode
from appliance.config import Config
from appliance.records import ROOTFS_NAME, TemplateManifest

if TYPE_CHECKING:
    from conftest import EtcdCluster, ServiceHarness

VIEW_WAIT_S = 30.0  # a watch event on a loaded host
MIB = 1 << 20
PLAINTEXT_REFUSED = "the cluster token is taken only on the cluster's TLS listener"


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
        cluster_port=0,
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


def as_node(sender: ServiceHarness, receiver: ServiceHarness, team: str | None = None) -> httpx.Client:
    """A client calling `receiver` as node `sender` forwards: at its cluster listener, with
    `sender`'s certificate (mutual TLS, cluster/tls.py), the cluster token and `team` if given."""
    headers = {TOKEN_HEADER: cluster_of(sender).token, **({TEAM_HEADER: team} if team else {})}
    return httpx.Client(
        base_url=cluster_of(receiver).cluster_url,
        verify=cluster_of(sender).tls.client_context(),
        headers=headers,
        trust_env=False,
    )


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


def make_template(node: ServiceHarness, template_id: str, alias: str, owner: str) -> Path:
    """A template on `node` only: a sparse image (data, a hole of 4 MiB, data at its end)."""
    directory = node.config.templates_dir / template_id
    directory.mkdir(parents=True)
    with (directory / ROOTFS_NAME).open("wb") as image:
        image.write(os.urandom(MIB + 123))
        image.seek(5 * MIB)
        image.write(os.urandom(MIB // 2) + b"end of " + template_id.encode())
    TemplateManifest(
        template_id=template_id,
        directory=directory,
        aliases=(alias,),
        memory_mb=128,
        created_at="2026-12-07T00:00:00Z",
        owner=owner,
    ).save()
    return directory / ROOTFS_NAME


def new_key(node: ServiceHarness, name: str) -> dict[str, Any]:
    made = httpx.post(
        f"{node.url}/cube/keys", json={"name": name}, headers={"X-API-KEY": node.admin_token}, trust_env=False
    )
    assert made.status_code == 201, made.text
    return dict(made.json())


def publish_templates(node: ServiceHarness) -> None:
    """What a build does when it publishes: the node's registry reads its templates again (its
    next membership tick puts them into its record)."""
    listed = httpx.get(f"{node.url}/templates", headers={"X-API-KEY": node.admin_token}, trust_env=False)
    assert listed.status_code == 200, listed.text


def websocket_echo(url: str, headers: dict[str, str], text: str) -> ws.Event:
    """Open /ws at `url` with `headers`, send `text`; the first event after the handshake's, or
    the handshake's refusal."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        sock.sendall(client.send(ws.Request(host="localhost", target="/ws", extra_headers=extra)))

        def next_event() -> ws.Event:
            while True:
                for event in client.events():
                    return event
                client.receive_data(sock.recv(65536) or None)

        opened = next_event()
        if not isinstance(opened, ws.AcceptConnection):
            return opened
        sock.sendall(client.send(ws.TextMessage(data=text)))
        echoed = next_event()
        sock.sendall(client.send(ws.CloseConnection(code=1000)))
        return echoed
