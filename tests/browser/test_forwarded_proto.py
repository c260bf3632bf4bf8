"""The router tells a guest server whether its client came over TLS (`X-Forwarded-Proto`): the
browser template's CDP front then hands out `wss://` DevTools URLs to clients that came through
the TLS port (host routing). Pure: the service with its fake runtime, whose guest echoes headers."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

import httpx

from appliance.proxy.tls import ca_cert_path

if TYPE_CHECKING:
    from conftest import ServiceHarness


def _sandbox(service: ServiceHarness, api_key: str) -> tuple[str, str]:
    response = httpx.post(f"{service.url}/v2/sandboxes", json={}, headers={"X-API-KEY": api_key})
    assert response.status_code == 201, response.text
    return response.json()["sandboxID"], response.json()["envdAccessToken"]


def test_the_guest_learns_the_client_scheme_and_cannot_be_told_otherwise(
    service: ServiceHarness, api_key: str
) -> None:
    sandbox_id, token = _sandbox(service, api_key)
    forged = {"X-Forwarded-Proto": "https", "X-Access-Token": token}
    plain = httpx.get(
        f"{service.url}/headers",
        headers={"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49999", **forged},
    )
    assert plain.status_code == 200 and plain.json()["x-forwarded-proto"] == "http"

    hostname = f"49999-{sandbox_id}.{service.config.domain}"
    context = ssl.create_default_context(cafile=str(ca_cert_path(service.config.state_dir)))
    port = int(service.tls_url.rsplit(":", 1)[1])
    with httpx.Client(verify=context) as client:
        secure = client.get(
            f"https://127.0.0.1:{port}/headers",
            headers={"Host": hostname, **forged, "X-Forwarded-Proto": "http"},
            extensions={"sni_hostname": hostname},
        )
    assert secure.status_code == 200 and secure.json()["x-forwarded-proto"] == "https"
