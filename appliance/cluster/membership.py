"""What the cluster's keys in etcd hold, and the watched view of them every node keeps.

Keys (all under `/cube/`):
- `/cube/nodes/<node id>`: a `NodeRecord` (JSON), written under the node's lease: when the node
  stops renewing it (a crash, a kill -9, a partition) etcd deletes it after the TTL.
- `/cube/drain/<node id>`: present while the node is drained (no new placements); any node or
  `cube node drain` writes it, and it outlives the node's lease.
- `/cube/sandboxes/<sandbox id>`: a `SandboxOwner` (JSON), written once with a create-only
  transaction by the node the sandbox was created on; rewritten as ended (when, why) by that node
  once the sandbox ended there, or by the leader once that node has left, and deleted by the
  leader after the retention period (cluster/leader.py). Each rewrite is a transaction compared
  with the record's revision as last seen (and, the leader's, with the leader key still naming
  it): a stale view or a leader that was replaced changes nothing.
- `/cube/removed/<node id>`: present once `cube node remove` took the node out: it leaves and
  does not join again while the key is there (`cube node remove --undo` deletes it).
- `/cube/leader`: the elected leader's node id, created only if absent, under that node's lease.
- `/cube/keys/<SHA-256 of an API key>`: the key's record (cluster/keys.py): its id, name, team,
  prefix, when it was made and revoked; never the key itself.
- `/cube/key-use/<SHA-256 of an API key>`: when the key was last used (epoch seconds), written at
  most once a minute per key (cluster/keys.py); apart from the record, so it never races a revoke.
- `/cube/idempotency/<SHA-256 of team and key>`: a create's Idempotency-Key (cluster/idempotency.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import trio

from appliance.cluster.etcd import EtcdClient, EtcdError, EtcdUnavailable, KeyValue, WatchEvent
from appliance.records import ApiKeyRecord

log = logging.getLogger(__name__)

PREFIX = b"/cube/"
NODES = b"/cube/nodes/"
DRAIN = b"/cube/drain/"
SANDBOXES = b"/cube/sandboxes/"
REMOVED = b"/cube/removed/"
LEADER = b"/cube/leader"
KEYS = b"/cube/keys/"
KEY_USE = b"/cube/key-use/"
WATCH_RETRY_S = 1.0


def node_key(node_id: str) -> bytes:
    return NODES + node_id.encode()


def drain_key(node_id: str) -> bytes:
    return DRAIN + node_id.encode()


def sandbox_key(sandbox_id: str) -> bytes:
    return SANDBOXES + sandbox_id.encode()


def removed_key(node_id: str) -> bytes:
    return REMOVED + node_id.encode()


def left_reason(node_id: str) -> str:
    """Why a sandbox of a node that left is ended: the same words on every node."""
    return f"its node {node_id} left the cluster"


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    api_url: str  # this node's API as its callers reach it (shown by `cube node list`)
    runtime: str
    cpus: int
    memory_budget_mb: int
    memory_committed_mb: int
    free_pool_slots: int  # warm guests ready to be claimed, over every template
    templates: list[str] = field(default_factory=list)  # template ids and aliases present here
    started_at: float = 0.0
    # Where the other nodes reach it: its cluster listener, TLS with the cluster CA's certificates
    # (cluster/tls.py). "" (a node of a release before it) cannot be reached: never plain HTTP.
    cluster_url: str = ""

    @property
    def memory_free_mb(self) -> int:
        return self.memory_budget_mb - self.memory_committed_mb

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> NodeRecord:
        raw = json.loads(data)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


@dataclass(frozen=True)
class SandboxOwner:
    node_id: str
    team_id: str
    ended_at: float = 0.0  # once it ended on its node, or its node left (0: not known to have ended)
    reason: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> SandboxOwner:
        raw = json.loads(data)
        return cls(
            str(raw["node_id"]),
            str(raw["team_id"]),
            float(raw.get("ended_at", 0.0)),
            str(raw.get("reason", "")),
        )


def encode_api_key(record: ApiKeyRecord) -> bytes:
    """A key's record as etcd keeps it: no last-use time (not tracked across the cluster)."""
    fields = asdict(record)
    del fields["last_used_at"]
    return json.dumps(fields, sort_keys=True).encode()


def decode_api_key(data: bytes) -> ApiKeyRecord:
    raw = json.loads(data)
    revoked_at = raw.get("revoked_at")
    return ApiKeyRecord(
        key_id=str(raw["key_id"]),
        name=str(raw["name"]),
        prefix=str(raw["prefix"]),
        created_at=float(raw["created_at"]),
        revoked_at=float(revoked_at) if revoked_at is not None else None,
        last_used_at=None,
        team_id=str(raw["team_id"]),
    )


@dataclass
class ClusterView:
    """The nodes, the drained ones, the sandbox→node map and the API keys, as etcd has them, kept
    by one watch."""

    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    drained: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    owners: dict[str, SandboxOwner] = field(default_factory=dict)
    leader: str = ""  # the elected leader's node id ("" while there is none)
    revision: int = 0
    # Each sandbox record's last write (its mod revision): a rewrite is compared with it.
    record_revisions: dict[str, int] = field(default_factory=dict)
    api_keys: dict[str, ApiKeyRecord] = field(default_factory=dict)  # by the key's SHA-256
    key_use: dict[str, float] = field(default_factory=dict)  # a key's last use, by its SHA-256

    def node_row(self, node: NodeRecord) -> dict[str, object]:
        """A node as `cube node list` and the dashboard show it: its record, state and sandboxes."""
        return {
            **asdict(node),
            "state": "drained" if node.node_id in self.drained else "ready",
            "memory_free_mb": node.memory_free_mb,
            # recorded on this node (ended ones too, until they are collected)
            "sandboxes": sum(1 for owner in self.owners.values() if owner.node_id == node.node_id),
        }

    def node_rows(self) -> list[dict[str, object]]:
        return [self.node_row(n) for n in sorted(self.nodes.values(), key=lambda n: n.node_id)]

    def load(self, kvs: list[KeyValue], revision: int) -> None:
        self.nodes.clear()
        self.drained.clear()
        self.removed.clear()
        self.owners.clear()
        self.record_revisions.clear()
        self.api_keys.clear()
        self.key_use.clear()
        self.leader = ""
        for kv in kvs:
            self._apply(False, kv)
        self.revision = revision

    def apply(self, events: list[WatchEvent]) -> None:
        for event in events:
            self._apply(event.deleted, event.kv)
            self.revision = max(self.revision, event.kv.mod_revision)

    def _apply(self, deleted: bool, kv: KeyValue) -> None:
        if kv.key.startswith(SANDBOXES):
            name = kv.key[len(SANDBOXES) :].decode()
            if deleted:
                self.record_revisions.pop(name, None)
            else:
                self.record_revisions[name] = kv.mod_revision
        if kv.key == LEADER:
            self.leader = "" if deleted else kv.value.decode(errors="replace")
            return
        table: (
            dict[str, NodeRecord]
            | dict[str, SandboxOwner]
            | dict[str, ApiKeyRecord]
            | dict[str, float]
            | set[str]
        )
        for prefix, table, decode in (
            (NODES, self.nodes, NodeRecord.decode),
            (SANDBOXES, self.owners, SandboxOwner.decode),
            (KEYS, self.api_keys, decode_api_key),
            (KEY_USE, self.key_use, float),
            (DRAIN, self.drained, None),
            (REMOVED, self.removed, None),
        ):
            if not kv.key.startswith(prefix):
                continue
            name = kv.key[len(prefix) :].decode()
            if isinstance(table, set):
                (table.discard if deleted else table.add)(name)
            elif deleted:
                table.pop(name, None)
            else:
                try:
                    table[name] = decode(kv.value)  # type: ignore[assignment, misc]
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("ignoring the unreadable cluster key %r: %s", kv.key, exc)
            return


async def watch_view(etcd: EtcdClient, view: ClusterView, *, task_status: trio.TaskStatus[None]) -> None:
    """Keep `view` as etcd has it: a full read, then a watch from that revision; when etcd goes
    away, read everything again once it is back (what happened meanwhile is in the new read)."""
    started = False
    while True:
        try:
            kvs, revision = await etcd.snapshot(PREFIX)
            view.load(kvs, revision)
            if not started:
                task_status.started()
                started = True
            async for batch in etcd.watch(PREFIX, revision + 1):
                view.apply(batch)
        except EtcdUnavailable as exc:
            if not started:
                raise
            log.warning("cluster watch: %s; reading again in %.0f s", exc, WATCH_RETRY_S)
        except EtcdError as exc:
            log.warning("cluster watch: %s; reading again", exc)
        await trio.sleep(WATCH_RETRY_S)


async def read_view(etcd: EtcdClient) -> ClusterView:
    """The cluster as etcd has it now (what `cube node` shows)."""
    view = ClusterView()
    kvs, revision = await etcd.snapshot(PREFIX)
    view.load(kvs, revision)
    return view


async def set_drained(etcd: EtcdClient, node_id: str, drained: bool) -> None:
    """A drained node gets no new placements; its sandboxes run on. Outlives the node's lease."""
    if drained:
        await etcd.put(drain_key(node_id), b"1")
    else:
        await etcd.delete(drain_key(node_id))


def live_sandboxes(view: ClusterView, node_id: str) -> list[str]:
    """The sandboxes recorded on `node_id` and not (yet) written ended."""
    return sorted(
        sid for sid, owner in view.owners.items() if owner.node_id == node_id and not owner.ended_at
    )


async def remove_node(etcd: EtcdClient, node_id: str) -> None:
    """Take `node_id` out of the cluster: marked removed (it leaves and does not join again), its
    lease revoked (its record goes now, and the leader writes its sandboxes ended), not drained."""
    await etcd.put(removed_key(node_id), b"1")
    record = await etcd.get(node_key(node_id))
    if record is not None and record.lease:
        await etcd.revoke(record.lease)
    await etcd.delete(drain_key(node_id))


async def undo_remove(etcd: EtcdClient, node_id: str) -> bool:
    """Let a removed node join again; False if it was not removed."""
    return await etcd.delete(removed_key(node_id)) > 0
