"""Snapshots and forks through the unmodified E2B SDK against `cube serve` with the runtime double:
the request checks, the error shapes the SDK parses, tenancy. Real snapshots: test_snapshots_uml.py."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import InvalidArgumentException, NotFoundException, SandboxException

from appliance.config import Config
from appliance.cubelet.state import SandboxState
from appliance.records import TemplateManifest

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


def new_key(service: ServiceHarness, name: str) -> str:
    response = httpx.post(
        f"{service.url}/cube/keys", json={"name": name}, headers={"X-API-KEY": service.admin_token}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def test_fork_count_outside_1_to_20_is_e2bs_400(sdk_env: ServiceHarness, api_key: str) -> None:
    sandbox = Sandbox.create()
    for count in (0, 21, -1, "3", True):
        response = httpx.post(
            f"{sdk_env.url}/sandboxes/{sandbox.sandbox_id}/fork",
            json={"count": count},
            headers={"X-API-KEY": api_key},
        )
        assert response.status_code == 400, (count, response.text)
        assert response.json() == {"code": 400, "message": "count must be an integer between 1 and 20"}
    with pytest.raises(InvalidArgumentException):
        sandbox.fork(count=21)  # the SDK refuses it before sending
    assert sandbox.is_running()


def test_fork_without_memory_checkpoints_reports_each_fork_failed_and_what_works(
    sdk_env: ServiceHarness,
) -> None:
    sandbox = Sandbox.create()
    results = sandbox.fork(count=3)
    assert len(results) == 3
    for result in results:
        assert isinstance(result, SandboxException)
        assert "409" in str(result) and "memory checkpoint" in str(result)
        assert 'create_snapshot(mode="filesystem")' in str(result) and "Sandbox.create" in str(result)
    assert len(Sandbox.fork(sandbox.sandbox_id)) == 1  # count omitted: the API default, 1
    info = sandbox.get_info()
    assert info.sandbox_id == sandbox.sandbox_id and sandbox.is_running()  # the source is untouched
    assert [s.sandbox_id for s in Sandbox.list().next_items()] == [sandbox.sandbox_id]


def test_a_full_snapshot_where_memory_cannot_be_checkpointed_says_what_works(
    sdk_env: ServiceHarness, api_key: str
) -> None:
    sandbox = Sandbox.create()
    with pytest.raises(SandboxException) as caught:
        sandbox.create_snapshot(mode="full")
    assert "409" in str(caught.value) and 'mode="filesystem"' in str(caught.value)
    assert "the fake runtime" in str(caught.value)
    response = httpx.post(
        f"{sdk_env.url}/sandboxes/{sandbox.sandbox_id}/snapshots",
        json={"memory": True},
        headers={"X-API-KEY": api_key},
    )
    body = response.json()
    assert response.status_code == 409 and body["code"] == 409
    assert body["error_code"] == "snapshot_mode_unsupported"
    # Filesystem mode needs a disk file the runtime double does not have: E2B's 409 for a node
    # that cannot take a filesystem snapshot.
    with pytest.raises(SandboxException) as caught:
        sandbox.create_snapshot(mode="filesystem")
    assert "409" in str(caught.value)
    assert list(Sandbox.list_snapshots().next_items()) == []
    assert sandbox.is_running()


def test_bad_snapshot_requests_are_e2b_errors(sdk_env: ServiceHarness, api_key: str) -> None:
    sandbox = Sandbox.create()
    headers = {"X-API-KEY": api_key}
    url = f"{sdk_env.url}/sandboxes/{sandbox.sandbox_id}/snapshots"
    for body in ({"memory": "yes"}, {"name": 5}, {"name": "../etc"}, {"name": "Has Space"}):
        response = httpx.post(url, json=body, headers=headers)
        assert response.status_code == 400 and response.json()["code"] == 400, (body, response.text)
    missing = httpx.post(f"{sdk_env.url}/sandboxes/nosuchsandbox/snapshots", json={}, headers=headers)
    assert missing.status_code == 404 and missing.json()["code"] == 404
    assert httpx.get(f"{sdk_env.url}/snapshots?limit=0", headers=headers).status_code == 400
    with pytest.raises(SandboxException):
        Sandbox.create("nosuchsnapshot")
    assert Sandbox.delete_snapshot("nosuchsnapshot") is False
    assert sandbox.is_running()


def test_another_team_cannot_snapshot_or_fork_a_sandbox(sdk_env: ServiceHarness) -> None:
    sandbox = Sandbox.create()
    other = new_key(sdk_env, "other-team")
    with pytest.raises(SandboxException) as caught:
        Sandbox.create_snapshot(sandbox.sandbox_id, mode="filesystem", api_key=other)
    assert "not found" in str(caught.value)
    with pytest.raises(NotFoundException):
        Sandbox.fork(sandbox.sandbox_id, count=2, api_key=other)
    assert sandbox.is_running()


def test_deleting_a_snapshot_or_template_drains_its_pool_and_the_runtimes_artefacts(
    service_config: Config, fake_runtime: FakeRuntime, start_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deleted template keeps nothing warm: its pooled guests end at once (not at the keeper's
    next round), its pool is forgotten, and the runtime is told to delete what it keeps to start
    it (kvm: its snapshots, a full snapshot's memory among them); creating from it is E2B's 404."""
    service = start_service(dataclasses.replace(service_config, pool_size=1), fake_runtime)
    made = httpx.post(
        f"{service.url}/cube/keys", json={"name": "snapper"}, headers={"X-API-KEY": service.admin_token}
    )
    key, owner = made.json()["key"], made.json()["team"]
    monkeypatch.setenv("E2B_API_URL", service.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", service.url)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    templates = service.config.templates_dir
    TemplateManifest("tpl-pooled", templates / "tpl-pooled", memory_mb=256, owner=owner).save()
    TemplateManifest("snap-1", templates / "snap-1", memory_mb=256, owner=owner, snapshot_of="isb").save()
    Sandbox.create("snap-1", api_key=key).kill()
    cubelet = service.running.cubelet

    def pool_of(template_id: str) -> dict[str, int]:
        return dict(cubelet.pool_state(template_id))

    deadline = time.monotonic() + 60
    while service.run_sync_in_service(pool_of, "tpl-pooled")["ready"] < 1:  # the pool fills
        assert time.monotonic() < deadline, "the template's pool did not fill"
        time.sleep(0.05)
    [warm] = service.run_sync_in_service(cubelet.pools.ready, "tpl-pooled")
    assert service.run_sync_in_service(pool_of, "snap-1") == {"target": 0, "ready": 0, "booting": 0}

    for template_id in ("snap-1", "tpl-pooled"):
        response = httpx.delete(f"{service.url}/templates/{template_id}", headers={"X-API-KEY": key})
        assert response.status_code == 204, response.text
        assert fake_runtime.forgotten[-1] == template_id
        assert not (templates / template_id).exists()
        with pytest.raises(SandboxException) as caught:
            Sandbox.create(template_id, api_key=key)
        assert str(caught.value).startswith("404:") and "not found" in str(caught.value)
    # Ended by the delete itself (the keeper, woken meanwhile, finds no pool of it to drop).
    assert service.run_sync_in_service(lambda: warm.state) in (SandboxState.ENDING, SandboxState.ENDED)
    assert service.run_sync_in_service(pool_of, "tpl-pooled") == {"target": 0, "ready": 0, "booting": 0}
    assert "tpl-pooled" not in service.run_sync_in_service(lambda: list(cubelet.pools._pools))
