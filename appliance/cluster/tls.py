"""TLS between the nodes of a cluster: a CA every holder of the cluster token derives, each node's
own certificate from it, and the SSL contexts node-to-node traffic uses both ways (mutual TLS).

The cluster CA's key is derived from the cluster token (HKDF-SHA256 → a P-256 scalar), so every
node that has the token has the CA, and nothing has to be handed out, stored in etcd or kept in
step: whoever holds the token is a node already (it is the cluster's root secret,
cluster/forwarding.py). Its certificate is built from the key alone (fixed name, serial and
validity), the same on every node. At each start a node makes a new key and a certificate for
the address it advertises (`node_url`'s host: an IP address or DNS name), signed by that CA, for
server and client use, kept in `<state_dir>/cluster-tls/` (0700; the key 0600).

Node-to-node traffic (forwarded API calls and sandbox traffic, the WebSocket relay, the lists
asked of other nodes, template pulls) goes to the other node's cluster listener (`cluster_port`,
its `cluster_url` in etcd) over TLS 1.3 only, each side verifying the other's certificate
against the cluster CA alone (not the system's CAs), the client also checking the name or
address it dialled against the certificate. A server without a certificate from the cluster CA
for the address its record names (a fake node registered in etcd, an address taken over) fails
the handshake before any request leaves; a client without one cannot talk to the listener. A
request carrying the cluster token anywhere else (the plain API port, the public TLS port) is
refused (proxy/node_hop.py): the token never has to cross the network outside node-to-node TLS.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypercorn.config import Config as HypercornConfig

# The order of P-256's group (SEC 2): a private scalar is in [1, n - 1].
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
CA_SALT = b"cube cluster CA"
CA_INFO = b"cube cluster CA key, P-256, v1"
CA_NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
CA_NOT_AFTER = dt.datetime(2124, 1, 1, tzinfo=dt.UTC)
# A node's certificate is made anew at each start; it outlives any run of the service.
NODE_VALIDITY = dt.timedelta(days=3650)
TLS_DIR = "cluster-tls"


def derive_ca_key(token: str) -> ec.EllipticCurvePrivateKey:
    """The cluster CA's private key, the same for every holder of `token` (and no one else)."""
    # 48 bytes reduced modulo n - 1: the bias is 2^-128, negligible (FIPS 186-4 B.4.1's method).
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=CA_SALT, info=CA_INFO).derive(token.encode())
    scalar = int.from_bytes(okm, "big") % (P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The CA's self-signed certificate: its name, serial and validity depend on its key only, so
    every node builds the same one (but for the signature's random part, which nothing compares)."""
    public = key.public_key()
    fingerprint = hashlib.sha256(
        public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).digest()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Cube cluster CA {fingerprint[:8].hex()}")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(int.from_bytes(fingerprint[:16], "big") >> 1 or 1)
        .not_valid_before(CA_NOT_BEFORE)
        .not_valid_after(CA_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _subject_alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def node_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    node_id: str,
    host: str,
    key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
) -> x509.Certificate:
    """Node `node_id`'s certificate for `host` (the address its record advertises), server and
    client use, signed by the cluster CA."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + NODE_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_subject_alt_name(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class NodeTls:
    """This node's cluster CA and certificate files, and the SSL contexts made from them."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def issue(cls, state_dir: Path, token: str, node_id: str, host: str) -> NodeTls:
        """The CA derived from `token` and a new key and certificate for this node at `host`,
        written under `state_dir` (the key readable by its owner only)."""
        directory = state_dir / TLS_DIR
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        ca_key = derive_ca_key(token)
        ca_cert = ca_certificate(ca_key)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = node_certificate(ca_key, ca_cert, node_id, host, key, now)
        tls = cls(directory / "ca.pem", directory / "node.pem", directory / "node-key.pem")
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write(tls.key_file, key_pem, 0o600)
        _write(tls.cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(tls.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return tls

    def _context(self, purpose: ssl._SSLMethod) -> ssl.SSLContext:
        context = ssl.SSLContext(purpose)
        context.minimum_version = ssl.TLSVersion.TLSv1_3  # both ends are ours
        context.load_verify_locations(cafile=str(self.ca_file))  # the cluster CA, nothing else
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """For calls to another node: its certificate verified (the cluster CA's, for the address
        dialled), this node's own presented."""
        context = self._context(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = True
        return context

    def server_context(self) -> ssl.SSLContext:
        """For the cluster listener: the caller's certificate required, the cluster CA's."""
        context = self._context(ssl.PROTOCOL_TLS_SERVER)
        context.set_alpn_protocols(["http/1.1"])
        return context


class PlaintextRefused(httpx.AsyncBaseTransport):
    """The node clients' transport for `http://`: a record in etcd naming a plain URL (written by
    whoever can write etcd) gets no request, so no token and no caller's traffic, in clear."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.UnsupportedProtocol(f"node-to-node calls are TLS only, not to {request.url.host}")


class ListenerConfig(HypercornConfig):
    """Hypercorn's config for the cluster listener: its SSL context is the node's server context
    (hypercorn's own would take any certificate its CA file names, with TLS 1.2)."""

    def __init__(self, tls: NodeTls, bind: str) -> None:
        super().__init__()
        self.node_tls = tls
        self.bind = [bind]
        self.insecure_bind = []
        # Hypercorn serves TLS when these are set; the context itself is ours (below).
        self.certfile = str(tls.cert_file)
        self.keyfile = str(tls.key_file)

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self.node_tls.server_context()
