"""envd over HTTP/2 cleartext (h2c): prior knowledge (httpx) and `Upgrade: h2c` (an h2 client on a socket)."""

from __future__ import annotations

import base64
import json
import socket

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from connect_wire import envelope, parse_envelopes

from appliance.guest import READY_LINE
from appliance.guest.launcher import running_agent

CONNECT_HEADERS = {"Connect-Protocol-Version": "1"}
STREAM_HEADERS = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}


@pytest.fixture
def h2_client(agent):
    with httpx.Client(http1=False, http2=True, base_url=agent.envd_url, timeout=30) as client:
        yield client


def test_unary_connect_over_h2c(h2_client, agent) -> None:
    (agent.scratch / "h2-listed").mkdir()
    response = h2_client.post(
        "/filesystem.Filesystem/ListDir",
        json={"path": str(agent.scratch), "depth": 1},
        headers=CONNECT_HEADERS,
    )
    assert response.http_version == "HTTP/2" and response.status_code == 200
    assert "h2-listed" in [entry["name"] for entry in response.json()["entries"]]
    missing = h2_client.post(
        "/filesystem.Filesystem/Stat", json={"path": "/no/such"}, headers=CONNECT_HEADERS
    )
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert h2_client.get("/health").status_code == 204


def test_server_stream_over_h2c_ends_with_end_stream(h2_client) -> None:
    request = envelope({"process": {"cmd": "/bin/sh", "args": ["-c", "echo one; sleep 0.2; echo two"]}})
    with h2_client.stream(
        "POST", "/process.Process/Start", content=request, headers=STREAM_HEADERS
    ) as response:
        assert response.http_version == "HTTP/2" and response.status_code == 200
        messages = parse_envelopes(response.read())
    events = [message["event"] for flags, message in messages if not flags]
    assert "start" in events[0]
    stdout = b"".join(base64.b64decode(e["data"]["stdout"]) for e in events if "data" in e)
    assert stdout == b"one\ntwo\n" and events[-1]["end"]["exitCode"] == 0
    assert messages[-1] == (0x02, {})


def test_concurrent_streams_share_one_connection(h2_client) -> None:
    """Multiplexed: a long stream open while unary calls come and go on the same connection."""
    request = envelope(
        {"process": {"cmd": "/bin/sh", "args": ["-c", "read line; echo got $line"]}, "stdin": True}
    )
    with h2_client.stream(
        "POST", "/process.Process/Start", content=request, headers=STREAM_HEADERS
    ) as response:
        lines = response.iter_bytes()
        pid = parse_envelopes(next(lines))[0][1]["event"]["start"]["pid"]
        for _ in range(3):
            assert h2_client.get("/health").status_code == 204
        sent = h2_client.post(
            "/process.Process/SendInput",
            json={"process": {"pid": pid}, "input": {"stdin": base64.b64encode(b"hi\n").decode()}},
            headers=CONNECT_HEADERS,
        )
        assert sent.status_code == 200
        rest = b"".join(lines)
    events = [message for flags, message in parse_envelopes(rest) if not flags]
    assert b"got hi\n" in b"".join(
        base64.b64decode(e["event"]["data"]["stdout"]) for e in events if "data" in e["event"]
    )


def test_large_files_over_h2c_respect_flow_control(h2_client, agent) -> None:
    payload = bytes(range(256)) * (12 * 1024)  # 3 MiB: many windows' worth in both directions
    path = str(agent.scratch / "h2-big.bin")
    written = h2_client.post(
        "/files", params={"path": path}, content=payload, headers={"Content-Type": "application/octet-stream"}
    )
    assert written.status_code == 200 and written.json()[0]["path"] == path
    read = h2_client.get("/files", params={"path": path})
    assert read.http_version == "HTTP/2" and read.content == payload


def _h2c_upgrade(port: int, method: str, path: str, body: bytes, headers: list[tuple[str, str]]):
    """One request over HTTP/1.1 with `Upgrade: h2c`; the 101 line and the HTTP/2 response on stream 1."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    settings = client.initiate_upgrade_connection().decode()
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        f"HTTP2-Settings: {settings}",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        status_line, _, rest = received.partition(b"\r\n\r\n")
        sock.sendall(client.data_to_send())
        status, response_headers, response_body = None, {}, b""
        events = client.receive_data(rest) if rest else []
        while True:
            for event in events:
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                    response_headers = dict(event.headers)
                    status = int(response_headers[":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                    response_body += event.data
                    client.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == 1:
                    return status_line.split(b"\r\n")[0], status, response_headers, response_body
            sock.sendall(client.data_to_send())
            data = sock.recv(65536)
            assert data, "the agent closed the connection before the response ended"
            events = client.receive_data(data)


def test_upgrade_h2c_serves_the_request_as_stream_one(agent) -> None:
    body = json.dumps({"path": str(agent.scratch)}).encode()
    status_line, status, headers, response = _h2c_upgrade(
        49983, "POST", "/filesystem.Filesystem/Stat", body,
        [("Content-Type", "application/json"), ("Connect-Protocol-Version", "1")],
    )  # fmt: skip
    assert status_line.startswith(b"HTTP/1.1 101")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(response)["entry"]["path"] == str(agent.scratch)
    status_line, status, _headers, response = _h2c_upgrade(49983, "GET", "/health", b"", [])
    assert status_line.startswith(b"HTTP/1.1 101") and status == 204 and response == b""


def test_without_h2_the_agent_serves_http1_only() -> None:
    """Templates built before python3-h2 was added: the agent starts, says so, and speaks HTTP/1.1."""
    hide_h2 = "import sys; sys.modules['h2'] = None; from appliance.guest.__main__ import main; main()"
    with running_agent("--envd-port", "49884", "--no-interpreter", python_args=("-c", hide_h2)) as agent:
        agent.wait_for_line(READY_LINE)
        envd = "http://127.0.0.1:49884"
        assert httpx.get(f"{envd}/health").status_code == 204
        upgraded = httpx.get(
            f"{envd}/health",
            headers={
                "Connection": "Upgrade, HTTP2-Settings",
                "Upgrade": "h2c",
                "HTTP2-Settings": "AAMAAABkAAQCAAAAAAIAAAAA",
            },
        )
        assert upgraded.http_version == "HTTP/1.1" and upgraded.status_code == 204  # the upgrade is ignored
        with httpx.Client(http1=False, http2=True) as client, pytest.raises(httpx.TransportError):
            client.get(f"{envd}/health")
        assert "h2 package is missing" in agent.stderr()
