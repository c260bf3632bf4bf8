"""`${e2b.secrets.NAME}` resolved by the egress proxy, on real UML guests through the E2B SDK.

The test's world: one network namespace holding an HTTP server on 203.0.113.10 (what the test DNS
upstream answers for svc.example.test and example.test) and 203.0.113.11 (a server of the
sandbox's own choosing, an attacker's), reached only by the service's sandbox network
(umlguests.routed_world). The server records what arrives and echoes nothing.

What a user relies on: the ruled host gets the secret's value in the rule's header, over HTTP and
HTTPS (the server there holds a certificate of the test's own CA, which the service's upstream
verification is pointed at: `egress_upstream_ca_file`); the sandbox never holds it (env, files,
what it sent, what it got back); no API response or log record carries it. Attacks: the ruled Host
sent to another address, a placeholder in the sandbox's own header, a rule for a host the egress
policy does not allow (tests/sdkextras/test_secrets.py: another team's secret and placeholders
outside rules, refused at create); over HTTPS: a ruled host whose server's certificate does not
verify, the ruled SNI to an address not resolved for it, a Host inside the TLS that is not its SNI,
and the egress CA's private key looked for in the guest.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shlex
import socket
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import umlguests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from e2b import Sandbox, Secret
from net.networld import dns_upstream_server

from appliance.config import Config
from appliance.cubelet.runtimes import CubeVSPolicies, RuntimeBundle
from appliance.net import netns
from appliance.net.addressing import GATEWAY_IP6, GUEST_IP6, GUEST_PREFIX6

pytestmark = [
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="real UML guests need root"),
]

VALUE = "sk-egress-5ecret-value-0123456789"
ROTATED = "sk-egress-r0tated-value-9876543210"
RULED = "svc.example.test"  # the test upstream: 203.0.113.10
UNRULED = "example.test"  # the test upstream: 203.0.113.10 too
SERVER_IP = "203.0.113.10"
ATTACKER_IP = "203.0.113.11"
SERVER_IP6 = "2001:db8:5ec::10"  # the world's server over IPv6 (no name resolves to it)
TABLE = 26917  # policy routing of the uml_service network (its users hold the shared lock)
LINK_NET = "198.51.100.0"  # a /30 for the veth to the world
LINK_NET6 = "2001:db8:5ec:ff::"  # likewise, a /126


@dataclass
class Seen:
    local_ip: str
    path: str
    headers: list[tuple[str, str]]


@dataclass
class HttpWorld:
    netns: str
    upstream_ca: Path  # what the proxy's upstream verification trusts (the test's own CA)
    seen: list[Seen] = field(default_factory=list)

    def at(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


def _issue(
    name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, ca: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _pem_files(directory: Path, label: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path = directory / f"{label}.pem"
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def _tls_context(directory: Path) -> ssl.SSLContext:
    """The world's HTTPS: RULED's certificate from the test CA (trusted by the proxy's upstream
    verification); for UNRULED one that names it but comes from a CA nobody trusts."""
    ca_cert, ca_key = _issue("cube-test-upstream-ca", None, ca=True)
    (directory / "upstream-ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    good = _pem_files(directory, "good", *_issue(RULED, (ca_cert.subject, ca_key), ca=False))
    rogue_cert, rogue_key = _issue("cube-test-untrusted-ca", None, ca=True)
    bad = _pem_files(directory, "bad", *_issue(UNRULED, (rogue_cert.subject, rogue_key), ca=False))
    context, impostor = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) for _ in range(2))
    context.load_cert_chain(good)
    impostor.load_cert_chain(bad)

    def by_name(connection: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        if name == UNRULED:
            connection.context = impostor

    context.sni_callback = by_name  # type: ignore[assignment]
    return context


class _Ipv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _server(world: HttpWorld, tls: ssl.SSLContext | None = None, ipv6: bool = False) -> ThreadingHTTPServer:
    class Recorder(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            world.seen.append(Seen(self.connection.getsockname()[0], self.path, list(self.headers.items())))
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with netns.entered(netns.netns_path(world.netns)):
        if ipv6:
            server: ThreadingHTTPServer = _Ipv6Server((SERVER_IP6, 80), Recorder)
        else:
            server = ThreadingHTTPServer(("0.0.0.0", 443 if tls else 80), Recorder)
    if tls is not None:  # the handshake in the handler's thread, not in accept
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


@pytest.fixture
def http_world(tmp_path: Path) -> Iterator[HttpWorld]:
    name = f"cubetest-sec-{os.getpid() % 0x10000:04x}"
    addresses, addresses6 = (SERVER_IP, ATTACKER_IP), (SERVER_IP6,)
    with umlguests.routed_world(name, addresses, TABLE, LINK_NET, addresses6, LINK_NET6):
        world = HttpWorld(name, tmp_path / "upstream-ca.pem")
        servers = [_server(world), _server(world, _tls_context(tmp_path)), _server(world, ipv6=True)]
        threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers]
        for thread in threads:
            thread.start()
        try:
            yield world
        finally:
            for server, thread in zip(servers, threads, strict=True):
                server.shutdown()
                server.server_close()
                thread.join()


@asynccontextmanager
async def uml_runtime_with_test_dns(config: Config) -> AsyncIterator[RuntimeBundle]:
    """umlguests.uml_runtime, with the guests' DNS answered by networld's test upstream."""
    from appliance.net.service import CubeVS
    from appliance.runtime.uml.runtime import UmlRuntime

    async with (
        dns_upstream_server() as upstream,
        CubeVS.start(config, dns_upstreams=[upstream.address]) as cubevs,
    ):
        yield RuntimeBundle(UmlRuntime(config, cubevs), CubeVSPolicies(cubevs))


@pytest.fixture
def service(
    http_world: HttpWorld, start_service: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[umlguests.UmlService]:
    with umlguests.uml_service(
        start_service,
        monkeypatch,
        runtime_factory=uml_runtime_with_test_dns,
        egress_upstream_ca_file=http_world.upstream_ca,
    ) as running:
        yield running


# Runs in the guest: each probe resolves `target`, sends a GET it wrote itself to port 80 and
# reads the answer; prints [{sent, response | error}] as JSON.
PROBE = r"""
import json, socket, sys
def send(target, host, path, headers):
    sent = "GET %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n" % (
        path, host, "".join("%s: %s\r\n" % kv for kv in headers.items()))
    try:
        ip = socket.getaddrinfo(target, 80, type=socket.SOCK_STREAM)[0][4][0]
        with socket.create_connection((ip, 80), timeout=30) as s:
            s.sendall(sent.encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return {"sent": sent, "response": data.decode(errors="replace")}
    except OSError as e:
        return {"sent": sent, "error": repr(e)}
print(json.dumps([send(**p) for p in json.loads(sys.argv[1])]))
"""


def probe(sandbox: Sandbox, probes: list[dict[str, Any]]) -> list[dict[str, str]]:
    sandbox.files.write("/tmp/probe.py", PROBE)
    result = sandbox.commands.run(f"python3 /tmp/probe.py {shlex.quote(json.dumps(probes))}", timeout=120)
    return list(json.loads(result.stdout))


def ruled_network(**policy: Any) -> dict[str, Any]:
    header = {"Authorization": f"Bearer {Secret.fill('api-key')}"}
    return {**policy, "rules": {RULED: [{"transform": {"headers": header}}]}}


def assert_sandbox_never_holds(sandbox: Sandbox, results: list[dict[str, str]]) -> None:
    assert VALUE not in json.dumps(results)
    assert VALUE not in sandbox.commands.run("env").stdout
    found = sandbox.commands.run(
        f"grep -rlsF {shlex.quote(VALUE)} /home /tmp /etc /root /run /var/tmp || true", user="root"
    )
    assert found.stdout.strip() == ""


def test_the_ruled_host_gets_the_secret_and_nothing_else_does(
    service: umlguests.UmlService, http_world: HttpWorld, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = service.key("alice")
    Secret.create("api-key", VALUE, api_key=key)
    sandbox = Sandbox.create(network=ruled_network(), timeout=300, api_key=key)
    try:
        placeholder = Secret.fill("api-key")
        results = probe(
            sandbox,
            [
                {"target": RULED, "host": RULED, "path": "/ruled", "headers": {"X-Own": placeholder}},
                # The ruled name, sent to the sandbox's own server: no secret goes there.
                {"target": ATTACKER_IP, "host": RULED, "path": "/spoofed", "headers": {}},
                {"target": UNRULED, "host": UNRULED, "path": "/plain", "headers": {"Authorization": "mine"}},
            ],
        )
        assert all(r.get("response", "").startswith("HTTP/1.") for r in results), results
        [ruled] = http_world.at("/ruled")
        assert ruled.local_ip == SERVER_IP
        assert ("Authorization", f"Bearer {VALUE}") in ruled.headers
        assert ("X-Own", placeholder) in ruled.headers  # the sandbox's own header: not resolved
        [spoofed] = http_world.at("/spoofed")
        assert spoofed.local_ip == ATTACKER_IP and VALUE not in json.dumps(spoofed.headers)
        [plain] = http_world.at("/plain")
        assert ("Authorization", "mine") in plain.headers
        assert_sandbox_never_holds(sandbox, results)

        headers = {"X-API-KEY": key}
        for response in (
            httpx.get(f"{service.url}/sandboxes/{sandbox.sandbox_id}", headers=headers),
            httpx.get(f"{service.url}/v2/sandboxes", headers=headers),
        ):
            assert response.status_code == 200 and VALUE not in response.text
        assert sandbox.get_info().network["rules"] == ruled_network()["rules"]  # type: ignore[index]

        # Read per request: a rotated value is used at once, a deleted secret stops the request.
        Secret.update("api-key", ROTATED, api_key=key)
        [rotated] = probe(sandbox, [{"target": RULED, "host": RULED, "path": "/rotated", "headers": {}}])
        assert rotated["response"].startswith("HTTP/1.0 200") and ROTATED not in json.dumps(rotated)
        assert ("Authorization", f"Bearer {ROTATED}") in http_world.at("/rotated")[0].headers
        assert Secret.destroy("api-key", api_key=key)
        gone = probe(sandbox, [{"target": RULED, "host": RULED, "path": "/deleted", "headers": {}}])
        assert gone[0]["response"].startswith("HTTP/1.1 502") and http_world.at("/deleted") == []
    finally:
        sandbox.kill()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"rules of {RULED} applied" in logged  # the proxy did the work, and said so
    assert VALUE not in logged and ROTATED not in logged


def test_a_rule_does_not_open_egress_the_policy_denies(
    service: umlguests.UmlService, http_world: HttpWorld
) -> None:
    """The rule's host is not in allowOut (everything else denied): the sandbox cannot resolve
    it, its requests naming it go out without the secret, and denied addresses stay denied. The
    rules arrive by `PUT /sandboxes/{id}/network` (as a warm guest's policy does at its claim)."""
    key = service.key("bob")
    Secret.create("api-key", VALUE, api_key=key)
    sandbox = Sandbox.create(timeout=300, api_key=key)
    try:
        sandbox.update_network(ruled_network(allow_out=[UNRULED], deny_out=["0.0.0.0/0"]))  # type: ignore[arg-type]
        results = probe(
            sandbox,
            [
                {"target": RULED, "host": RULED, "path": "/unresolvable", "headers": {}},
                {"target": UNRULED, "host": RULED, "path": "/allowed-address", "headers": {}},
                {"target": ATTACKER_IP, "host": RULED, "path": "/denied", "headers": {}},
            ],
        )
        assert "error" in results[0] and http_world.at("/unresolvable") == []
        [allowed] = http_world.at("/allowed-address")
        assert VALUE not in json.dumps(allowed.headers)
        assert results[2].get("response", "").startswith("HTTP/1.1 502"), results[2]
        assert http_world.at("/denied") == []
        assert_sandbox_never_holds(sandbox, results)
    finally:
        sandbox.kill()


def test_the_js_sdk_gets_the_secret_resolved_too(
    service: umlguests.UmlService, http_world: HttpWorld, js_sdk_dir: Path, tmp_path: Path
) -> None:
    probe_file = tmp_path / "probe.py"
    probe_file.write_text(PROBE)
    probes = [{"target": RULED, "host": RULED, "path": "/js", "headers": {}}]
    env = {**os.environ, "E2B_API_KEY": service.key("js-team")}
    env.pop("E2B_DEBUG", None)
    result = subprocess.run(
        ["node", "egress_secret.mjs", VALUE, RULED, str(probe_file), json.dumps(probes)],
        cwd=js_sdk_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    [request] = http_world.at("/js")
    assert ("X-Api-Key", VALUE) in request.headers
    assert VALUE not in json.dumps(seen["results"]) and VALUE not in seen["env"]
    assert seen["rules"] == {RULED: [{"transform": {"headers": {"X-Api-Key": "${e2b.secrets.js-key}"}}}]}
    assert "nope" in seen["unknown"]["message"] and "400" in seen["unknown"]["message"], seen["unknown"]


# Runs in the guest: HTTPS requests it builds itself over Python's ssl (the guest's default trust:
# the system bundle, where the egress CA was put at boot, unless `verify` is false); prints
# [{sent, response, egress_leaf} | {sent, error}] as JSON. `egress_leaf`: the certificate the guest
# got was one of the egress CA's (the proxy terminated the TLS), else the server's own (spliced).
TLS_PROBE = r"""
import json, socket, ssl, sys
def send(target, sni, host, path, verify, headers):
    sent = "GET %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n" % (
        path, host, "".join("%s: %s\r\n" % kv for kv in headers.items()))
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        ip = socket.gethostbyname(target)
        with socket.create_connection((ip, 443), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname=sni) as s:
                leaf = s.getpeercert(binary_form=True)
                s.sendall(sent.encode())
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        return {"sent": sent, "response": data.decode(errors="replace"),
                "egress_leaf": b"Cube appliance egress CA" in leaf}
    except OSError as e:
        return {"sent": sent, "error": repr(e)}
print(json.dumps([send(**p) for p in json.loads(sys.argv[1])]))
"""

# A Java HTTPS client (the JDK's default trust: its cacerts keystore), run as a source file.
JAVA_GET = """
public class Get {
    public static void main(String[] args) throws Exception {
        var connection = (javax.net.ssl.HttpsURLConnection) new java.net.URL(args[0]).openConnection();
        System.out.println(connection.getResponseCode());
    }
}
"""

# Other clients, with their own trust stores: curl (the system bundle), Node (its own store plus
# NODE_EXTRA_CA_CERTS), requests (certifi, or REQUESTS_CA_BUNDLE), Java (its cacerts keystore).
OTHER_CLIENTS = {
    "curl": f"curl -sS --max-time 60 https://{RULED}/tls-curl",
    "node": "node -e \"require('https').get('https://"
    + RULED
    + "/tls-node', r => { r.resume(); r.on('end', () => console.log(r.statusCode)) })"
    + ".on('error', e => { console.error(e.message); process.exit(1) })\"",
    "requests": f"python3 -c \"import requests; print(requests.get('https://{RULED}/tls-requests').text)\"",
    "java": f"java -XX:+UseSerialGC -XX:TieredStopAtLevel=1 /tmp/Get.java https://{RULED}/tls-java",
}


def tls_probe(sandbox: Sandbox, probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sandbox.files.write("/tmp/tls_probe.py", TLS_PROBE)
    result = sandbox.commands.run(f"python3 /tmp/tls_probe.py {shlex.quote(json.dumps(probes))}", timeout=180)
    return list(json.loads(result.stdout))


def tls_request(
    target: str, path: str, sni: str = RULED, host: str = RULED, verify: bool = True
) -> dict[str, Any]:
    return {"target": target, "sni": sni, "host": host, "path": path, "verify": verify, "headers": {}}


def test_https_to_the_ruled_host_gets_the_secret_and_nothing_else_does(
    service: umlguests.UmlService, http_world: HttpWorld, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = service.key("carol")
    Secret.create("api-key", VALUE, api_key=key)
    header = {"Authorization": f"Bearer {Secret.fill('api-key')}"}
    rules = {name: [{"transform": {"headers": header}}] for name in (RULED, UNRULED)}
    sandbox = Sandbox.create(network={"rules": rules}, timeout=300, api_key=key)
    try:
        results = tls_probe(
            sandbox,
            [
                tls_request(RULED, "/tls-ruled"),
                # Ruled, but its server's certificate (for the right name) is from a CA nobody trusts.
                tls_request(UNRULED, "/tls-impostor", sni=UNRULED, host=UNRULED),
                # The ruled name, sent to the sandbox's own server: spliced, its own certificate.
                tls_request(ATTACKER_IP, "/tls-spoofed", verify=False),
                # Inside TLS verified for RULED, a request for another (also ruled) host.
                tls_request(RULED, "/tls-mismatch", host=UNRULED),
                # No rule for the name: spliced untouched, the server's own certificate.
                tls_request("short.example.test", "/tls-unruled", sni="short.example.test", verify=False),
            ],
        )
        ruled, impostor, spoofed, mismatch, unruled = results
        assert ruled["response"].startswith("HTTP/1.0 200") and ruled["egress_leaf"], ruled
        [seen] = http_world.at("/tls-ruled")
        assert seen.local_ip == SERVER_IP and ("Authorization", f"Bearer {VALUE}") in seen.headers
        assert impostor["response"].startswith("HTTP/1.1 502") and "did not prove" in impostor["response"]
        assert http_world.at("/tls-impostor") == []  # nothing was sent to it
        assert spoofed["response"].startswith("HTTP/1.0 200") and not spoofed["egress_leaf"], spoofed
        assert unruled["response"].startswith("HTTP/1.0 200") and not unruled["egress_leaf"], unruled
        assert mismatch["response"].startswith("HTTP/1.0 200") and mismatch["egress_leaf"], mismatch
        for path, address in (
            ("/tls-spoofed", ATTACKER_IP),
            ("/tls-mismatch", SERVER_IP),
            ("/tls-unruled", SERVER_IP),
        ):
            [other] = http_world.at(path)
            assert other.local_ip == address and VALUE not in json.dumps(other.headers), path

        sandbox.files.write("/tmp/Get.java", JAVA_GET)
        for client, command in OTHER_CLIENTS.items():
            result = sandbox.commands.run(command, timeout=300)
            assert result.exit_code == 0, (client, result.stderr)
            [seen] = http_world.at(f"/tls-{client}")
            assert ("Authorization", f"Bearer {VALUE}") in seen.headers, client
            assert VALUE not in result.stdout + result.stderr

        assert_sandbox_never_holds(sandbox, results)
        # The CA's certificate is in the guest, its key nowhere in it.
        ca_key = (service.config.state_dir / "egress-ca" / "ca-key.pem").read_text()
        key_line = ca_key.splitlines()[1]
        found = sandbox.commands.run(
            f"cat /proc/cmdline; grep -rlsF {shlex.quote(key_line)} /etc /home /root /tmp /run /var /opt "
            "/usr/local /usr/share/ca-certificates || true",
            user="root",
            timeout=300,
        )
        assert "cube.egress_ca=" in found.stdout and key_line not in found.stdout
        assert found.stdout.strip().splitlines()[1:] == []
    finally:
        sandbox.kill()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"{UNRULED} at {SERVER_IP} failed TLS verification" in logged
    assert VALUE not in logged and key_line not in logged


def test_ipv6_is_redirected_too(service: umlguests.UmlService, http_world: HttpWorld) -> None:
    """A guest that configures IPv6 itself (root may): its HTTP over IPv6 goes through the proxy as
    IPv4's does; an address rule for the server's IPv6 network gets the secret there."""
    key = service.key("dave")
    Secret.create("api-key", VALUE, api_key=key)
    header = {"Authorization": f"Bearer {Secret.fill('api-key')}"}
    network = {"rules": {"2001:db8:5ec::/64": [{"transform": {"headers": header}}]}}
    sandbox = Sandbox.create(network=network, timeout=300, api_key=key)
    try:
        sandbox.commands.run(
            "dev=$(ip -o -4 addr show | awk '/169.254.0.2\\//{print $2}') && "
            f"ip -6 addr replace {GUEST_IP6}/{GUEST_PREFIX6} dev $dev nodad && "
            f"ip -6 route replace default via {GATEWAY_IP6}",
            user="root",
        )
        [ruled] = probe(sandbox, [{"target": SERVER_IP6, "host": "v6.test", "path": "/v6", "headers": {}}])
        assert ruled.get("response", "").startswith("HTTP/1.0 200"), ruled
        [seen] = http_world.at("/v6")
        assert seen.local_ip == SERVER_IP6 and ("Authorization", f"Bearer {VALUE}") in seen.headers
        assert_sandbox_never_holds(sandbox, [ruled])
    finally:
        sandbox.kill()
