"""The egress proxy's TLS pieces without a guest: the egress CA (made once, its key private), the
leaves it signs (valid for their name only), the SNI read from real ClientHellos, and the guest
side that trusts the CA (the certificate off the kernel command line into the bundle and env, and
into Java's JKS cacerts, checked by the JDK's own keytool)."""

from __future__ import annotations

import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from appliance.guest import egress_ca
from appliance.net.egress_tls import (
    EgressTls,
    NotClientHello,
    ca_directory,
    client_hello_length,
    server_name,
)


def client_hello(name: str | None) -> bytes:
    """The first flight of a real TLS client (Python's OpenSSL), addressed to `name`."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    """A full in-memory TLS handshake; raises ssl.SSLError if the client refuses the server."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(c_in, c_out, server_hostname=name)
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, tls in (("client", client_side), ("server", server_side)):
            if not done[side]:
                try:
                    tls.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_the_ca_is_made_once_and_its_key_is_private(tmp_path: Path) -> None:
    tls = EgressTls.load(tmp_path)
    directory = ca_directory(tmp_path)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "ca-key.pem").stat().st_mode) == 0o600
    again = EgressTls.load(tmp_path)
    assert again.ca_cert == tls.ca_cert  # the same CA at every start: guests keep trusting it
    key_pem = (directory / "ca-key.pem").read_bytes()
    assert b"PRIVATE KEY" in key_pem and key_pem not in tls.kernel_word().encode()
    assert "PRIVATE" not in repr(tls) and "ca_key" not in repr(tls)


def test_a_leaf_verifies_for_its_name_only_against_the_ca(tmp_path: Path) -> None:
    tls = EgressTls.load(tmp_path)
    ca_pem = tls.ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    trusting = ssl.create_default_context(cadata=ca_pem)
    handshake(tls.server_context("api.example.test"), trusting, "api.example.test")
    assert tls.server_context("api.example.test") is tls.server_context("api.example.test")  # kept
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls.server_context("api.example.test"), trusting, "other.example.test")
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the CA
        handshake(tls.server_context("api.example.test"), ssl.create_default_context(), "api.example.test")


def test_the_server_name_is_read_from_a_real_client_hello() -> None:
    hello = client_hello("API.Example.test")
    assert client_hello_length(hello) == len(hello)
    assert server_name(hello) == "api.example.test"
    assert client_hello_length(hello[:3]) is None and client_hello_length(hello[:-1]) is None
    assert server_name(client_hello(None)) is None  # no SNI (an IP address, say): never intercepted
    split = client_hello("split.example.test")  # one handshake message across two records
    body = split[5:]
    records = b"".join(
        bytes([22]) + split[1:3] + len(part).to_bytes(2, "big") + part for part in (body[:40], body[40:])
    )
    assert client_hello_length(records) == len(records) and server_name(records) == "split.example.test"
    for not_tls in (b"GET / HTTP/1.1\r\n", b"\x17\x03\x03\x00\x05hello"):
        with pytest.raises(NotClientHello):
            client_hello_length(not_tls)


def test_the_guest_trusts_the_ca_from_the_command_line(tmp_path: Path) -> None:
    tls = EgressTls.load(tmp_path)
    ca_pem = tls.ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"root=/dev/ubda cube.agent_token=t {tls.kernel_word()} quiet\n")
    pem = egress_ca.ca_from_cmdline(cmdline.read_text())
    assert pem == ca_pem
    bundle, ca_file = tmp_path / "certs" / "bundle.crt", tmp_path / "local" / "cube.crt"
    bundle.parent.mkdir()
    bundle.write_text("-----BEGIN CERTIFICATE-----\nother\n-----END CERTIFICATE-----\n")
    no_java = str(tmp_path / "no-java" / "cacerts")
    env = egress_ca.install(pem, str(ca_file), str(bundle), no_java)
    egress_ca.install(pem, str(ca_file), str(bundle), no_java)  # a second boot of the same disk: once only
    assert bundle.read_text().count(ca_pem) == 1 and bundle.read_text().startswith("-----BEGIN")
    assert ca_file.read_text() == ca_pem
    assert env == {
        "NODE_EXTRA_CA_CERTS": str(ca_file),
        "REQUESTS_CA_BUNDLE": str(bundle),
        "SSL_CERT_FILE": str(bundle),
    }
    assert egress_ca.ca_from_cmdline("cube.egress_ca=not*base64 quiet") is None
    assert egress_ca.ca_from_cmdline("root=/dev/ubda quiet") is None


def keytool(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("keytool")
    assert found is not None, "the JDK (openjdk-17-jdk-headless, installer/install.sh) is not installed"
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=120)


def test_java_trusts_the_ca_through_its_cacerts(tmp_path: Path) -> None:
    """The CA joins a JKS keystore made by keytool, once, and keytool (which checks the store's
    integrity digest with the password) lists it as a trusted certificate beside the one already
    there; a keystore of another password is left untouched."""
    other = EgressTls.load(tmp_path / "other")
    other_pem = tmp_path / "other.pem"
    other_pem.write_bytes(other.ca_cert.public_bytes(serialization.Encoding.PEM))
    cacerts, foreign = tmp_path / "cacerts", tmp_path / "foreign"
    for store, password in ((cacerts, egress_ca.JKS_PASSWORD), (foreign, "not-the-default")):
        made = keytool(
            "-importcert", "-noprompt", "-storetype", "JKS", "-keystore", str(store),
            "-storepass", password, "-alias", "debian:other.pem", "-file", str(other_pem),
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
    pem = egress_ca.ca_from_cmdline(EgressTls.load(tmp_path / "ours").kernel_word())
    assert pem is not None
    foreign_before = foreign.read_bytes()
    egress_ca.trust_in_java(pem, str(cacerts))
    once = cacerts.read_bytes()
    egress_ca.trust_in_java(pem, str(cacerts))  # a second boot of the same disk: unchanged
    egress_ca.trust_in_java(pem, str(foreign))
    assert cacerts.read_bytes() == once and foreign.read_bytes() == foreign_before
    listed = keytool("-list", "-keystore", str(cacerts), "-storepass", egress_ca.JKS_PASSWORD, "-rfc")
    assert listed.returncode == 0, listed.stderr
    assert "Your keystore contains 2 entries" in listed.stdout
    for alias in (egress_ca.JAVA_ALIAS, "debian:other.pem"):
        assert f"Alias name: {alias}" in listed.stdout
    assert pem.strip() in listed.stdout and "trustedCertEntry" in listed.stdout
