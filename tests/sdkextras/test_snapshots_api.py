"""Snapshots and forks through the unmodified E2B SDK against `cube serve` with the runtime double:
the request checks, the error shapes the SDK parses, tenancy. Real snapshots: test_snapshots_uml.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import InvalidArgumentException, NotFoundException, SandboxException

if TYPE_CHECKING:
    from conftest import ServiceHarness


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
