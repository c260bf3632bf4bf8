"""The appliance's egress CA, trusted by everything in the guest (run once as the agent starts).

The host puts the CA's certificate (public; its key never leaves the host) on the kernel command
line as `cube.egress_ca=<base64 DER>` (host: net/egress_tls.py). The egress proxy presents leaves
of it only for HTTPS to hosts a sandbox's `network.rules` name, so that it can set the rule's
headers (E2B's secrets) inside that TLS. Installed here, at boot, before a pooled guest is ever
claimed: the claim does not wait for it.

Where clients look:
- the system bundle /etc/ssl/certs/ca-certificates.crt (OpenSSL's default: Python's ssl, curl,
  wget, Debian's requests through its certifi), and /usr/local/share/ca-certificates/ so that an
  `update-ca-certificates` in the sandbox keeps it;
- environment every child of the agent inherits: NODE_EXTRA_CA_CERTS (Node's bundled store ignores
  the system's), REQUESTS_CA_BUNDLE and SSL_CERT_FILE naming the system bundle (requests and httpx
  from pip carry certifi's own bundle otherwise);
- Java's cacerts (its own JKS keystore, which Debian's ca-certificates-java fills from the system's
  certificates at build time): a trusted-certificate entry is added to the file here, in Python
  (keytool would start a JVM: seconds under UML); the JDKs' lib/security/cacerts link to it. A
  keystore that is not JKS or whose integrity does not check with the default password is left alone.
Standard library only, and only what the agent has loaded before envd answers (no `ssl` or
`hashlib`, which load OpenSSL, slow under UML: the keystore's SHA-1 is the interpreter's own
`_sha1`; no `base64`, deferred: guest/lazy_imports.py): PEM is base64 in 64-column lines.
"""

from __future__ import annotations

import _sha1
import binascii
import os
import sys
import time

CA_PARAMETER = "cube.egress_ca"  # net/egress_tls.py's CA_PARAMETER
CA_FILE = "/usr/local/share/ca-certificates/cube-egress-ca.crt"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
MAX_DER_BYTES = 4096
JAVA_CACERTS = "/etc/ssl/certs/java/cacerts"  # Debian's; /usr/lib/jvm/*/lib/security/cacerts link here
JAVA_ALIAS = "cube-egress-ca"
JKS_MAGIC = 0xFEEDFEED
JKS_VERSION = 2
JKS_PASSWORD = "changeit"  # the JDKs' and Debian's password of cacerts
JKS_TRUSTED_CERT = 2
JKS_PRIVATE_KEY = 1
JKS_DIGEST_BYTES = 20


def ca_from_cmdline(cmdline: str) -> str | None:
    """The PEM certificate the host put on the command line, or None."""
    for word in cmdline.split():
        name, _, value = word.partition("=")
        if name != CA_PARAMETER or not value:
            continue
        try:
            der = binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError):
            return None
        if not der or len(der) > MAX_DER_BYTES:
            return None
        body = binascii.b2a_base64(der, newline=False).decode()
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"
    return None


def install(
    pem: str, ca_file: str = CA_FILE, bundle: str = SYSTEM_BUNDLE, java_cacerts: str = JAVA_CACERTS
) -> dict[str, str]:
    """Put the certificate where clients read trust from; the environment variables naming it."""
    try:
        trust_in_java(pem, java_cacerts)
    except OSError as exc:  # Java's trust only: the rest still holds
        print(f"cube agent: Java's cacerts could not take the egress CA: {exc}", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(ca_file), exist_ok=True)
    _write_if_changed(ca_file, pem)
    os.makedirs(os.path.dirname(bundle), exist_ok=True)
    try:
        with open(bundle) as f:
            present = pem in f.read()
    except FileNotFoundError:
        present = False
    if not present:
        with open(bundle, "a") as f:
            f.write("\n" + pem if f.tell() else pem)
    return {"NODE_EXTRA_CA_CERTS": ca_file, "REQUESTS_CA_BUNDLE": bundle, "SSL_CERT_FILE": bundle}


def _write_if_changed(path: str, text: str) -> None:
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)


def trust_in_java(pem: str, cacerts: str = JAVA_CACERTS) -> None:
    """Add the certificate to Java's JKS keystore `cacerts` (if Java is installed) as a trusted
    certificate, once; the file is replaced atomically, its integrity digest recomputed."""
    try:
        with open(cacerts, "rb") as f:
            stored = f.read()
    except FileNotFoundError:
        return
    entries = jks_entries(stored)
    if entries is None:
        print(f"cube agent: {cacerts} is not a JKS keystore with the default password", file=sys.stderr)
        return
    der = _der_of(pem)
    ours = _jks_trusted_cert(JAVA_ALIAS, der)
    present = dict(entries).get(JAVA_ALIAS)
    if present is not None and present.endswith(der):
        return  # a second boot of the same disk
    kept = [raw for alias, raw in entries if alias != JAVA_ALIAS]
    header = [number.to_bytes(4, "big") for number in (JKS_MAGIC, JKS_VERSION, len(kept) + 1)]
    body = b"".join([*header, *kept, ours])
    temporary = cacerts + ".cube-new"
    with open(temporary, "wb") as f:
        f.write(body + _jks_digest(body))
    os.chmod(temporary, 0o644)
    os.replace(temporary, cacerts)


def _der_of(pem: str) -> bytes:
    body = "".join(line for line in pem.splitlines() if line and not line.startswith("-----"))
    return binascii.a2b_base64(body)


def _jks_digest(body: bytes) -> bytes:
    """JKS's integrity check: SHA-1 of the password (UTF-16BE), a fixed phrase and the contents."""
    return _sha1.sha1(JKS_PASSWORD.encode("utf-16-be") + b"Mighty Aphrodite" + body).digest()


def _jks_utf(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _jks_trusted_cert(alias: str, der: bytes) -> bytes:
    return (
        JKS_TRUSTED_CERT.to_bytes(4, "big")
        + _jks_utf(alias)
        + int(time.time() * 1000).to_bytes(8, "big")
        + _jks_utf("X.509")
        + len(der).to_bytes(4, "big")
        + der
    )


class _JksReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def take(self, n: int) -> bytes:
        if self.position + n > len(self.data):
            raise ValueError("truncated keystore")
        self.position += n
        return self.data[self.position - n : self.position]

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def skip_certificate(self) -> None:
        self.take(self.number(2))  # its type ("X.509")
        self.take(self.number(4))


def jks_entries(data: bytes) -> list[tuple[str, bytes]] | None:
    """The entries of a JKS keystore, each (alias, its bytes as stored), if `data` is one whose
    digest checks with JKS_PASSWORD; else None."""
    reader = _JksReader(data)
    try:
        if reader.number(4) != JKS_MAGIC or reader.number(4) != JKS_VERSION:
            return None
        entries = []
        for _ in range(reader.number(4)):
            start = reader.position
            tag = reader.number(4)
            alias = reader.take(reader.number(2)).decode(errors="replace")
            reader.take(8)  # its date
            if tag == JKS_PRIVATE_KEY:
                reader.take(reader.number(4))
                for _ in range(reader.number(4)):
                    reader.skip_certificate()
            elif tag == JKS_TRUSTED_CERT:
                reader.skip_certificate()
            else:
                return None
            entries.append((alias, data[start : reader.position]))
    except ValueError:
        return None
    body = data[: reader.position]
    if data[reader.position :] != _jks_digest(body):
        return None
    return entries


def install_from_cmdline(cmdline_path: str = "/proc/cmdline") -> None:
    """In a guest booted with the word: install and export it (the agent's children inherit the
    environment). Elsewhere (an agent run on a host, an image without a writable /etc): nothing."""
    try:
        with open(cmdline_path) as f:
            pem = ca_from_cmdline(f.read())
    except OSError:
        return
    if pem is None:
        return
    try:
        os.environ.update(install(pem))
    except OSError as exc:
        print(f"cube agent: the egress CA could not be installed: {exc}", file=sys.stderr, flush=True)
