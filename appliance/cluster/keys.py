"""API keys and teams across a cluster: kept in etcd, so a key made at any node works at every
node (behind a load balancer too), and a key revoked at any node stops working at every node.

`/cube/keys/<SHA-256 of the key>` holds the key's record (id, name, team, prefix, when it was
made and revoked; cluster/membership.py), never the key: who reads etcd learns no key. Every
node checks a presented key against its watched view of these records (no etcd round trip per
request; sandboxes keep answering with etcd down), so a revocation reaches a node with the
watch's next event. A revoked key's record stays, marked revoked (as in a node's SQLite): a
node that publishes its own keys again at its next start (`publish`, create-only) cannot bring
it back. A team is the set of keys that share its id; a key whose record names the admin's
system team (or none) is refused, so a write into etcd cannot make an admin.

A key's last use (`lastUsedAt`) is noted in memory when it authenticates (no I/O per request) and
written to `/cube/key-use/<hash>` by the node's membership tick, only when the cluster's last
use of it (the watched view) is older than a minute: at most one write per key and minute, apart
from the key's record (a revoke, a transaction on the record, never races it).

A single node keeps its keys in its SQLite (api/auth.py `LocalKeys`); a node joining a cluster
publishes its SQLite's keys into etcd, each only if that key is not there yet.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from appliance.cluster.etcd import EtcdClient, EtcdError, ModRevision, Put
from appliance.cluster.membership import KEY_USE, KEYS, ClusterView, decode_api_key, encode_api_key
from appliance.records import ApiKeyRecord
from appliance.tenancy import SYSTEM_TEAM, hash_api_key, new_api_key, new_key_id

log = logging.getLogger(__name__)

KEY_USE_RESOLUTION_S = 60.0  # a key's last use is written at most this often (as a node's SQLite)


def api_key_key(key_hash: str) -> bytes:
    return KEYS + key_hash.encode()


def usable(record: ApiKeyRecord | None) -> bool:
    """A key that may authenticate: not revoked, in a team that is not the admin's."""
    return (
        record is not None
        and record.revoked_at is None
        and bool(record.team_id)
        and record.team_id != SYSTEM_TEAM
    )


class ClusterKeys:
    """The `api.auth.ApiKeys` of a cluster node: checks against the watched view, changes in etcd."""

    def __init__(self, etcd: EtcdClient, view: ClusterView) -> None:
        self.etcd = etcd
        self.view = view
        self.used: dict[str, float] = {}  # keys used here since the last flush, by hash

    def check_api_key(self, key: str) -> ApiKeyRecord | None:
        key_hash = hash_api_key(key)
        record = self.view.api_keys.get(key_hash)
        if record is None or not usable(record):
            return None
        self.used[key_hash] = time.time()
        return record

    def _with_last_use(self, key_hash: str, record: ApiKeyRecord) -> ApiKeyRecord:
        last = max(self.view.key_use.get(key_hash, 0.0), self.used.get(key_hash, 0.0))
        return dataclasses.replace(record, last_used_at=last or None)

    async def flush_use(self) -> int:
        """Write the last use of the keys used here whose last use in the cluster is older than
        KEY_USE_RESOLUTION_S; how many were written."""
        written = 0
        for key_hash, at in list(self.used.items()):
            if at - self.view.key_use.get(key_hash, 0.0) >= KEY_USE_RESOLUTION_S:
                await self.etcd.put(KEY_USE + key_hash.encode(), repr(at).encode())
                self.view.key_use[key_hash] = at  # the watch brings it too
                written += 1
            if self.used.get(key_hash) == at:  # not used again meanwhile
                del self.used[key_hash]
        return written

    def active_key(self, key_id: str) -> ApiKeyRecord | None:
        """The key with this id, unless revoked (a dashboard session names its key by id)."""
        return next((r for r in self.view.api_keys.values() if r.key_id == key_id and usable(r)), None)

    async def create_api_key(self, name: str, team_id: str | None = None) -> tuple[ApiKeyRecord, str]:
        """A new key in `team_id` (an existing team: the caller checks), else in a team of its own."""
        key = new_api_key()
        taken = {r.key_id for r in self.view.api_keys.values()}
        key_id = new_key_id()
        while key_id in taken:  # the id revokes it: unique in the cluster, not only on this node
            key_id = new_key_id()
        record = ApiKeyRecord.new(key, key_id, name, team_id)
        key_hash = hash_api_key(key)
        if await self.etcd.create(api_key_key(key_hash), encode_api_key(record)) is not None:
            raise EtcdError("a key with the new key's hash exists already")  # 2^-160: never
        self.view.api_keys[key_hash] = record  # usable here at once; the watch brings it too
        return record, key

    async def _records(self) -> list[tuple[bytes, int, ApiKeyRecord]]:
        """(etcd key, mod revision, record with its last use) of every key as etcd has it now."""
        found = []
        for kv in await self.etcd.prefix(KEYS):
            try:
                record = self._with_last_use(kv.key[len(KEYS) :].decode(), decode_api_key(kv.value))
                found.append((kv.key, kv.mod_revision, record))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring the unreadable cluster key %r: %s", kv.key, exc)
        return found

    async def team_exists(self, team_id: str) -> bool:
        return any(record.team_id == team_id for _, _, record in await self._records())

    async def list_api_keys(self) -> list[ApiKeyRecord]:
        return sorted((record for _, _, record in await self._records()), key=lambda r: r.created_at)

    async def revoke_api_key(self, key_id: str) -> bool:
        """Mark the key revoked in etcd (only if its record is as just read); False if no active
        key has that id. This node refuses it at once; the others with their watch's next event."""
        revoked = False
        for etcd_key, revision, record in await self._records():
            if record.key_id != key_id or record.revoked_at is not None:
                continue
            ended = dataclasses.replace(record, revoked_at=time.time())
            result = await self.etcd.txn(
                [ModRevision(etcd_key, revision)], [Put(etcd_key, encode_api_key(ended))]
            )
            if result.succeeded:
                self.view.api_keys[etcd_key[len(KEYS) :].decode()] = ended
                revoked = True
        return revoked

    async def publish(self, local: list[tuple[str, ApiKeyRecord]]) -> int:
        """This node's own keys (hash, record), each written only if etcd has no record of that key
        (a key the cluster revoked stays revoked); how many were written."""
        written = 0
        for key_hash, record in local:
            if key_hash in self.view.api_keys:
                continue
            if await self.etcd.create(api_key_key(key_hash), encode_api_key(record)) is None:
                self.view.api_keys.setdefault(key_hash, record)
                written += 1
        return written
