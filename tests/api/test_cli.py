"""The `cube` / `cubemastercli` verbs against a running service."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx
import pytest
from click.testing import CliRunner

from appliance.cli import main

if TYPE_CHECKING:
    from conftest import ServiceHarness


@pytest.fixture
def cli(service: ServiceHarness, tmp_path: object) -> CliRunner:
    port = service.url.rsplit(":", 1)[1]
    return CliRunner(
        env={
            "CUBE_CONFIG": "/nonexistent/appliance.toml",
            "CUBE_STATE_DIR": str(service.config.state_dir),
            "CUBE_API_PORT": port,
            "CUBE_API_KEY": "",
        }
    )


def run(cli: CliRunner, *args: str) -> str:
    result = cli.invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_sandbox_list_info_logs_kill(cli: CliRunner, service: ServiceHarness) -> None:
    headers = {"X-API-KEY": service.admin_token}
    sandbox_id = httpx.post(f"{service.url}/v2/sandboxes", json={}, headers=headers).json()["sandboxID"]
    assert sandbox_id in run(cli, "sandbox", "list")
    listed = json.loads(run(cli, "sandbox", "list", "--json"))
    assert [s["sandboxID"] for s in listed] == [sandbox_id]
    assert "guest agent ready" in run(cli, "sandbox", "logs", "--sandbox-id", sandbox_id)
    assert f"killed {sandbox_id}" in run(cli, "sandbox", "kill", "--sandbox-id", sandbox_id)
    assert json.loads(run(cli, "sandbox", "list", "--json")) == []
    info = run(cli, "sandbox", "info", sandbox_id)
    assert "state: dead" in info and "killed by request" in info
    failed = cli.invoke(main, ["sandbox", "kill", "--sandbox-id", sandbox_id])
    assert failed.exit_code == 1 and "404" in failed.output


def test_tpl_verbs(cli: CliRunner) -> None:
    assert "code-interpreter" in run(cli, "tpl", "list")
    info = json.loads(run(cli, "tpl", "info", "--template-id", "code-interpreter", "--json"))
    assert info["aliases"] == ["ci"]
    assert "deleted code-interpreter" in run(
        cli, "tpl", "delete", "--template-id", "code-interpreter", "--force"
    )
    assert json.loads(run(cli, "tpl", "list", "--json")) == []


def test_keys_and_ca(cli: CliRunner, service: ServiceHarness) -> None:
    created = json.loads(run(cli, "keys", "create", "--name", "ci-bot", "--json"))
    assert httpx.get(f"{service.url}/v2/sandboxes", headers={"X-API-KEY": created["key"]}).status_code == 200
    assert "ci-bot" in run(cli, "keys", "list")
    # A second key in the first one's team sees that team's sandboxes; a key of its own team does not.
    teammate = json.loads(
        run(cli, "keys", "create", "--name", "ci-bot-2", "--team", created["team"], "--json")
    )
    loner = json.loads(run(cli, "keys", "create", "--name", "other", "--json"))
    assert teammate["team"] == created["team"] != loner["team"]
    sandbox = httpx.post(f"{service.url}/v2/sandboxes", json={}, headers={"X-API-KEY": created["key"]}).json()
    for key, status in ((teammate["key"], 200), (loner["key"], 404)):
        seen = httpx.get(f"{service.url}/sandboxes/{sandbox['sandboxID']}", headers={"X-API-KEY": key})
        assert seen.status_code == status
    run(cli, "keys", "revoke", created["id"])
    assert httpx.get(f"{service.url}/v2/sandboxes", headers={"X-API-KEY": created["key"]}).status_code == 401
    assert run(cli, "ca", "path").strip() == str(service.config.state_dir / "ca" / "ca.pem")


def test_bench_api(cli: CliRunner) -> None:
    output = run(cli, "bench", "api", "--seconds", "0.2", "--concurrency", "1", "--concurrency", "4")
    assert "requests_per_s" in output
    assert output.count("list") >= 2 and output.count("get") >= 2


def test_cli_without_service_says_so(tmp_path: object) -> None:
    runner = CliRunner(
        env={
            "CUBE_CONFIG": "/nonexistent",
            "CUBE_API_PORT": "1",
            "CUBE_API_KEY": "k",
            "CUBE_STATE_DIR": "/nonexistent",
        }
    )
    result = runner.invoke(main, ["sandbox", "list"])
    assert result.exit_code == 1 and "not answering" in result.output
