"""appliance/cluster/etcd.py against real etcd members (Debian etcd-server) on loopback."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from freeports import free_ports

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


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
) -> x509.Certificate:
    """A CA (no issuer) or a certificate for 127.0.0.1 signed by `issuer`, valid for an hour."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write_pair(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{name}-key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return directory / f"{name}.pem"


async def test_an_etcd_behind_tls_with_client_certificates(tmp_path: Path) -> None:
    """etcd serving https only, requiring a client certificate its CA signed: reached with the
    config's CA and client certificate; refused without the certificate, and with another CA."""
    ca_key, client_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("test etcd CA", ca_key, None)
    ca_file = _write_pair(tmp_path, "ca", ca, ca_key)
    server = _write_pair(tmp_path, "server", _certificate("etcd", server_key, (ca, ca_key)), server_key)
    client = _write_pair(tmp_path, "client", _certificate("cube", client_key, (ca, ca_key)), client_key)
    client_port, peer_port = free_ports(2, range(32_000, 32_700))
    url = f"https://127.0.0.1:{client_port}"
    etcd = subprocess.Popen(
        [
            shutil.which("etcd") or "/usr/bin/etcd",
            "--name=tls",
            f"--data-dir={tmp_path / 'data'}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=tls=http://127.0.0.1:{peer_port}",
            f"--cert-file={server}",
            f"--key-file={tmp_path / 'server-key.pem'}",
            "--client-cert-auth",
            f"--trusted-ca-file={ca_file}",
        ],
        stdout=(tmp_path / "etcd.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        config = Config(
            etcd_endpoints=url,
            etcd_ca_file=ca_file,
            etcd_cert_file=client,
            etcd_key_file=tmp_path / "client-key.pem",
        )
        async with EtcdClient([url], security=etcd_security(config)) as tls:
            with trio.fail_after(60):
                while True:
                    assert etcd.poll() is None, (tmp_path / "etcd.log").read_text()[-2000:]
                    try:
                        await tls.put(b"/cube/tls", b"1")
                        break
                    except EtcdUnavailable:
                        await trio.sleep(0.2)
            found = await tls.get(b"/cube/tls")
            assert found is not None and found.value == b"1"
        async with EtcdClient([url], security=EtcdSecurity(ca_file=ca_file)) as no_certificate:
            with pytest.raises(EtcdUnavailable):
                await no_certificate.get(b"/cube/tls")
        # Its certificate, but the system's CAs: the server (signed by the test's CA) is not trusted.
        untrusted = EtcdSecurity(cert_file=client, key_file=tmp_path / "client-key.pem")
        async with EtcdClient([url], security=untrusted) as system_cas:
            with pytest.raises(EtcdUnavailable):
                await system_cas.get(b"/cube/tls")
    finally:
        etcd.terminate()
        etcd.wait(timeout=30)
