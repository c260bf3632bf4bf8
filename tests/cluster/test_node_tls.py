"""Node-to-node TLS (cluster/tls.py), attacked.

- A fake node registered in etcd (what anyone who can write etcd can do) at a loopback address,
  presenting a self-signed certificate, a certificate of another cluster's CA, or speaking plain
  HTTP, gets nothing from node A: no forwarded API call, no sandbox traffic, no WebSocket, no
  list, no create, so no cluster token, team or access token. A answers 502 (its node is
  unreachable) as for a node that is down.
- The cluster listener takes no caller without a certificate of the cluster CA (none, a
  self-signed one, another cluster's) and no plain HTTP; the cluster token in plain HTTP at the
  API port is refused (test_two_nodes.py::test_node_to_node_auth_cannot_be_forged).
- The CA is the same for every holder of the token and another for another token.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import wsproto.events as ws
from cluster_nodes import as_node, cluster_of, cube_node, new_key, wait_for, websocket_echo
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.cluster.membership import NodeRecord, SandboxOwner, node_key, sandbox_key
from appliance.cluster.tls import NodeTls, derive_ca_key

if TYPE_CHECKING:
    from conftest import EtcdCluster, ServiceHarness


@dataclass
class FakeNode:
    """A server on loopback that records every connection and every byte it could read from one."""

    tls: ssl.SSLContext | None
    listener: socket.socket = field(default_factory=socket.socket)
    connections: int = 0
    received: bytes = b""
    stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        port = self.listener.getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    def serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.settimeout(5)
            try:
                stream = self.tls.wrap_socket(conn, server_side=True) if self.tls else conn
            except (OSError, ssl.SSLError):
                conn.close()
                continue  # the handshake failed: nothing was sent to us
            with stream:
                try:
                    self.received += stream.recv(65536)
                except (OSError, ssl.SSLError):
                    pass


StartFake = Callable[[ssl.SSLContext | None], FakeNode]


@pytest.fixture
def fake_node() -> Iterator[StartFake]:
    started: list[tuple[FakeNode, threading.Thread]] = []

    def start(tls: ssl.SSLContext | None) -> FakeNode:
        fake = FakeNode(tls)
        fake.listener.bind(("127.0.0.1", 0))
        fake.listener.listen()
        thread = threading.Thread(target=fake.serve, daemon=True)
        thread.start()
        started.append((fake, thread))
        return fake

    yield start
    for fake, thread in started:
        fake.stopped.set()
        thread.join(timeout=10)
        fake.listener.close()


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a self-signed certificate for 127.0.0.1 (what anyone can make)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "fake.pem", tmp_path / "fake-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


def other_cluster(tmp_path: Path) -> NodeTls:
    """A node of another cluster (another token) at 127.0.0.1: a valid chain, the wrong CA."""
    return NodeTls.issue(tmp_path / "other", "another cluster's token " + "x" * 32, "a", "127.0.0.1")


def etcd_put(etcd: EtcdCluster, key: bytes, value: bytes) -> None:
    body = {"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()}
    assert httpx.post(f"{etcd.endpoints[0]}/v3/kv/put", json=body, trust_env=False).status_code == 200


def test_a_fake_node_registered_in_etcd_gets_no_request(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str],
    etcd_of: EtcdCluster,
    fake_node: StartFake,
    tmp_path: Path,
) -> None:
    a, _b, _key = two_nodes
    victim = new_key(a, "victim")
    headers = {"X-API-KEY": victim["key"]}
    fakes = {
        "self-signed": fake_node(self_signed(tmp_path)),
        "other-cluster": fake_node(other_cluster(tmp_path).server_context()),
        "plaintext": fake_node(None),
    }
    for name, fake in fakes.items():
        record = NodeRecord(
            node_id=name,
            api_url=fake.url,
            cluster_url=fake.url,
            runtime="fake",
            cpus=64,
            memory_budget_mb=1 << 20,  # the most free memory: placement's first choice
            memory_committed_mb=0,
            free_pool_slots=0,
            templates=["code-interpreter", "ci"],
        )
        etcd_put(etcd_of, node_key(name), record.encode())
        etcd_put(etcd_of, sandbox_key(f"sbx{name}"), SandboxOwner(name, victim["team"]).encode())
    cube_node(a, "drain", "b")  # a create through A: the fake nodes, else A itself
    wait_for(a, lambda c: set(fakes) <= set(c.view.nodes) and "b" in c.view.drained)

    with httpx.Client(base_url=a.url, headers=headers, timeout=30, trust_env=False) as api:
        for name in fakes:
            sandbox_id = f"sbx{name}"
            got = api.get(f"/sandboxes/{sandbox_id}")
            assert got.status_code == 502, got.text
            assert got.json()["message"] == f"node {name}, which runs sandbox {sandbox_id}, is unreachable"
            traffic = api.post("/echo", content=b"secret", headers={"E2b-Sandbox-Id": sandbox_id})
            assert traffic.status_code == 502, traffic.text
            socket_to = websocket_echo(a.url, {"E2b-Sandbox-Id": sandbox_id, "X-Access-Token": "t"}, "x")
            assert isinstance(socket_to, ws.RejectConnection) and socket_to.status_code == 502
        listed = api.get("/sandboxes")
        assert listed.status_code == 200 and listed.json() == []
        created = api.post("/sandboxes", json={})
        assert created.status_code == 201, created.text  # placed on a fake node, made on A
        assert a.run_sync_in_service(lambda: a.running.cubelet.live(created.json()["sandboxID"]) is not None)  # type: ignore[union-attr]

    for name, fake in fakes.items():
        assert fake.received == b"", (name, fake.received)
    # The TLS fakes were dialled (and failed A's check); the plain one never: http:// is refused.
    assert fakes["self-signed"].connections > 0 and fakes["other-cluster"].connections > 0
    assert fakes["plaintext"].connections == 0
    assert cluster_of(a).token.encode() not in b"".join(f.received for f in fakes.values())


def test_the_cluster_listener_takes_only_the_clusters_nodes(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str], tmp_path: Path
) -> None:
    a, b, _key = two_nodes
    url = cluster_of(b).cluster_url + "/sandboxes"
    token = {"x-cube-cluster-token": cluster_of(a).token}
    with as_node(a, b, "t") as from_a:
        assert from_a.get("/sandboxes").status_code == 200  # a node of the cluster

    ca_only = ssl.create_default_context(cafile=str(cluster_of(a).tls.ca_file))  # no client certificate
    other = other_cluster(tmp_path).client_context()  # a valid certificate of another CA
    other.load_verify_locations(cafile=str(cluster_of(a).tls.ca_file))
    for verify in (ca_only, other):  # no certificate; another cluster's
        with pytest.raises(httpx.TransportError):
            httpx.get(url, headers=token, verify=verify, trust_env=False, timeout=10)
    with pytest.raises(httpx.TransportError):  # plain HTTP at the TLS listener: no answer
        httpx.get(url.replace("https://", "http://"), headers=token, trust_env=False, timeout=10)
    # B's certificate is for the address B advertises, from the CA A derives from the token.
    b_cert = x509.load_pem_x509_certificate(cluster_of(b).tls.cert_file.read_bytes())
    a_ca = x509.load_pem_x509_certificate(cluster_of(a).tls.ca_file.read_bytes())
    b_cert.verify_directly_issued_by(a_ca)
    san = b_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert (cluster_of(b).tls.key_file.stat().st_mode & 0o777) == 0o600


def test_the_ca_is_the_tokens_alone(tmp_path: Path) -> None:
    token = "t" * 64

    def public(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    assert public(derive_ca_key(token)) == public(derive_ca_key(token))
    assert public(derive_ca_key(token)) != public(derive_ca_key(token + "u"))
    one = NodeTls.issue(tmp_path / "one", token, "n1", "10.0.0.1")
    two = NodeTls.issue(tmp_path / "two", token, "n2", "node2.example")
    for node, ca in ((one, two), (two, one)):  # each node's certificate verifies with the other's CA
        cert = x509.load_pem_x509_certificate(node.cert_file.read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.ca_file.read_bytes()))
