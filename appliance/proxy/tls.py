"""The appliance's own CA and the wildcard server certificate for `*.<domain>` and `api.<domain>`.

Kept in `<state_dir>/ca/`: `ca.pem` (give it to clients as SSL_CERT_FILE, or
append it to the system bundle), `ca-key.pem`, and `server.pem`/`server-key.pem`,
re-issued when the domain changes or the certificate nears expiry.

Clients trust the CA system-wide, so it is name-constrained (critical NameConstraints)
to the appliance's domain: a certificate it signed for any other name, or for an IP
address, fails verification, even if its key leaks. A CA made before it carried the
constraint, or for another domain, is replaced (kept as `ca.pem.old`; clients must
trust the new `ca.pem`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.net.certificates import ca_certificate, key_pem, leaf_certificate, write_private

log = logging.getLogger(__name__)

CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=397)
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def ca_dir(state_dir: Path) -> Path:
    return state_dir / "ca"


def ca_cert_path(state_dir: Path) -> Path:
    return ca_dir(state_dir) / "ca.pem"


def name_constraints(domain: str) -> x509.NameConstraints:
    """Names under `domain` only; no IP address at all."""
    return x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(domain)],
        excluded_subtrees=[
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ],
    )


def _constrained_to(cert: x509.Certificate, domain: str) -> bool:
    try:
        found = cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return False
    return found.critical and found.value == name_constraints(domain)


def _load_or_create_ca(directory: Path, domain: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        if _constrained_to(cert, domain):
            return cert, key
        log.warning(
            "replacing the appliance CA %s (not limited to the domain %s): clients must trust the new one",
            cert_path,
            domain,
        )
        cert_path.replace(cert_path.with_suffix(".pem.old"))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca_certificate("Cube appliance CA", key, CA_VALIDITY, [(name_constraints(domain), True)])
    write_private(key_path, key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _server_cert_current(path: Path, names: list[str], ca_cert: x509.Certificate) -> bool:
    if not path.exists():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False  # signed by a CA replaced since
    if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < RENEW_BEFORE:
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sorted(san.get_values_for_type(x509.DNSName)) == sorted(names)


def ensure_tls_files(state_dir: Path, domain: str) -> TlsFiles:
    """Create the CA once, and a server certificate for the current domain when needed."""
    directory = ca_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _load_or_create_ca(directory, domain)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    names = [f"*.{domain}", f"api.{domain}", domain]
    if _server_cert_current(files.server_cert, names, ca_cert) and files.server_key.exists():
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    cert = leaf_certificate(names, key, ca_cert, ca_key, SERVER_VALIDITY, dt.timedelta(minutes=5))
    write_private(files.server_key, key_pem(key))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files
