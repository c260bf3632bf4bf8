"""The create path through the API with a warm pool (runtime double): what the E2B SDK relies on
when the 201 arrives, and how a guest that cannot be initialised fails the create."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException

from appliance.config import Config

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


def _sdk_env(service: ServiceHarness, monkeypatch: pytest.MonkeyPatch) -> httpx.Client:
    response = httpx.post(
        f"{service.url}/cube/keys", json={"name": "test"}, headers={"X-API-KEY": service.admin_token}
    )
    key = response.json()["key"]
    for name, value in (("E2B_API_URL", service.url), ("E2B_SANDBOX_URL", service.url), ("E2B_API_KEY", key)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return httpx.Client(base_url=service.url, headers={"X-API-KEY": key})


def _wait_for_pool(client: httpx.Client, ready: int) -> None:
    deadline = time.monotonic() + 10
    while client.get("/templates/code-interpreter").json()["warmPool"]["ready"] < ready:
        assert time.monotonic() < deadline, "the warm pool did not fill"
        time.sleep(0.05)


def test_warm_create_has_env_vars_and_token_in_the_guest_before_the_201(
    service_config: Config, fake_runtime: FakeRuntime, start_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = start_service(dataclasses.replace(service_config, pool_size=1), fake_runtime)
    with _sdk_env(service, monkeypatch) as client:
        _wait_for_pool(client, 1)
        (pooled,) = fake_runtime.instances
        sandbox = Sandbox.create(template="code-interpreter", envs={"FOO": "bar"})
        # Claimed, not booted; and the guest agent was initialised before the SDK got its answer.
        assert sandbox.sandbox_id == pooled
        (init,) = fake_runtime.instances[pooled].app.init_calls
        assert init["envVars"] == {"TEMPLATE_VAR": "1", "FOO": "bar"}
        assert init["accessToken"] == sandbox._envd_access_token
        assert init["rngSeed"] and init["timestamp"]
        sandbox.kill()


def test_a_guest_that_fails_init_fails_the_create_and_leaves_nothing(
    service_config: Config, fake_runtime: FakeRuntime, start_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_runtime.fail_init = True  # the pooled guest and the cold boot behind it both answer 500
    service = start_service(dataclasses.replace(service_config, pool_size=1), fake_runtime)

    def pooled() -> list[str]:
        cubelet = service.running.cubelet
        return service.run_sync_in_service(
            lambda: [live.sandbox_id for live in cubelet.pools.ready("code-interpreter")]
        )

    with _sdk_env(service, monkeypatch) as client:
        _wait_for_pool(client, 1)
        (claimed,) = pooled()
        with pytest.raises(SandboxException, match="sandbox failed to start: guest agent /init answered 500"):
            Sandbox.create(template="code-interpreter")
        assert client.get("/v2/sandboxes").json() == []
        _wait_for_pool(client, 1)
        # The claimed guest and the cold boot behind it are torn down; only the pool's refill is left.
        deadline = time.monotonic() + 10
        while claimed in fake_runtime.instances or set(fake_runtime.instances) - set(pooled()):
            assert time.monotonic() < deadline, f"left behind: {set(fake_runtime.instances) - set(pooled())}"
            time.sleep(0.05)
        assert fake_runtime.boots == 3  # the pooled guest, the cold boot, the refill
