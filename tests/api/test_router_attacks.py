"""The sandbox router, attacked: request targets and ports that try to send it elsewhere, traffic
without the sandbox's tokens, and credentials that must not reach a guest.

Every request goes to loopback: the "elsewhere" is a server this test starts on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import h11
import httpx
import pytest

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


class Elsewhere:
    """An HTTP server on loopback standing in for a place the router must never be sent to."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "8")
                self.end_headers()
                self.wfile.write(b"REACHED!")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def elsewhere() -> Iterator[Elsewhere]:
    server = Elsewhere()
    yield server
    server.close()


@pytest.fixture
def created(service: ServiceHarness, api_key: str) -> dict[str, Any]:
    response = httpx.post(f"{service.url}/v2/sandboxes", json={}, headers={"X-API-KEY": api_key})
    assert response.status_code == 201
    return dict(response.json())


def raw_request(service: ServiceHarness, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """Send a request line exactly as written (httpx would normalise the target); one response."""
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    lines = [f"GET {target} HTTP/1.1", "Host: localhost"] + [f"{k}: {v}" for k, v in headers.items()]
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))  # h11's bookkeeping only
    client.send(h11.EndOfMessage())
    status, body = 0, b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, body


def routed(created: dict[str, Any], port: int | str = 49983) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": created["sandboxID"],
        "E2b-Sandbox-Port": str(port),
        "X-Access-Token": created["envdAccessToken"],
    }


@pytest.mark.parametrize(
    "target",
    [
        "@127.0.0.1:{port}/steal",  # userinfo trick: http://guest:port@127.0.0.1:{port}/steal
        "http://127.0.0.1:{port}/steal",  # absolute form
        "//127.0.0.1:{port}/steal",
        "*",
    ],
)
def test_request_targets_that_are_not_a_path_are_refused(
    service: ServiceHarness, created: dict[str, Any], elsewhere: Elsewhere, target: str
) -> None:
    status, body = raw_request(service, target.format(port=elsewhere.port), routed(created))
    assert elsewhere.hits == []
    assert b"REACHED" not in body
    # An absolute-form target is a path for the guest (`//host/...`) or refused; never another host.
    if target.startswith(("//",)):
        assert status in (400, 404), body
    else:
        assert status == 400, body
        assert b'"code": 400' in body and b"must be a path" in body


@pytest.mark.parametrize("port", ["0", "65536", "-1", "abc", "99999999999999999999", "12 34", "٣"])
def test_sandbox_port_header_out_of_range_is_400(
    service: ServiceHarness, created: dict[str, Any], port: str
) -> None:
    headers = {**routed(created), "E2b-Sandbox-Port": port.encode()}  # bytes: non-ASCII goes out as UTF-8
    response = httpx.get(f"{service.url}/health", headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == 400 and "invalid sandbox port" in response.json()["message"]


@pytest.mark.parametrize("port", ["0", "65536", "99999999999999999999", "000"])
def test_sandbox_port_in_the_host_name_out_of_range_is_400(
    service: ServiceHarness, created: dict[str, Any], port: str
) -> None:
    host = f"{port}-{created['sandboxID']}.{service.config.domain}"
    response = httpx.get(
        f"{service.url}/health", headers={"Host": host, "X-Access-Token": created["envdAccessToken"]}
    )
    assert response.status_code == 400, response.text
    assert response.json() == {
        "code": 400,
        "message": f"invalid sandbox port {port[:16]!r}: expected 1-65535",
    }


def test_control_plane_credentials_do_not_reach_the_guest(
    service: ServiceHarness, created: dict[str, Any], api_key: str
) -> None:
    basic = "Basic " + base64.b64encode(b"root:").decode()
    for extra, absent, present in (
        ({"X-API-Key": api_key}, "x-api-key", None),
        ({"Authorization": f"Bearer {api_key}"}, "authorization", None),
        ({"Authorization": basic}, None, "authorization"),  # envd picks the user from it (§1.4)
    ):
        seen = httpx.get(f"{service.url}/headers", headers={**routed(created), **extra}).json()
        assert api_key not in str(seen)
        if absent:
            assert absent not in seen
        if present:
            assert seen[present] == basic


def test_envd_port_needs_the_access_token_or_a_signed_url(
    service: ServiceHarness, created: dict[str, Any]
) -> None:
    plain = {"E2b-Sandbox-Id": created["sandboxID"], "E2b-Sandbox-Port": "49983"}
    assert httpx.get(f"{service.url}/health", headers=plain).status_code == 502
    wrong = httpx.get(f"{service.url}/health", headers={**plain, "X-Access-Token": "guess"})
    assert wrong.status_code == 502 and "was not found" in wrong.json()["message"]
    # A download URL signed the SDK's way (`download_url`) passes without the token header.
    token, path = created["envdAccessToken"], "/home/user/a.txt"
    digest = hashlib.sha256(f"{path}:read::{token}".encode()).digest()
    signature = "v1_" + base64.b64encode(digest).rstrip(b"=").decode()
    signed = httpx.get(f"{service.url}/files", params={"path": path, "signature": signature}, headers=plain)
    assert signed.status_code == 404  # reached the guest double, which has no /files
    assert signed.text == "no such path"
    forged = httpx.get(
        f"{service.url}/files", params={"path": "/etc/shadow", "signature": signature}, headers=plain
    )
    assert forged.status_code == 502


def test_traffic_access_token_is_issued_and_enforced_for_private_traffic(
    service: ServiceHarness, api_key: str
) -> None:
    headers = {"X-API-KEY": api_key}
    body = {"network": {"allowPublicTraffic": False}}
    created = httpx.post(f"{service.url}/v2/sandboxes", json=body, headers=headers).json()
    token, sandbox_id = created["trafficAccessToken"], created["sandboxID"]
    assert isinstance(token, str) and len(token) >= 20 and token != created["envdAccessToken"]
    detail = httpx.get(f"{service.url}/sandboxes/{sandbox_id}", headers=headers).json()
    assert detail["trafficAccessToken"] == token and detail["network"] == {"allowPublicTraffic": False}
    connected = httpx.post(f"{service.url}/v2/sandboxes/{sandbox_id}/connect", json={}, headers=headers)
    assert connected.json()["trafficAccessToken"] == token

    port_49999 = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49999"}
    missing = httpx.get(f"{service.url}/contexts", headers=port_49999)
    assert missing.status_code == 403 and missing.json()["code"] == 403
    wrong = httpx.get(f"{service.url}/contexts", headers={**port_49999, "E2B-Traffic-Access-Token": "guess"})
    assert wrong.status_code == 403
    right = httpx.get(f"{service.url}/contexts", headers={**port_49999, "E2B-Traffic-Access-Token": token})
    assert right.status_code == 200 and right.json() == []
    # Any other port of the sandbox too; envd's port has its own token and needs no traffic token.
    assert (
        httpx.get(f"{service.url}/headers", headers={**port_49999, "E2b-Sandbox-Port": "8080"}).status_code
        == 403
    )
    envd = {"E2b-Sandbox-Id": sandbox_id, "X-Access-Token": created["envdAccessToken"]}
    assert httpx.get(f"{service.url}/health", headers=envd).status_code == 204


def test_public_sandboxes_ports_need_no_traffic_token_but_the_guest_gets_one(
    service: ServiceHarness, created: dict[str, Any], fake_runtime: FakeRuntime
) -> None:
    # The SDK sends it on every code-interpreter call, whose guest side takes it (or the access token).
    token = created["trafficAccessToken"]
    assert isinstance(token, str) and len(token) >= 20
    assert fake_runtime.instances[created["sandboxID"]].app.init_calls[-1]["trafficAccessToken"] == token
    headers = {"E2b-Sandbox-Id": created["sandboxID"], "E2b-Sandbox-Port": "49999"}
    assert httpx.get(f"{service.url}/contexts", headers=headers).status_code == 200


def test_the_sdk_sends_the_traffic_token_to_the_code_interpreter(sdk_env: ServiceHarness) -> None:
    from e2b_code_interpreter import Sandbox

    sandbox = Sandbox.create(network={"allow_public_traffic": False})
    try:
        assert sandbox.traffic_access_token is not None
        assert sandbox.list_code_contexts() == []  # GET /contexts on 49999 with E2B-Traffic-Access-Token
        assert sandbox.is_running()
    finally:
        sandbox.kill()
