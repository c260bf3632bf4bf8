"""`set_timeout(0)` is E2B's "time out now": the sandbox's on-timeout action runs at once."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import httpx
import pytest
from e2b import Sandbox, SandboxState

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness

WAIT_S = 20.0  # generous: it happens within a scheduler tick


def wait_until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    pytest.fail(f"not within {WAIT_S}s: {what}")


def test_timeout_zero_kills_a_sandbox_that_times_out_by_killing(sdk_env: ServiceHarness) -> None:
    sandbox = Sandbox.create(timeout=300)
    sandbox.set_timeout(0)
    wait_until(lambda: not sandbox.is_running(), "the sandbox ended")
    assert Sandbox.kill(sandbox.sandbox_id) is False  # gone, not paused


def test_timeout_zero_pauses_a_sandbox_that_times_out_by_pausing(
    sdk_env: ServiceHarness, fake_runtime: FakeRuntime
) -> None:
    sandbox = Sandbox.create(timeout=300, lifecycle={"on_timeout": "pause", "auto_resume": False})
    try:
        sandbox.set_timeout(0)
        wait_until(lambda: sandbox.get_info().state == SandboxState.PAUSED, "the sandbox paused")
        assert fake_runtime.instances[sandbox.sandbox_id].paused_count == 1
        resumed = sandbox.connect()
        assert resumed.is_running() and resumed.get_info().state == SandboxState.RUNNING
    finally:
        sandbox.kill()


@pytest.mark.parametrize("timeout", [-1, 1.5, "soon", True])
def test_a_bad_timeout_is_400_and_the_sandbox_keeps_running(
    sdk_env: ServiceHarness, api_key: str, timeout: object
) -> None:
    sandbox = Sandbox.create(timeout=300)
    try:
        response = httpx.post(
            f"{sdk_env.url}/sandboxes/{sandbox.sandbox_id}/timeout",
            json={"timeout": timeout},
            headers={"X-API-KEY": api_key},
        )
        assert response.status_code == 400 and response.json()["code"] == 400
        assert sandbox.is_running()
    finally:
        sandbox.kill()
