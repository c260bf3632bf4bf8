"""TLS for the egress proxy: the appliance's egress CA, its leaf certificates, the ClientHello's SNI.

The egress CA is made once per appliance (`<state_dir>/egress-ca/`: the directory 0700, `ca-key.pem`
0600, never logged, never in a guest). Its certificate, and only that, goes to every guest at boot on
the kernel command line (`cube.egress_ca=<base64 DER>`, read by the guest agent at its start:
guest/egress_ca.py), so pooled guests hold it before any claim. It is not the appliance's own CA
(proxy/tls.py): that one is name-constrained to the appliance's domain, this one must sign for
whatever host a rule names.

The proxy uses it only for a connection whose ClientHello names (SNI) a ruled host that the
node resolver gave this sandbox the destination address for: it terminates that TLS with a leaf
for the name (made in memory, kept per name for a day), and opens TLS upstream verifying the
server against the host's trust store (or `egress_upstream_ca_file`: tests point it at their own
CA). Every other TLS connection is spliced untouched.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.net.certificates import ca_certificate, key_pem, leaf_certificate, write_private

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=7)
LEAF_REUSE_S = 24 * 3600.0
MAX_LEAVES = 1024  # leaf contexts kept (names a wildcard rule may cover are endless)
# The kernel command-line word carrying the CA certificate (guest/egress_ca.py reads it).
CA_PARAMETER = "cube.egress_ca"
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)

TLS_HANDSHAKE = 22
MAX_CLIENT_HELLO = 64 * 1024


def ca_directory(state_dir: Path) -> Path:
    return state_dir / "egress-ca"


def _new_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    return ca_certificate("Cube appliance egress CA", key, CA_VALIDITY), key


def load_or_create_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The egress CA of this appliance, made on first use."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc > dt.datetime.now(dt.UTC):
            return cert, key
    cert, key = _new_ca()
    write_private(key_path, key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _memory_file(data: bytes) -> int:
    """A file descriptor of an anonymous in-memory file holding `data` (nothing on disk)."""
    fd = os.memfd_create("cube-egress-leaf", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


@dataclass
class EgressTls:
    """The CA, leaf server contexts per name, and the upstream client context."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey = field(repr=False)
    upstream: ssl.SSLContext
    _leaves: dict[str, tuple[float, ssl.SSLContext]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, state_dir: Path, upstream_ca_file: Path | None = None) -> EgressTls:
        cert, key = load_or_create_ca(ca_directory(state_dir))
        return cls(cert, key, upstream_context(upstream_ca_file))

    def kernel_word(self) -> str:
        """`cube.egress_ca=<base64 DER>`: the certificate (public) for the guest's trust stores."""
        der = self.ca_cert.public_bytes(serialization.Encoding.DER)
        return f"{CA_PARAMETER}={base64.b64encode(der).decode()}"

    def server_context(self, name: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for `name` signed by the CA (HTTP/1.1 only)."""
        now = time.monotonic()
        kept = self._leaves.get(name)
        if kept is not None and kept[0] > now:
            return kept[1]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        chain, key = self._leaf(name)
        fd = _memory_file(chain + key)
        try:
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        while len(self._leaves) >= MAX_LEAVES:
            del self._leaves[min(self._leaves, key=lambda n: self._leaves[n][0])]
        self._leaves[name] = (now + LEAF_REUSE_S, context)
        return context

    def _leaf(self, name: str) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = leaf_certificate([name], key, self.ca_cert, self.ca_key, LEAF_VALIDITY, dt.timedelta(hours=1))
        pem = serialization.Encoding.PEM
        return cert.public_bytes(pem) + self.ca_cert.public_bytes(pem), key_pem(key)


def upstream_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifying TLS client context: the host's trust store, or only `ca_file` when set."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


# --- the ClientHello ---------------------------------------------------------


class NotClientHello(ValueError):
    """The bytes are not (the start of) a TLS ClientHello: the connection is spliced untouched."""


def client_hello_length(data: bytes) -> int | None:
    """How many bytes hold the whole ClientHello (its records); None if more must be read."""
    if data[:1] and data[0] != TLS_HANDSHAKE:
        raise NotClientHello("not a TLS handshake record")
    offset, handshake = 0, b""
    while True:
        if len(data) < offset + 5:
            return None
        if data[offset] != TLS_HANDSHAKE:
            raise NotClientHello("the handshake is interleaved with another record type")
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if len(data) < offset + 5 + length:
            return None
        handshake += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise NotClientHello("the first handshake message is not a ClientHello")
            if len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
                return offset
        if offset > MAX_CLIENT_HELLO:
            raise NotClientHello("ClientHello too large")


def server_name(data: bytes) -> str | None:
    """The host name a complete ClientHello (its records, as client_hello_length measured) names,
    lower case; None if it names none or not a valid DNS name."""
    handshake = b""
    offset = 0
    while offset + 5 <= len(data):
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        handshake += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
    try:
        return _sni_of(handshake[4 : 4 + int.from_bytes(handshake[1:4], "big")])
    except IndexError as exc:
        raise NotClientHello("truncated ClientHello") from exc


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def take(self, n: int) -> bytes:
        if self.position + n > len(self.data):
            raise IndexError("truncated")
        self.position += n
        return self.data[self.position - n : self.position]

    def vector(self, length_bytes: int) -> bytes:
        return self.take(int.from_bytes(self.take(length_bytes), "big"))

    def at_end(self) -> bool:
        return self.position >= len(self.data)


def _sni_of(hello: bytes) -> str | None:
    reader = _Reader(hello)
    reader.take(2 + 32)  # legacy version, random
    reader.vector(1)  # session id
    reader.vector(2)  # cipher suites
    reader.vector(1)  # compression methods
    if reader.at_end():
        return None  # no extensions
    extensions = _Reader(reader.vector(2))
    while not extensions.at_end():
        kind = int.from_bytes(extensions.take(2), "big")
        body = extensions.vector(2)
        if kind == 0:  # server_name
            return _first_host_name(body)
    return None


def _first_host_name(body: bytes) -> str | None:
    position = 2  # the list's length
    while position + 3 <= len(body):
        kind, length = body[position], int.from_bytes(body[position + 1 : position + 3], "big")
        name = body[position + 3 : position + 3 + length]
        position += 3 + length
        if kind == 0:
            try:
                text = name.decode("ascii").lower().rstrip(".")
            except UnicodeDecodeError:
                return None
            return text if _HOSTNAME.match(text) else None
    return None
