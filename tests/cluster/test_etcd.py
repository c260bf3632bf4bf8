"""appliance/cluster/etcd.py against real etcd members (Debian etcd-server) on loopback."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import trio

from appliance.cluster.etcd import EtcdClient, EtcdUnavailable, WatchEvent
from appliance.cluster.leader import reap
from appliance.cluster.membership import LEADER, SandboxOwner, read_view, sandbox_key

if TYPE_CHECKING:
    from conftest import EtcdCluster  # tests/cluster/conftest.py


async def test_put_range_delete_and_create_only_txn(etcd: Callable[..., EtcdCluster]) -> None:
    async with EtcdClient(etcd().endpoints) as client:
        await client.put(b"/t/a", b"1")
        await client.put(b"/t/b", b"\x00\xff binary")
        await client.put(b"/u", b"outside")
        assert [(kv.key, kv.value) for kv in await client.prefix(b"/t/")] == [
            (b"/t/a", b"1"),
            (b"/t/b", b"\x00\xff binary"),
        ]
        assert await client.get(b"/missing") is None

        assert await client.create(b"/t/new", b"first") is None
        existing = await client.create(b"/t/new", b"second")
        assert existing is not None and existing.value == b"first"
        got = await client.get(b"/t/new")
        assert got is not None and got.value == b"first"

        assert await client.delete(b"/t/", b"/t0") == 3
        assert await client.prefix(b"/t/") == []


async def test_a_lease_keeps_its_keys_until_revoked_or_expired(etcd: Callable[..., EtcdCluster]) -> None:
    async with EtcdClient(etcd().endpoints) as client:
        revoked = await client.grant(30)
        await client.put(b"/l/revoked", b"x", lease=revoked.lease_id)
        assert await client.keepalive(revoked.lease_id) > 0
        await client.revoke(revoked.lease_id)
        assert await client.get(b"/l/revoked") is None

        expiring = await client.grant(2)
        await client.put(b"/l/expiring", b"x", lease=expiring.lease_id)
        with trio.fail_after(30):  # etcd expires a lease within a few seconds of its TTL
            while await client.get(b"/l/expiring") is not None:
                await trio.sleep(0.2)
        assert await client.keepalive(expiring.lease_id) == 0


async def test_watch_streams_puts_and_deletes_from_a_revision(etcd: Callable[..., EtcdCluster]) -> None:
    async with EtcdClient(etcd().endpoints) as client:
        revision = await client.put(b"/w/before", b"0")
        seen: list[WatchEvent] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for batch in client.watch(b"/w/", revision):
                        seen.extend(batch)
                        if len(seen) >= 3:
                            nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                await client.put(b"/w/after", b"1")
                await client.put(b"/x/elsewhere", b"not seen")
                await client.delete(b"/w/before")
        assert [(e.deleted, e.kv.key) for e in seen] == [
            (False, b"/w/before"),
            (False, b"/w/after"),
            (True, b"/w/before"),
        ]


async def test_two_of_three_members_keep_the_cluster_working_none_is_unavailable(
    etcd: Callable[..., EtcdCluster],
) -> None:
    cluster = etcd(members=3)
    async with EtcdClient(cluster.endpoints) as client:
        await client.put(b"/q", b"3 of 3")
        cluster.members[0].stop(signal.SIGKILL)  # the first endpoint: calls go on to the next
        await client.put(b"/q", b"2 of 3")
        got = await client.get(b"/q")
        assert got is not None and got.value == b"2 of 3"
        for member in cluster.members[1:]:
            member.stop(signal.SIGKILL)
        with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
            await client.get(b"/q")


async def test_a_stale_view_or_a_replaced_leader_rewrites_no_record(etcd: Callable[..., EtcdCluster]) -> None:
    """The leader's rewrites are transactions: compared with the record's revision as its view
    saw it, and with /cube/leader still naming it."""
    async with EtcdClient(etcd().endpoints) as client:
        record = sandbox_key("sbx")
        await client.put(record, SandboxOwner("gone", "team").encode())
        await client.put(LEADER, b"b")  # b leads; a's view still says a does
        view = await read_view(client)
        view.leader = "a"
        await reap(client, view, "a", time.time(), 3600.0)
        stored = await client.get(record)
        assert stored is not None and SandboxOwner.decode(stored.value).ended_at == 0.0  # unchanged

        await client.put(LEADER, b"a")
        await client.put(record, SandboxOwner("gone", "team", reason="written meanwhile").encode())
        await reap(client, view, "a", time.time(), 3600.0)  # a's view predates that write
        stored = await client.get(record)
        assert stored is not None and SandboxOwner.decode(stored.value).reason == "written meanwhile"

        view = await read_view(client)  # current: the rewrite holds
        await reap(client, view, "a", time.time(), 3600.0)
        stored = await client.get(record)
        assert stored is not None
        assert SandboxOwner.decode(stored.value).reason == "its node gone left the cluster"
        view = await read_view(client)
        await reap(client, view, "a", time.time(), 0.0)  # past the retention: collected
        assert await client.get(record) is None
