"""Secrets through the unmodified E2B SDK: CRUD, values write-only, placeholders taken only in
`network.rules` header values and only for the team's own secrets, and the value found nowhere it
could leak: no API response, no log record of the service, not the main store. (Resolution by
the egress proxy on real guests: tests/secrets.)"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from e2b import Sandbox, Secret
from e2b.exceptions import SandboxException, SecretException, SecretNotFoundException

if TYPE_CHECKING:
    from conftest import ServiceHarness

VALUE = "sk-live-0123456789abcdef-do-not-leak"
NEW_VALUE = "sk-live-fedcba9876543210-rotated"


def new_key(service: ServiceHarness, name: str) -> str:
    response = httpx.post(
        f"{service.url}/cube/keys", json={"name": name}, headers={"X-API-KEY": service.admin_token}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def test_secret_crud_through_the_sdk_never_returns_the_value(
    sdk_env: ServiceHarness, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = Secret.create("OpenAI-Key", VALUE, metadata={"owner": "alice"})
    assert created.name == "openai-key" and created.version == 1 and created.secret_id.startswith("sec_")
    assert created.metadata == {"owner": "alice"}
    assert Secret.exists("openai-key") and Secret.exists(created.secret_id)
    assert Secret.get_info("OPENAI-KEY").secret_id == created.secret_id

    updated = Secret.update("openai-key", NEW_VALUE)
    assert updated.version == 2 and updated.metadata == {"owner": "alice"}
    assert [s.name for s in Secret.list().next_items()] == ["openai-key"]
    with pytest.raises(SecretException) as caught:
        Secret.create("openai-key", "again")
    assert "409" in str(caught.value)

    headers = {"X-API-KEY": api_key}
    responses = [
        httpx.get(f"{sdk_env.url}/secrets", headers=headers),
        httpx.get(f"{sdk_env.url}/secrets/{created.secret_id}", headers=headers),
        httpx.get(f"{sdk_env.url}/secrets/openai-key", headers=headers),
        httpx.post(f"{sdk_env.url}/secrets/openai-key", json={"value": NEW_VALUE}, headers=headers),
        httpx.get(f"{sdk_env.url}/openapi.json"),
    ]
    for response in responses:
        assert response.status_code == 200, response.text
        assert VALUE not in response.text and NEW_VALUE not in response.text
        assert "value" not in response.json() if isinstance(response.json(), dict) else True

    assert Secret.destroy("openai-key") is True
    assert Secret.destroy("openai-key") is False
    with pytest.raises(SecretNotFoundException):
        Secret.get_info(created.secret_id)

    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert VALUE not in logged and NEW_VALUE not in logged
    main_store = sdk_env.config.db_path.read_bytes()
    assert VALUE.encode() not in main_store and NEW_VALUE.encode() not in main_store
    secrets_file = sdk_env.config.state_dir / "secrets.db"
    assert secrets_file.stat().st_mode & 0o077 == 0  # root's alone


def test_another_team_cannot_read_rotate_or_delete_a_secret(sdk_env: ServiceHarness) -> None:
    created = Secret.create("db-password", VALUE)
    other = new_key(sdk_env, "other-team")
    assert Secret.list(api_key=other).next_items() == []
    for name in (created.secret_id, "db-password"):
        assert not Secret.exists(name, api_key=other)
        with pytest.raises(SecretNotFoundException):
            Secret.update(name, "taken-over", api_key=other)
        assert Secret.destroy(name, api_key=other) is False
    # The other team may have its own secret of that name.
    assert Secret.create("db-password", "theirs", api_key=other).secret_id != created.secret_id
    assert Secret.get_info("db-password").version == 1


def test_bad_secret_requests_are_e2b_400s(sdk_env: ServiceHarness, api_key: str) -> None:
    headers = {"X-API-KEY": api_key}
    for body in (
        {"name": "x"},
        {"name": "x", "value": ""},
        {"name": "x", "value": 5},
        {"name": "has space", "value": "v"},
        {"name": "sec_abc", "value": "v"},
        {"name": "a" * 129, "value": "v"},
        {"name": "x", "value": "v" * 70_000},
        {"name": "x", "value": "v", "metadata": {"k": 1}},
    ):
        response = httpx.post(f"{sdk_env.url}/secrets", json=body, headers=headers)
        assert response.status_code == 400 and response.json()["code"] == 400, (body, response.text)
    assert Secret.list().next_items() == []


def _ruled(host: str, placeholder: str, header: str = "Authorization") -> dict[str, object]:
    return {
        "allow_out": [host],
        "rules": {host: [{"transform": {"headers": {header: f"Bearer {placeholder}"}}}]},
    }


def test_rules_take_placeholders_and_show_them_never_the_value(sdk_env: ServiceHarness, api_key: str) -> None:
    Secret.create("openai-key", VALUE)
    placeholder = Secret.fill("openai-key")
    assert placeholder == "${e2b.secrets.openai-key}"
    sandbox = Sandbox.create(network=_ruled("api.openai.com", "${e2b.secrets.OpenAI-Key}"))
    rules = sandbox.get_info().network["rules"]  # type: ignore[index]
    assert rules == {
        "api.openai.com": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.OpenAI-Key}"}}}]
    }
    # PUT network replaces the rules, checked as at create.
    with pytest.raises(SandboxException) as caught:
        sandbox.update_network(_ruled("api.example.com", "${e2b.secrets.missing}"))  # type: ignore[arg-type]
    assert "400" in str(caught.value) and "missing" in str(caught.value)
    sandbox.update_network(_ruled("api.example.com", placeholder))  # type: ignore[arg-type]
    assert list(sandbox.get_info().network["rules"]) == ["api.example.com"]  # type: ignore[index]
    for response in (
        httpx.get(f"{sdk_env.url}/sandboxes/{sandbox.sandbox_id}", headers={"X-API-KEY": api_key}),
        httpx.get(f"{sdk_env.url}/v2/sandboxes", headers={"X-API-KEY": api_key}),
    ):
        assert response.status_code == 200 and VALUE not in response.text
    sandbox.kill()


def test_placeholders_outside_rules_unknown_or_foreign_secrets_are_400s(sdk_env: ServiceHarness) -> None:
    """Attacks at create: a placeholder where the sandbox would read the value (env vars, metadata),
    a secret that does not exist or is another team's, a placeholder kind that is not supported,
    and rule headers that would re-aim or re-frame the request."""
    Secret.create("openai-key", VALUE)
    other = new_key(sdk_env, "other-team")
    Secret.create("their-key", "theirs-do-not-leak", api_key=other)
    placeholder = Secret.fill("openai-key")
    refused: list[tuple[dict[str, Any], str]] = [
        ({"envs": {"OPENAI_API_KEY": placeholder}}, "network.rules"),
        ({"metadata": {"k": placeholder}}, "network.rules"),
        ({"network": _ruled("api.openai.com", "${e2b.secrets.missing}")}, "missing"),
        ({"network": _ruled("api.openai.com", "${e2b.secrets.their-key}")}, "their-key"),
        ({"network": _ruled("api.openai.com", "${e2b.identity.tokens.aws}")}, "workload identity"),
        ({"network": _ruled("api.openai.com", "${e2b.secrets.bad name}")}, "not a secret name"),
        ({"network": _ruled("api.openai.com", placeholder, header="Host")}, "Host"),
        ({"network": _ruled("api.openai.com", placeholder, header="Content-Length")}, "Content-Length"),
        ({"network": _ruled("not a host", placeholder)}, "not a CIDR"),
    ]
    for kwargs, reason in refused:
        with pytest.raises(SandboxException) as caught:
            Sandbox.create(**kwargs)
        assert "400" in str(caught.value) and reason in str(caught.value), (kwargs, str(caught.value))
        assert VALUE not in str(caught.value)
    assert Sandbox.list().next_items() == []
