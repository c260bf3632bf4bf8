"""This node's part in the cluster: its lease and record, the watched view, placement, the
sandbox→node records, and the token nodes prove themselves to each other with.

`ClusterNode.watch` and `ClusterNode.publish` are tasks of the service's nursery: the first
keeps the view (loaded before the API serves), the second this node's record under its lease.
`leave()` revokes the lease at a clean stop, so the others see the node gone at once (after a
crash: once the lease's TTL has passed).
"""

from __future__ import annotations

import hmac
import logging
import os
import random
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio

from appliance.cluster.etcd import EtcdClient, EtcdError, EtcdSecurity
from appliance.cluster.fanout import NodeAnswer, ask_node
from appliance.cluster.idempotency import ClusterIdempotency
from appliance.cluster.keys import ClusterKeys
from appliance.cluster.leader import RECORD_RETENTION_S, campaign, reap, rewrite
from appliance.cluster.membership import (
    ClusterView,
    NodeRecord,
    SandboxOwner,
    node_key,
    removed_key,
    sandbox_key,
    watch_view,
)
from appliance.cluster.tls import NodeTls, PlaintextRefused
from appliance.config import Config
from appliance.cubelet.cubelet import Cubelet
from appliance.records import TemplateManifest
from appliance.templates.catalog import split_name_tag
from appliance.tenancy import Principal

log = logging.getLogger(__name__)

BEST_OF_K = 2  # placement samples this many fitting nodes and takes the one with most free memory
LEAVE_TIMEOUT_S = 3.0
ASK_TIMEOUT_S = 10.0  # another node's answer to a list (the dashboard's)


class ClusterConfigError(Exception):
    pass


class NodeRemoved(ClusterConfigError):
    """`cube node remove` took this node out of the cluster: it does not join."""


@dataclass(frozen=True)
class ClusterSettings:
    endpoints: list[str]
    node_id: str
    node_url: str  # "" = the API's bound URL, known once it listens
    token: str
    lease_ttl_s: int
    security: EtcdSecurity = field(default_factory=EtcdSecurity)

    def __repr__(self) -> str:  # never the token
        return f"ClusterSettings(endpoints={self.endpoints}, node_id={self.node_id!r})"

    @classmethod
    def from_config(cls, config: Config) -> ClusterSettings | None:
        """None when the config names no etcd endpoints (a single node)."""
        endpoints = etcd_endpoints(config)
        if not endpoints:
            return None
        return cls(
            endpoints=endpoints,
            node_id=config.node_id or socket.gethostname(),
            node_url=config.node_url.rstrip("/"),
            token=read_token(config.cluster_token_file),
            lease_ttl_s=config.node_lease_ttl_s,
            security=etcd_security(config),
        )


def etcd_endpoints(config: Config) -> list[str]:
    return [e.strip() for e in config.etcd_endpoints.split(",") if e.strip()]


def etcd_security(config: Config) -> EtcdSecurity:
    """The config's TLS files and etcd user (its password read from its file, checked like the
    cluster token's)."""
    if config.etcd_key_file is not None and config.etcd_cert_file is None:
        raise ClusterConfigError("etcd_key_file is set without etcd_cert_file")
    password = ""
    if config.etcd_user:
        if config.etcd_password_file is None:
            raise ClusterConfigError("etcd_user is set: etcd_password_file must name its password's file")
        password = read_secret(config.etcd_password_file, "etcd password", 1)
    return EtcdSecurity(
        config.etcd_ca_file,
        config.etcd_cert_file,
        config.etcd_key_file or config.etcd_cert_file,
        config.etcd_user,
        password,
    )


def read_token(path: Path | None) -> str:
    """The cluster token: a file only its owner may read, at least 32 characters."""
    if path is None:
        raise ClusterConfigError("etcd_endpoints is set: cluster_token_file must name the cluster's token")
    return read_secret(path, "cluster token", 32)


def read_secret(path: Path, what: str, min_length: int) -> str:
    """A secret from a file only its owner may read (0600), at least `min_length` characters."""
    try:
        mode = path.stat().st_mode
        secret = path.read_text().strip()
    except OSError as exc:
        raise ClusterConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ClusterConfigError(f"the {what} file {path} must be readable by its owner only (0600)")
    if len(secret) < min_length:
        raise ClusterConfigError(f"the {what} in {path} is too short (at least {min_length} characters)")
    return secret


def template_names(templates: dict[str, TemplateManifest]) -> list[str]:
    names = set(templates)
    for manifest in templates.values():
        names.update(manifest.aliases)
    return sorted(names)


def placement(view: ClusterView, here: str, template: str) -> list[NodeRecord]:
    """Where a create for `template` arriving at node `here` should go, best first: nodes not
    drained with free memory, those that have the template before those that would pull it
    (cluster/templates.py); in each group the first is the best of K sampled by free memory and
    the rest follow by free memory (tried in turn when a node refuses). Empty when no node of
    the cluster has the template (the create is then answered here: not found)."""
    base = split_name_tag(template)[0]
    if not any(template in n.templates or base in n.templates for n in view.nodes.values()):
        return []
    fitting = [n for n in view.nodes.values() if n.node_id not in view.drained and n.memory_free_mb > 0]
    having = [n for n in fitting if template in n.templates or base in n.templates]
    lacking = [n for n in fitting if n not in having]
    return _best_of_k(having, here) + _best_of_k(lacking, here)


def _best_of_k(nodes: list[NodeRecord], here: str) -> list[NodeRecord]:
    by_memory = sorted(nodes, key=lambda n: (-n.memory_free_mb, n.node_id != here, n.node_id))
    if len(by_memory) <= 1:
        return by_memory
    sample = random.sample(by_memory, min(BEST_OF_K, len(by_memory)))
    best = max(sample, key=lambda n: (n.memory_free_mb, n.node_id == here))
    return [best, *(n for n in by_memory if n is not best)]


class ClusterNode:
    def __init__(
        self,
        settings: ClusterSettings,
        cubelet: Cubelet,
        templates: Callable[[], dict[str, TemplateManifest]],
        resolve: Callable[[str, Principal], TemplateManifest | None],
        etcd: EtcdClient | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.cubelet = cubelet
        self.templates = templates
        self.resolve = resolve  # a template name (alias, SDK default) as the caller means it
        self.etcd = etcd or EtcdClient(settings.endpoints, security=settings.security)
        self.view = ClusterView()
        self.keys = ClusterKeys(self.etcd, self.view)  # the API keys of every node
        self.idempotency = ClusterIdempotency(self.etcd, self.node_id)  # creates' Idempotency-Keys
        # This node's certificate from the cluster CA, for the address it advertises
        # (cluster/tls.py): every call to another node and the cluster listener use it.
        self.tls = NodeTls.issue(cubelet.config.state_dir, settings.token, self.node_id, self.advertised_host)
        self.client_ssl = self.tls.client_context()  # one for every call to another node
        # Lists asked of the other nodes for this node's own pages (the dashboard's); closed
        # with the etcd client when the watch ends.
        self.client = self.node_client(ASK_TIMEOUT_S)
        self.api_url = settings.node_url
        self.cluster_url = ""  # this node's cluster listener, once it listens
        self.lease_id = 0
        self.started_at = time.time()
        self.record_retention_s = RECORD_RETENTION_S
        self.joined = False  # this node's record is published under its lease

    @property
    def advertised_host(self) -> str:
        """The host the other nodes dial: `node_url`'s, else the API's bound address."""
        return urlsplit(self.settings.node_url).hostname or self.cubelet.config.api_host

    def node_client(self, timeout: float | httpx.Timeout) -> httpx.AsyncClient:
        """An HTTP client for the other nodes' cluster listeners: mutual TLS with the cluster CA."""
        return httpx.AsyncClient(
            timeout=timeout,
            trust_env=False,
            follow_redirects=False,
            verify=self.client_ssl,
            mounts={"http://": PlaintextRefused()},
        )

    def listening(self, bound_url: str) -> None:
        """The cluster listener is bound (`https://host:port`): the other nodes reach it at this
        node's advertised host on that port."""
        port = urlsplit(bound_url).port
        host = self.advertised_host
        self.cluster_url = f"https://{f'[{host}]' if ':' in host else host}:{port}"

    def verify_token(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self.settings.token.encode())

    @property
    def token(self) -> str:
        return self.settings.token

    # Membership.

    def record(self) -> NodeRecord:
        templates = self.templates()
        return NodeRecord(
            node_id=self.node_id,
            api_url=self.api_url,
            cluster_url=self.cluster_url,
            runtime=self.cubelet.runtime.name,
            cpus=os.cpu_count() or 1,
            memory_budget_mb=self.cubelet.memory_budget_mb,
            memory_committed_mb=self.cubelet.memory_committed_mb(),
            free_pool_slots=sum(self.cubelet.pooled_count(t) for t in templates),
            templates=template_names(templates),
            started_at=self.started_at,
        )

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the view until cancelled; started once it is loaded (before the API serves: no
        request is placed on an empty view). Owns the etcd and node clients: closed when it ends."""
        try:
            await watch_view(self.etcd, self.view, task_status=task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self.etcd.aclose()
                await self.client.aclose()

    async def publish(
        self, api_url: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Join (this node's record under its lease, its API at `api_url` unless node_url says
        otherwise) and keep the lease and record current until cancelled."""
        self.api_url = self.settings.node_url or api_url
        await self._join()
        log.info("cluster: node %s joined at %s (nodes: %s)", self.node_id, self.api_url, self.cluster_url)
        task_status.started()
        await self._keep_alive()

    async def _join(self) -> None:
        if await self.etcd.get(removed_key(self.node_id)) is not None:
            raise NodeRemoved(
                f"node {self.node_id} was removed from the cluster (`cube node remove`);"
                f" `cube node remove --undo {self.node_id}` lets it join again"
            )
        lease = await self.etcd.grant(self.settings.lease_ttl_s)
        self.lease_id = lease.lease_id
        await self.etcd.put(node_key(self.node_id), self.record().encode(), lease=self.lease_id)
        self.joined = True
        await self._end_reaped_here()

    async def _end_reaped_here(self) -> None:
        """Back in the cluster after the leader wrote this node's sandboxes ended (its lease had
        expired): they are ended here too, so what every node reported holds."""
        for sandbox_id, owner in list(self.view.owners.items()):
            if owner.node_id == self.node_id and owner.ended_at and self.cubelet.live(sandbox_id) is not None:
                await self.cubelet.kill(sandbox_id, reason=f"the cluster ended it: {owner.reason}")

    async def _end_records_of_ended(self) -> None:
        """The records of this node's sandboxes that ended here (killed, timed out, crashed) written
        ended, with when and why as this node's store has it: every node then answers so, and
        the leader collects them after the retention period."""
        for sandbox_id, owner in list(self.view.owners.items()):
            if owner.node_id != self.node_id or owner.ended_at or self.cubelet.live(sandbox_id) is not None:
                continue
            stored = self.cubelet.store.get_sandbox(sandbox_id)
            ended_at = (stored.ended_at if stored is not None else 0.0) or time.time()
            reason = (stored.end_reason if stored is not None else "") or f"it ended on node {self.node_id}"
            await rewrite(self.etcd, self.view, sandbox_id, replace(owner, ended_at=ended_at, reason=reason))

    async def _keep_alive(self) -> None:
        """Renew the lease, and rewrite the record with the capacity of the moment, every third of
        the TTL; a lease etcd let expire (unreachable for a TTL) is granted anew."""
        while True:
            await trio.sleep(max(self.settings.lease_ttl_s / 3, 0.5))
            if self.node_id in self.view.removed:
                log.error("cluster: node %s was removed from the cluster; leaving it", self.node_id)
                await self.leave()
                self.joined = False
                return
            try:
                if await self.etcd.keepalive(self.lease_id) <= 0:
                    log.warning("cluster: this node's lease expired; joining again")
                    await self._join()
                    continue
                await self.etcd.put(node_key(self.node_id), self.record().encode(), lease=self.lease_id)
                await self._end_records_of_ended()
                await self.keys.flush_use()
                if await campaign(self.etcd, self.view, self.node_id, self.lease_id):
                    await reap(self.etcd, self.view, self.node_id, time.time(), self.record_retention_s)
            except NodeRemoved as exc:
                log.error("cluster: %s", exc)
                self.joined = False
                return
            except EtcdError as exc:
                log.warning("cluster membership: %s", exc)

    async def leave(self) -> None:
        """Revoke the lease: this node's record goes at once (bounded: etcd may be gone)."""
        with trio.move_on_after(LEAVE_TIMEOUT_S), trio.CancelScope(shield=True):
            try:
                if self.lease_id:
                    await self.etcd.revoke(self.lease_id)
            except EtcdError as exc:
                log.warning("cluster: leaving: %s", exc)

    # Placement and ownership.

    def placement_for(self, name: str, principal: Principal) -> list[NodeRecord]:
        """`placement` of the template `name` means to `principal` here (the SDKs' default names,
        aliases: by its id); a name unknown here is looked for as it is."""
        manifest = self.resolve(name, principal)
        return self.placement(manifest.template_id if manifest is not None else name)

    def placement(self, template: str) -> list[NodeRecord]:
        return placement(self.view, self.node_id, template)

    def owner(self, sandbox_id: str) -> SandboxOwner | None:
        return self.view.owners.get(sandbox_id)

    async def record_sandbox(self, sandbox_id: str, team_id: str) -> None:
        """The sandbox→node record, written once (create-only): a second write of the same id is
        refused by etcd, whichever node tries it."""
        owner = SandboxOwner(self.node_id, team_id)
        existing = await self.etcd.create(sandbox_key(sandbox_id), owner.encode())
        if existing is not None:
            log.error(
                "cluster: sandbox %s is already recorded (%r); not overwritten", sandbox_id, existing.value
            )
        else:
            self.view.owners.setdefault(sandbox_id, owner)  # before the watch brings it back

    async def ask_others(self, principal: Principal, path: str, query: str) -> list[tuple[str, NodeAnswer]]:
        """`GET path?query` as every other live node answers it for `principal` (those that do not
        answer left out), by node id."""
        answers = []
        for node in sorted(self.view.nodes.values(), key=lambda n: n.node_id):
            if node.node_id == self.node_id:
                continue
            answer = await ask_node(
                self.client, self.token, node.node_id, node.cluster_url, path, query, principal
            )
            if answer is not None:
                answers.append((node.node_id, answer))
        return answers
