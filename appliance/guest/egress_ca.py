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
  from pip carry certifi's own bundle otherwise).
Standard library only, and only what the agent has loaded before envd answers (no `ssl`, slow under
UML; no `base64`, deferred: guest/lazy_imports.py): PEM is base64 in 64-column lines.
"""

from __future__ import annotations

import binascii
import os
import sys

CA_PARAMETER = "cube.egress_ca"  # net/egress_tls.py's CA_PARAMETER
CA_FILE = "/usr/local/share/ca-certificates/cube-egress-ca.crt"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
MAX_DER_BYTES = 4096


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


def install(pem: str, ca_file: str = CA_FILE, bundle: str = SYSTEM_BUNDLE) -> dict[str, str]:
    """Put the certificate where clients read trust from; the environment variables naming it."""
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
