"""Restarting `cube serve` keeps keys and templates and never loses a sandbox silently."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from appliance.config import Config
from appliance.master.service import RESTART_REASON, STOP_REASON
from appliance.master.store import SqliteStore
from appliance.records import RUNNING, SandboxRecord

if TYPE_CHECKING:
    from conftest import ServiceHarness


def test_stop_and_start_again_reports_sandboxes_dead_and_keeps_keys(
    service_config: Config, start_service: Callable[[Config], ServiceHarness]
) -> None:
    first = start_service(service_config)
    try:
        key = httpx.post(
            f"{first.url}/cube/keys", json={"name": "kept"}, headers={"X-API-KEY": first.admin_token}
        ).json()["key"]
        headers = {"X-API-KEY": key}
        sandbox_id = httpx.post(f"{first.url}/v2/sandboxes", json={}, headers=headers).json()["sandboxID"]
    finally:
        first.stop()
    assert not (service_config.run_dir / "cube.pid").exists()
    assert not (service_config.sandboxes_dir / sandbox_id).exists()

    second = start_service(service_config)
    try:
        assert httpx.get(f"{second.url}/v2/sandboxes", headers=headers).json() == []
        gone = httpx.get(f"{second.url}/sandboxes/{sandbox_id}", headers=headers)
        assert gone.status_code == 404 and STOP_REASON in gone.json()["message"]
        admin = {"X-API-KEY": second.admin_token}
        detail = httpx.get(f"{second.url}/cube/sandboxes/{sandbox_id}", headers=admin).json()
        assert detail["state"] == "dead" and detail["endReason"] == STOP_REASON
        assert [e["kind"] for e in detail["events"]] == ["created", "dead"]
        templates = httpx.get(f"{second.url}/templates", headers=headers).json()
        assert [t["templateID"] for t in templates] == ["code-interpreter"]
    finally:
        second.stop()


def test_sandboxes_left_running_by_a_crash_are_reported_dead(
    service_config: Config, start_service: Callable[[Config], ServiceHarness]
) -> None:
    store = SqliteStore(service_config.db_path)
    now = time.time()
    store.put_sandbox(
        SandboxRecord(
            sandbox_id="crashed1",
            template_id="code-interpreter",
            alias=None,
            client_id="c",
            state=RUNNING,
            started_at=now,
            end_at=now + 300,
            cpu_count=1,
            memory_mb=256,
            disk_size_mb=1024,
            envd_access_token="t",
        )
    )
    store.close()
    harness = start_service(service_config)
    try:
        assert harness.running is not None and harness.running.reported_dead_at_start == ["crashed1"]
        admin = {"X-API-KEY": harness.admin_token}
        detail = httpx.get(f"{harness.url}/cube/sandboxes/crashed1", headers=admin).json()
        assert detail["state"] == "dead" and detail["endReason"] == RESTART_REASON
        everything = httpx.get(f"{harness.url}/cube/sandboxes", params={"all": "1"}, headers=admin).json()
        assert [s["sandboxID"] for s in everything] == ["crashed1"]
    finally:
        harness.stop()
