"""The production shape (PROTOCOL.md §1.3 option B) with the real SDK: E2B_DOMAIN + SSL_CERT_FILE.

The SDK talks HTTPS to api.<domain> and <port>-<id>.<domain> on port 443; a small
CONNECT proxy (HTTPS_PROXY) stands in for wildcard DNS and sends every tunnel to
the service's TLS port, so routing happens on Host/SNI exactly as in production.
The proxy is also passed as the SDK's `proxy` option: the SDK caches one
transport per proxy for the whole process, so the environment alone would not
reach a transport another test already built.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from e2b import Sandbox

from appliance.proxy.tls import ca_cert_path

if TYPE_CHECKING:
    from conftest import ServiceHarness


class _ConnectProxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    target: tuple[str, int]


class _ConnectHandler(socketserver.BaseRequestHandler):
    server: _ConnectProxy

    def handle(self) -> None:
        client: socket.socket = self.request
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        if not head.startswith(b"CONNECT "):
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            return
        with socket.create_connection(self.server.target) as upstream:
            client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            pump = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
            pump.start()
            _pipe(client, upstream)
            pump.join(timeout=5)


def _pipe(source: socket.socket, destination: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            destination.sendall(data)
    except OSError:
        pass
    finally:
        try:
            destination.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def tls_sdk_proxy(service: ServiceHarness, api_key: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    tls_port = int(service.tls_url.rsplit(":", 1)[1])
    proxy = _ConnectProxy(("127.0.0.1", 0), _ConnectHandler)
    proxy.target = ("127.0.0.1", tls_port)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    for name in (
        "E2B_API_URL",
        "E2B_SANDBOX_URL",
        "E2B_DEBUG",
        "NO_PROXY",
        "no_proxy",
        "HTTP_PROXY",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("E2B_DOMAIN", service.config.domain)
    monkeypatch.setenv("E2B_API_KEY", api_key)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_cert_path(service.config.state_dir)))
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.server_address[1]}")
    yield f"http://127.0.0.1:{proxy.server_address[1]}"
    proxy.shutdown()
    proxy.server_close()
    thread.join(timeout=5)


def test_sdk_over_tls_with_host_routing(tls_sdk_proxy: str) -> None:
    sandbox = Sandbox.create(proxy=tls_sdk_proxy)
    try:
        assert sandbox.get_info().state.value == "running"
        assert sandbox.is_running()  # https://49983-<id>.<domain>/health, routed by Host
        assert [s.sandbox_id for s in Sandbox.list(proxy=tls_sdk_proxy).next_items()] == [sandbox.sandbox_id]
    finally:
        sandbox.kill()
    assert not sandbox.is_running()
