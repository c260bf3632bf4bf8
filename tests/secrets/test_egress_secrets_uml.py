"""`${e2b.secrets.NAME}` resolved by the egress proxy, on real UML guests through the E2B SDK.

The test's world: one network namespace holding an HTTP server on 203.0.113.10 (what the test DNS
upstream answers for svc.example.test and example.test) and 203.0.113.11 (a server of the
sandbox's own choosing, an attacker's), reached only by the service's sandbox network through a
policy-routing table that knows nothing else. The server records what arrives and echoes nothing.

What a user relies on: the ruled host gets the secret's value in the rule's header; the sandbox
never holds it (env, files, what it sent, what it got back); no API response or log record carries
it. Attacks: the ruled Host sent to another address, a placeholder in the sandbox's own header, a
rule for a host the egress policy does not allow (tests/sdkextras/test_secrets.py: another team's
secret and placeholders outside rules, refused at create).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
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
from e2b import Sandbox, Secret
from net.networld import dns_upstream_server

from appliance.config import Config
from appliance.cubelet.runtimes import CubeVSPolicies, RuntimeBundle
from appliance.net import netns

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
TABLE = 26917  # policy routing of the uml_service network (its users hold the shared lock)
LINK_NET = "198.51.100"  # .1 host side, .2 the world's


@dataclass
class Seen:
    local_ip: str
    path: str
    headers: list[tuple[str, str]]


@dataclass
class HttpWorld:
    netns: str
    seen: list[Seen] = field(default_factory=list)

    def at(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


def _sh(*commands: str, check: bool = True) -> None:
    for command in commands:
        subprocess.run(command, shell=True, check=check, capture_output=True, text=True)


def _server(world: HttpWorld) -> ThreadingHTTPServer:
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
        return ThreadingHTTPServer(("0.0.0.0", 80), Recorder)


@pytest.fixture
def http_world() -> Iterator[HttpWorld]:
    tag = f"{os.getpid() % 0x10000:04x}"
    world, link, network = HttpWorld(f"cubetest-sec-{tag}"), f"ctsec{tag}", umlguests.SERVICE_NETWORK
    try:
        _sh(
            f"ip netns add {world.netns}",
            f"ip link add {link} type veth peer name w0 netns {world.netns}",
            f"ip addr add {LINK_NET}.1/30 dev {link}",
            f"ip link set {link} up",
            f"ip -n {world.netns} link set lo up",
            f"ip -n {world.netns} addr add {SERVER_IP}/32 dev lo",
            f"ip -n {world.netns} addr add {ATTACKER_IP}/32 dev lo",
            f"ip -n {world.netns} addr add {LINK_NET}.2/30 dev w0",
            f"ip -n {world.netns} link set w0 up",
            f"ip -n {world.netns} route add default via {LINK_NET}.1",
            f"ip route add {SERVER_IP}/32 via {LINK_NET}.2 table {TABLE}",
            f"ip route add {ATTACKER_IP}/32 via {LINK_NET}.2 table {TABLE}",
            f"ip route add throw {network} table {TABLE}",
            f"ip route add unreachable default table {TABLE}",
            f"ip rule add from {network} lookup {TABLE} priority {TABLE}",
        )
        server = _server(world)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield world
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
    finally:
        _sh(
            f"ip rule del from {network} lookup {TABLE} priority {TABLE}",
            f"ip route flush table {TABLE}",
            f"ip link del {link}",
            f"ip netns del {world.netns}",
            check=False,
        )


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
        start_service, monkeypatch, runtime_factory=uml_runtime_with_test_dns
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
        ip = socket.gethostbyname(target)
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
