"""appliance/cluster/etcd.py against real etcd members (Debian etcd-server) on loopback."""

from __future__ import annotations

import base64
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from appliance.cluster.etcd import EtcdClient, EtcdError, EtcdSecurity, EtcdUnavailable, WatchEvent
from appliance.cluster.leader import reap
from appliance.cluster.membership import LEADER, SandboxOwner, read_view, sandbox_key
from appliance.cluster.node import ClusterConfigError, etcd_security
from appliance.config import Config

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


async def test_an_etcd_with_users_is_reached_as_the_configured_user(
    etcd: Callable[..., EtcdCluster], tmp_path: Path
) -> None:
    endpoint = etcd().endpoints[0]

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    async with httpx.AsyncClient(trust_env=False) as http:
        for path, body in (
            ("/v3/auth/user/add", {"name": "root", "password": "root-password"}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/user/add", {"name": "cube", "password": "s3cret"}),
            ("/v3/auth/role/add", {"name": "cube"}),
            (
                "/v3/auth/role/grant",
                {
                    "name": "cube",
                    "perm": {"permType": "READWRITE", "key": b64(b"/cube/"), "range_end": b64(b"/cube0")},
                },
            ),
            ("/v3/auth/user/grant", {"user": "cube", "role": "cube"}),
            ("/v3/auth/enable", {}),
        ):
            answer = await http.post(endpoint + path, json=body)
            assert answer.status_code == 200, (path, answer.text)

    async with EtcdClient([endpoint]) as anonymous:
        with pytest.raises(EtcdError):
            await anonymous.put(b"/cube/x", b"1")
    async with EtcdClient([endpoint], security=EtcdSecurity(user="cube", password="wrong")) as wrong:
        with pytest.raises(EtcdError, match="etcd refused the user 'cube'"):
            await wrong.get(b"/cube/x")

    # From the config: the password in a file only its owner reads.
    password_file = tmp_path / "etcd-password"
    password_file.write_text("s3cret\n")
    password_file.chmod(0o644)
    config = Config(etcd_endpoints=endpoint, etcd_user="cube", etcd_password_file=password_file)
    with pytest.raises(ClusterConfigError, match="readable by its owner only"):
        etcd_security(config)
    password_file.chmod(0o600)
    security = etcd_security(config)
    assert "s3cret" not in repr(security)
    async with EtcdClient([endpoint], security=security) as client:
        await client.put(b"/cube/x", b"1")
        kvs, revision = await client.snapshot(b"/cube/")
        assert [kv.value for kv in kvs] == [b"1"]
        with pytest.raises(EtcdError, match="permission denied"):
            await client.put(b"/elsewhere", b"1")  # the role reaches /cube/ only
        client._tokens[endpoint] = "no-longer-valid"  # as after a member's restart: a new token is taken
        await client.put(b"/cube/y", b"2")
        with trio.fail_after(30):
            async for batch in client.watch(b"/cube/", revision + 1):
                assert [e.kv.key for e in batch] == [b"/cube/y"]
                break
