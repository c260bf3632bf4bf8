"""CubeProxy: header- and Host-routed sandbox traffic, streamed both ways, to the guest double."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
import wsproto
import wsproto.events as ws

from appliance.proxy.tls import ca_cert_path

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


TOKENS: dict[str, str] = {}  # sandbox id -> envd access token, as create returned it


@pytest.fixture
def sandbox_id(service: ServiceHarness, api_key: str) -> str:
    response = httpx.post(f"{service.url}/v2/sandboxes", json={}, headers={"X-API-KEY": api_key})
    assert response.status_code == 201
    TOKENS[response.json()["sandboxID"]] = response.json()["envdAccessToken"]
    return str(response.json()["sandboxID"])


def routed(sandbox_id: str, port: int = 49983) -> dict[str, str]:
    """The headers the SDK sends to a sandbox port (the envd token with every request, as the SDK does)."""
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port)}
    if sandbox_id in TOKENS:
        headers["X-Access-Token"] = TOKENS[sandbox_id]
    return headers


def test_header_routing_reaches_the_guest_port(service: ServiceHarness, sandbox_id: str) -> None:
    response = httpx.get(f"{service.url}/headers", headers=routed(sandbox_id, 49999))
    assert response.status_code == 200
    seen = response.json()
    assert seen["e2b-sandbox-port"] == "49999" and seen["x-access-token"] == TOKENS[sandbox_id]
    assert httpx.get(f"{service.url}/health", headers=routed(sandbox_id)).status_code == 204


def test_server_stream_is_flushed_per_chunk(
    service: ServiceHarness, fake_runtime: FakeRuntime, sandbox_id: str
) -> None:
    guest = fake_runtime.instances[sandbox_id].app
    open_at_arrival: list[int] = []
    with httpx.stream("GET", f"{service.url}/stream?n=3&delay=0.4", headers=routed(sandbox_id)) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            if chunk:
                open_at_arrival.append(guest.open_streams)
    assert len(open_at_arrival) >= 3
    # The first line reached the client while the guest was still writing the stream.
    assert open_at_arrival[0] == 1, open_at_arrival


def test_client_going_away_ends_the_guest_stream(
    service: ServiceHarness, fake_runtime: FakeRuntime, sandbox_id: str
) -> None:
    guest = fake_runtime.instances[sandbox_id].app
    with httpx.stream(
        "GET", f"{service.url}/stream?n=1000&delay=0.05", headers=routed(sandbox_id)
    ) as response:
        # Hold the iterator: dropping it closes the response, which is the client going away.
        chunks = response.iter_raw()
        while not next(chunks):
            pass
        assert guest.open_streams == 1
    deadline = time.monotonic() + 5
    while guest.open_streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guest.open_streams == 0


def test_chunked_request_body_is_streamed_through(service: ServiceHarness, sandbox_id: str) -> None:
    def body() -> Iterator[bytes]:
        for i in range(5):
            yield f"part {i};".encode()

    response = httpx.post(f"{service.url}/echo", content=body(), headers=routed(sandbox_id))
    assert response.status_code == 200
    assert response.text == "".join(f"part {i};" for i in range(5))
    big = os.urandom(3 * 1024 * 1024)
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
    digest = httpx.post(f"{service.url}/digest", content=chunks, headers=routed(sandbox_id)).json()
    assert digest == {"sha256": hashlib.sha256(big).hexdigest(), "size": len(big)}


def test_dead_or_unknown_sandbox_is_502_was_not_found(service: ServiceHarness, api_key: str) -> None:
    response = httpx.get(f"{service.url}/health", headers=routed("nosuchsandbox"))
    assert response.status_code == 502
    assert response.json() == {"code": 502, "message": "The sandbox nosuchsandbox was not found"}


def test_closed_guest_port_is_502_port_not_open(
    service: ServiceHarness, fake_runtime: FakeRuntime, sandbox_id: str
) -> None:
    response = httpx.get(f"{service.url}/", headers=routed(sandbox_id, fake_runtime.CLOSED_PORT))
    assert response.status_code == 502
    assert "port is not open" in response.json()["message"]


def test_websocket_is_relayed(service: ServiceHarness, sandbox_id: str) -> None:
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        extra = [(k.lower().encode(), v.encode()) for k, v in routed(sandbox_id).items()]
        sock.sendall(client.send(ws.Request(host="localhost", target="/ws", extra_headers=extra)))

        def next_event() -> ws.Event:
            while True:
                for event in client.events():
                    return event
                client.receive_data(sock.recv(65536))

        assert isinstance(next_event(), ws.AcceptConnection)
        sock.sendall(client.send(ws.TextMessage(data="hello guest")))
        message = next_event()
        assert isinstance(message, ws.TextMessage) and message.data == "hello guest"
        sock.sendall(client.send(ws.CloseConnection(code=1000)))


def test_a_large_websocket_message_arrives_whole(service: ServiceHarness, sandbox_id: str) -> None:
    """The guest's reply (one 1 MiB message, read by the router in pieces) reaches the client as
    one message: a CDP screenshot reply split in two would be two invalid JSON messages."""
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    payload = "x" * (1 << 20)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        extra = [(k.lower().encode(), v.encode()) for k, v in routed(sandbox_id).items()]
        sock.sendall(client.send(ws.Request(host="localhost", target="/ws", extra_headers=extra)))
        received, accepted = "", False
        while True:
            client.receive_data(sock.recv(65536))
            events = list(client.events())
            accepted = accepted or any(isinstance(e, ws.AcceptConnection) for e in events)
            if any(isinstance(e, ws.AcceptConnection) for e in events):
                sock.sendall(client.send(ws.TextMessage(data=payload)))
            pieces = [e for e in events if isinstance(e, ws.TextMessage)]
            received += "".join(e.data for e in pieces)
            if any(e.message_finished for e in pieces):
                break
        assert accepted and len(received) == len(payload)
        sock.sendall(client.send(ws.CloseConnection(code=1000)))


def test_host_routing_over_tls_with_http2(service: ServiceHarness, sandbox_id: str) -> None:
    ca = ca_cert_path(service.config.state_dir)
    context = ssl.create_default_context(cafile=str(ca))
    port = int(service.tls_url.rsplit(":", 1)[1])
    hostname = f"49983-{sandbox_id}.{service.config.domain}"
    with httpx.Client(verify=context, http2=True) as client:
        response = client.get(
            f"https://127.0.0.1:{port}/headers",
            headers={"Host": hostname, "X-Access-Token": TOKENS[sandbox_id]},
            extensions={"sni_hostname": hostname},
        )
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        # The API is on the same TLS port under api.<domain>.
        api_host = f"api.{service.config.domain}"
        health = client.get(
            f"https://127.0.0.1:{port}/health",
            headers={"Host": api_host},
            extensions={"sni_hostname": api_host},
        )
        assert health.status_code == 200 and health.json()["status"] == "ok"


def test_auto_resume_on_traffic(service: ServiceHarness, api_key: str) -> None:
    headers = {"X-API-KEY": api_key}
    body = {"autoPause": True, "autoResume": {"enabled": True}}
    created = httpx.post(f"{service.url}/v2/sandboxes", json=body, headers=headers).json()
    sandbox_id = created["sandboxID"]
    TOKENS[sandbox_id] = created["envdAccessToken"]
    assert httpx.post(f"{service.url}/sandboxes/{sandbox_id}/pause", headers=headers).status_code == 204
    assert httpx.get(f"{service.url}/health", headers=routed(sandbox_id)).status_code == 204
    detail = httpx.get(f"{service.url}/sandboxes/{sandbox_id}", headers=headers).json()
    assert detail["state"] == "running"
    assert detail["lifecycle"] == {"autoResume": True, "onTimeout": "pause"}
