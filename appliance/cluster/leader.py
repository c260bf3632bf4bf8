"""The elected leader: it reaps the sandboxes of nodes that left and collects their records.

Election: `/cube/leader` created only if absent (a create-only transaction), under the creating
node's own membership lease: the leader is whoever holds that key, and when it stops renewing its
lease (a crash, a partition) or leaves (its lease revoked) the key goes with it, and the next node
to try creates it. Every node tries on each of its membership ticks while there is no leader.
Nothing on the create path depends on the leader.

Reaping (leader only, on each tick): a sandbox record whose node is gone from the cluster is
rewritten as ended, with when and why, so every node reports the same ended sandbox
(proxy/node_hop.py); an ended record older than the retention period is deleted (records of
sandboxes that ended on a live node are written ended by that node: ClusterNode). Each write is a
transaction compared with the record's revision as this view saw it and with `/cube/leader` still
naming this node: a leader whose lease expired meanwhile (another was elected) writes nothing.
A node that comes back (its lease renewed or granted anew) ends its own sandboxes the leader
wrote as ended (`ClusterNode._end_reaped_here`), so what the cluster reported holds.
"""

from __future__ import annotations

import dataclasses
import logging

from appliance.cluster.etcd import Compare, Delete, EtcdClient, ModRevision, Put, ValueIs
from appliance.cluster.membership import LEADER, ClusterView, SandboxOwner, left_reason, sandbox_key

log = logging.getLogger(__name__)

# An ended sandbox's record is kept this long (every node answers "it ended: why" meanwhile).
RECORD_RETENTION_S = 24 * 3600.0


async def campaign(etcd: EtcdClient, view: ClusterView, node_id: str, lease_id: int) -> bool:
    """True if this node leads: it holds `/cube/leader`, or creates it now that none does."""
    if view.leader:
        return view.leader == node_id
    held = await etcd.create(LEADER, node_id.encode(), lease=lease_id)
    view.leader = node_id if held is None else held.value.decode(errors="replace")
    if held is None:
        log.info("cluster: node %s is the leader", node_id)
    return held is None


async def reap(etcd: EtcdClient, view: ClusterView, node_id: str, now: float, retention_s: float) -> None:
    """End the records of sandboxes whose node left; delete ended ones past `retention_s`. Each
    write holds only if the record is as this view last saw it and `node_id` still leads."""
    leading = ValueIs(LEADER, node_id.encode())
    for sandbox_id, owner in list(view.owners.items()):
        if not owner.ended_at and owner.node_id not in view.nodes:
            ended = dataclasses.replace(owner, ended_at=now, reason=left_reason(owner.node_id))
            if await rewrite(etcd, view, sandbox_id, ended, leading):
                log.info("cluster: sandbox %s ended: %s", sandbox_id, ended.reason)
        elif owner.ended_at and now - owner.ended_at >= retention_s:
            if await rewrite(etcd, view, sandbox_id, None, leading):
                log.info("cluster: the record of sandbox %s (ended) collected", sandbox_id)


async def rewrite(
    etcd: EtcdClient, view: ClusterView, sandbox_id: str, owner: SandboxOwner | None, *also: Compare
) -> bool:
    """The record of `sandbox_id` rewritten as `owner` (None: deleted) only if it is still at the
    revision this view has (and `also` holds); False, and nothing written, otherwise (the watch
    brings the newer record)."""
    key = sandbox_key(sandbox_id)
    revision = view.record_revisions.get(sandbox_id)
    if revision is None:
        return False  # not seen through the watch yet
    write: Put | Delete = Delete(key) if owner is None else Put(key, owner.encode())
    result = await etcd.txn([ModRevision(key, revision), *also], [write])
    if result.succeeded:
        if owner is None:
            view.owners.pop(sandbox_id, None)
        else:
            view.owners[sandbox_id] = owner
    return result.succeeded
