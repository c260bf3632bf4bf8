"""Signed file URLs: in single-port mode `download_url()` / `upload_url()` name no sandbox
(the SDK builds them from E2B_SANDBOX_URL); the router sends them to the sandbox whose envd
token signed them, and to no other. Expired ones are 401 as envd answers them; forged ones
reach no sandbox."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import pytest
from e2b import Sandbox

from appliance.runtime.base import ENVD_PORT

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


class NamedGuest:
    """An envd stand-in that answers its name and records the requests that reached it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[tuple[str, str]] = []
        guest = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                guest.requests.append((self.command, self.path))
                body = guest.name.encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = _answer
            do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def two_sandboxes(
    sdk_env: ServiceHarness, fake_runtime: FakeRuntime
) -> Iterator[list[tuple[Sandbox, NamedGuest]]]:
    """Two sandboxes whose envd port the router reaches only as far as a NamedGuest each."""
    made: list[tuple[Sandbox, NamedGuest]] = []
    try:
        for name in ("A", "B"):
            sandbox, guest = Sandbox.create(timeout=60), NamedGuest(name)
            made.append((sandbox, guest))
            instance = fake_runtime.instances[sandbox.sandbox_id]
            own = instance.endpoint
            instance.endpoint = (  # type: ignore[method-assign]
                lambda port, own=own, guest=guest: (
                    guest.server.server_address[:2] if port == ENVD_PORT else own(port)
                )
            )
        yield made
    finally:
        for sandbox, guest in made:
            sandbox.kill()
            guest.close()


def test_a_signed_url_without_a_sandbox_id_reaches_the_sandbox_that_signed_it(
    two_sandboxes: list[tuple[Sandbox, NamedGuest]],
) -> None:
    (a, guest_a), (b, guest_b) = two_sandboxes
    download = a.download_url("/home/user/report.csv", "user")
    assert "signature=" in download and a.sandbox_id not in download  # nothing names the sandbox
    assert httpx.get(download).text == "A"
    upload = b.upload_url("/home/user/in.txt", "user")
    assert httpx.post(upload, files={"file": ("in.txt", b"x")}).text == "B"
    assert [m for m, _ in guest_a.requests] == ["GET"] and [m for m, _ in guest_b.requests] == ["POST"]
    assert guest_a.requests[0][1] == urlsplit(download).path + "?" + urlsplit(download).query


def test_an_expired_signed_url_is_401_and_reaches_no_sandbox(
    two_sandboxes: list[tuple[Sandbox, NamedGuest]],
) -> None:
    (a, guest_a), _ = two_sandboxes
    expired = a.download_url("/home/user/report.csv", "user", use_signature_expiration=-120)
    for headers in ({}, {"E2b-Sandbox-Id": a.sandbox_id}):  # single-port, and header-routed
        response = httpx.get(expired, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"code": 401, "message": "signature is already expired"}
    assert guest_a.requests == []


def test_a_forged_or_altered_signed_url_reaches_no_sandbox(
    two_sandboxes: list[tuple[Sandbox, NamedGuest]],
) -> None:
    (a, guest_a), (b, guest_b) = two_sandboxes
    genuine = a.download_url("/home/user/report.csv", "user")
    for forged in (
        genuine.replace("report.csv", "secrets.txt"),  # another path under A's signature
        genuine.replace("username=user", "username=root"),  # another user
        genuine.split("signature=")[0] + "signature=" + "A" * 43,  # a guessed signature
    ):
        response = httpx.get(forged)
        assert response.status_code == 404 and response.json()["code"] == 404  # the control plane's
    # With B's id on it, A's signature is still refused as if B did not exist.
    response = httpx.get(genuine, headers={"E2b-Sandbox-Id": b.sandbox_id})
    assert response.status_code == 502 and "was not found" in response.json()["message"]
    assert guest_a.requests == [] and guest_b.requests == []
