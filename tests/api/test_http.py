"""Raw HTTP against the control plane: bad input gets a clear JSON 4xx and changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


@pytest.fixture
def client(service: ServiceHarness, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, headers={"X-API-KEY": api_key}) as client:
        yield client


def assert_json_error(response: httpx.Response, status: int, needle: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == status
    assert needle in body["message"], body


def live_ids(client: httpx.Client) -> list[str]:
    response = client.get("/v2/sandboxes")
    assert response.status_code == 200
    return [s["sandboxID"] for s in response.json()]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"templateID": 7}', "templateID"),
        (b'{"templateID": "ci", "timeout": -5}', "positive"),
        (b'{"templateID": "ci", "timeout": 99999999}', "at most"),
        (b'{"templateID": "ci", "timeout": "60"}', "whole number"),
        (b'{"templateID": "ci", "metadata": {"k": 1}}', "must be a string"),
        (b'{"templateID": "ci", "metadata": "x"}', "object of strings"),
        (b'{"templateID": "ci", "envVars": {"BAD NAME": "x"}}', "not a valid environment"),
        (b'{"templateID": "ci", "autoPause": "yes"}', "boolean"),
        (b'{"templateID": "ci", "network": {"allowOut": "1.2.3.4"}}', "invalid network policy"),
    ],
)
def test_create_rejects_bad_input(
    client: httpx.Client, fake_runtime: FakeRuntime, body: bytes, needle: str
) -> None:
    response = client.post("/v2/sandboxes", content=body, headers={"content-type": "application/json"})
    assert_json_error(response, 400, needle)
    assert fake_runtime.boots == 0
    assert live_ids(client) == []


def test_huge_metadata_is_refused(client: httpx.Client, fake_runtime: FakeRuntime) -> None:
    response = client.post("/v2/sandboxes", json={"templateID": "ci", "metadata": {"k": "x" * 10_000}})
    assert_json_error(response, 400, "at most 4096")
    many = {f"k{i}": "v" for i in range(100)}
    assert_json_error(client.post("/v2/sandboxes", json={"metadata": many}), 400, "at most 64")
    assert fake_runtime.boots == 0


def test_oversized_body_is_a_json_413(client: httpx.Client, fake_runtime: FakeRuntime) -> None:
    response = client.post("/v2/sandboxes", content=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    assert_json_error(response, 413, "")
    assert fake_runtime.boots == 0


def test_unknown_template_is_404(client: httpx.Client, fake_runtime: FakeRuntime) -> None:
    assert_json_error(
        client.post("/v2/sandboxes", json={"templateID": "nope"}), 404, "template 'nope' not found"
    )
    assert fake_runtime.boots == 0


def test_auth_is_required_and_checked(service: ServiceHarness, api_key: str) -> None:
    assert_json_error(httpx.get(f"{service.url}/v2/sandboxes"), 401, "API key")
    assert_json_error(
        httpx.get(f"{service.url}/v2/sandboxes", headers={"X-API-KEY": "wrong"}), 401, "API key"
    )
    ok = httpx.get(f"{service.url}/v2/sandboxes", headers={"Authorization": f"Bearer {api_key}"})
    assert ok.status_code == 200
    assert httpx.get(f"{service.url}/health").status_code == 200  # health needs no key
    # Only the admin token manages keys.
    assert_json_error(httpx.get(f"{service.url}/cube/keys", headers={"X-API-KEY": api_key}), 403, "admin")


def test_revoked_key_stops_working(service: ServiceHarness) -> None:
    admin = {"X-API-KEY": service.admin_token}
    created = httpx.post(f"{service.url}/cube/keys", json={"name": "temp"}, headers=admin).json()
    key_headers = {"X-API-KEY": created["key"]}
    assert httpx.get(f"{service.url}/v2/sandboxes", headers=key_headers).status_code == 200
    listed = httpx.get(f"{service.url}/cube/keys", headers=admin).json()
    assert [k["name"] for k in listed] == ["temp"] and "key" not in listed[0]
    assert httpx.delete(f"{service.url}/cube/keys/{created['id']}", headers=admin).status_code == 204
    assert httpx.get(f"{service.url}/v2/sandboxes", headers=key_headers).status_code == 401


def test_unknown_sandbox_and_routes_are_json(client: httpx.Client) -> None:
    assert_json_error(client.get("/sandboxes/missing"), 404, "missing not found")
    assert_json_error(client.delete("/sandboxes/missing"), 404, "not found")
    assert_json_error(client.post("/sandboxes/missing/timeout", json={"timeout": 5}), 404, "not found")
    assert_json_error(client.post("/sandboxes/missing/pause"), 404, "not found")
    assert_json_error(client.get("/sandboxes/missing/metrics"), 404, "not found")
    assert_json_error(client.get("/no/such/route"), 404, "")
    assert_json_error(client.patch("/v2/sandboxes"), 405, "")


def test_lifecycle_calls_validate_and_change_nothing_on_error(client: httpx.Client) -> None:
    created = client.post("/v2/sandboxes", json={"templateID": "ci", "timeout": 100})
    assert created.status_code == 201
    sandbox_id = created.json()["sandboxID"]
    end_at = client.get(f"/sandboxes/{sandbox_id}").json()["endAt"]
    assert_json_error(client.post(f"/sandboxes/{sandbox_id}/timeout", json={"timeout": -1}), 400, "positive")
    assert_json_error(client.post(f"/sandboxes/{sandbox_id}/timeout", content=b"{"), 400, "malformed")
    assert client.get(f"/sandboxes/{sandbox_id}").json()["endAt"] == end_at
    assert client.delete(f"/sandboxes/{sandbox_id}").status_code == 204


def test_create_response_shape_and_v1_paths(client: httpx.Client) -> None:
    response = client.post("/sandboxes", json={"templateID": "ci"})
    assert response.status_code == 201
    body = response.json()
    assert body["templateID"] == "code-interpreter" and body["alias"] == "ci"
    assert body["envdVersion"] == "0.6.4" and len(body["envdAccessToken"]) >= 20
    sandbox_id = body["sandboxID"]
    assert [s["sandboxID"] for s in client.get("/sandboxes").json()] == [sandbox_id]
    assert client.post(f"/sandboxes/{sandbox_id}/refreshes", json={"duration": 600}).status_code == 204
    assert client.post(f"/sandboxes/{sandbox_id}/connect", json={}).status_code == 200
    assert_json_error(client.post(f"/sandboxes/{sandbox_id}/resume", json={}), 409, "already running")
    assert client.post(f"/sandboxes/{sandbox_id}/pause").status_code == 204
    assert client.post(f"/sandboxes/{sandbox_id}/resume", json={}).status_code == 201
    assert client.put(f"/sandboxes/{sandbox_id}/network", json={"denyOut": ["10.0.0.0/8"]}).status_code == 204
    assert client.get(f"/sandboxes/{sandbox_id}").json()["network"] == {"denyOut": ["10.0.0.0/8"]}
    bad = client.put(f"/sandboxes/{sandbox_id}/network", json={"denyOut": ["not a cidr!"]})
    assert_json_error(bad, 400, "invalid network policy")
    assert client.get(f"/sandboxes/{sandbox_id}").json()["network"] == {"denyOut": ["10.0.0.0/8"]}
    logs = client.get(f"/sandboxes/{sandbox_id}/logs").json()
    assert "guest agent ready" in [entry["line"] for entry in logs["logs"]]
    logs_v2 = client.get(f"/v2/sandboxes/{sandbox_id}/logs").json()
    assert "guest agent ready" in [entry["message"] for entry in logs_v2["logs"]]
    many = client.get("/sandboxes/metrics", params={"sandbox_ids": sandbox_id}).json()
    assert set(many["sandboxes"]) == {sandbox_id}
    assert client.delete(f"/sandboxes/{sandbox_id}").status_code == 204


def test_idempotency_key_returns_the_same_sandbox(client: httpx.Client, fake_runtime: FakeRuntime) -> None:
    headers = {"Idempotency-Key": "retry-1"}
    first = client.post("/v2/sandboxes", json={"templateID": "ci"}, headers=headers)
    second = client.post("/v2/sandboxes", json={"templateID": "ci"}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json()["sandboxID"] == second.json()["sandboxID"]
    assert fake_runtime.boots == 1
    other = client.post("/v2/sandboxes", json={"templateID": "ci"}, headers={"Idempotency-Key": "retry-2"})
    assert other.json()["sandboxID"] != first.json()["sandboxID"]
    assert len(live_ids(client)) == 2


def test_templates_list_get_and_delete_refused_while_running(
    client: httpx.Client, service: ServiceHarness
) -> None:
    listed = client.get("/templates").json()
    assert [t["templateID"] for t in listed] == ["code-interpreter"]
    assert listed[0]["aliases"] == ["ci"]
    assert client.get("/templates/ci").json()["templateID"] == "code-interpreter"
    assert_json_error(client.get("/templates/nope"), 404, "not found")
    sandbox_id = client.post("/v2/sandboxes", json={"templateID": "ci"}).json()["sandboxID"]
    # A built-in template is the admin's to delete.
    assert_json_error(client.delete("/templates/code-interpreter"), 403, "only the admin")
    admin = {"X-API-KEY": service.admin_token}
    assert_json_error(client.delete("/templates/code-interpreter", headers=admin), 409, "live sandboxes")
    assert client.get(f"/sandboxes/{sandbox_id}").status_code == 200
    deleted = client.delete("/templates/code-interpreter", params={"force": "true"}, headers=admin)
    assert deleted.status_code == 204
    assert client.get(f"/sandboxes/{sandbox_id}").status_code == 404
    assert client.get("/templates").json() == []


def test_boot_failure_is_a_500_that_is_not_retried(client: httpx.Client, fake_runtime: FakeRuntime) -> None:
    fake_runtime.fail_next_boot = True
    response = client.post("/v2/sandboxes", json={"templateID": "ci"})
    assert_json_error(response, 500, "fake boot failure")
    assert response.headers["should-retry"] == "false"
    assert live_ids(client) == []
