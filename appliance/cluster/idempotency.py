"""Idempotency keys across a cluster: a create retried with the same `Idempotency-Key` through any
node gets the first create's sandbox, as a single node's SQLite gives it (api/sandboxes.py
`create_once`).

The node a create arrives at claims `/cube/idempotency/<SHA-256 of team and key>` with a
create-only transaction before placing it: first "pending" (under this node's membership lease,
so a node that dies mid-create does not hold the key for a day), then, once the create is
answered 201, the sandbox's id (under a lease of a day: the key is kept as long as a node's SQLite
keeps it). A create that failed gives the key up. A retry arriving anywhere finds the key: it
waits while the first is pending, then goes to the sandbox's node, whose own store (it ran the
create, with the same header) answers with the first create's body; a sandbox that ended, or
whose node left, is the same 409 as on a single node. The team and key are hashed: etcd's readers
learn neither.
"""

from __future__ import annotations

import hashlib
import json
import time

import trio

from appliance.cluster.etcd import Delete, EtcdClient, Put, ValueIs

IDEMPOTENCY = b"/cube/idempotency/"
KEEP_S = 24 * 3600  # as long as a node's store keeps a key (master/store.py IDEMPOTENCY_TTL_S)
LEASE_REUSE_S = 3600  # one lease for the keys of an hour: each kept between KEEP_S and an hour more
PENDING_POLL_S = 0.2
PENDING_WAIT_S = 600.0  # a first create still under way after this: the retry is refused (409)


class IdempotencyBusy(Exception):
    """The first create with this key is still under way after PENDING_WAIT_S."""


def idempotency_key(team_id: str, key: str) -> bytes:
    digest = hashlib.sha256(team_id.encode() + b"\0" + key.encode()).hexdigest()
    return IDEMPOTENCY + digest.encode()


class ClusterIdempotency:
    def __init__(self, etcd: EtcdClient, node_id: str) -> None:
        self.etcd = etcd
        self.node_id = node_id
        self._lease = 0
        self._lease_at = 0.0

    def _pending(self) -> bytes:
        return json.dumps({"pending": self.node_id}).encode()

    async def claim(self, team_id: str, key: str, node_lease: int) -> str | None:
        """None: this create is the first with `key` (claimed: `settle` it once answered); else the
        first create's sandbox id, once it has one (waits while it is pending elsewhere)."""
        etcd_key = idempotency_key(team_id, key)
        lease = node_lease or await self._keeping_lease()
        with trio.move_on_after(PENDING_WAIT_S):
            while True:
                existing = await self.etcd.create(etcd_key, self._pending(), lease=lease)
                if existing is None:
                    return None
                sandbox_id = json.loads(existing.value).get("sandbox_id")
                if sandbox_id:
                    return str(sandbox_id)
                await trio.sleep(PENDING_POLL_S)  # the first create is under way (its key may go)
        raise IdempotencyBusy(f"a create with Idempotency-Key {key!r} is still under way, retry later")

    async def settle(self, team_id: str, key: str, sandbox_id: str | None) -> None:
        """The claimed key now names the first create's sandbox, kept a day; or, if that create
        made none, given up (a retry creates). Only while the key is still this node's claim."""
        etcd_key = idempotency_key(team_id, key)
        if sandbox_id is None:
            done: Put | Delete = Delete(etcd_key)
        else:
            record = json.dumps({"sandbox_id": sandbox_id}).encode()
            done = Put(etcd_key, record, await self._keeping_lease())
        await self.etcd.txn([ValueIs(etcd_key, self._pending())], [done])

    async def _keeping_lease(self) -> int:
        """A lease of KEEP_S and an hour, granted anew each hour (one grant per hour, not per key)."""
        now = time.monotonic()
        if not self._lease or now - self._lease_at > LEASE_REUSE_S:
            self._lease = (await self.etcd.grant(KEEP_S + LEASE_REUSE_S)).lease_id
            self._lease_at = now
        return self._lease
