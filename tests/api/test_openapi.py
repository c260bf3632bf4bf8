"""`/openapi.json` describes every route, and a bounded schemathesis run against a private service
(runtime double) finds no 5xx, only E2B-shaped error bodies, and loses no sandbox."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import schemathesis
from api_routes import app_routes
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from appliance.config import Config

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness

# Examples per operation and generation mode: ~30 operations x 2 modes x this, well under a minute.
EXAMPLES = 12
# Build submissions would pull images from public registries (no network from tests) or build
# for real; they are attacked in test_limits.py / test_tenancy.py instead.
NOT_FUZZED = {("POST", "/templates/builds"), ("POST", "/templates/builds/dockerfile")}


def normalized(path: str) -> str:
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


def test_openapi_describes_every_route_and_only_those(service: ServiceHarness) -> None:
    response = httpx.get(f"{service.url}/openapi.json")  # public: no key
    assert response.status_code == 200
    document = response.json()
    described = {
        (method.upper(), normalized(path))
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert described == {(method, normalized(rule)) for method, rule in app_routes()}
    schemathesis.openapi.from_dict(document)  # a valid OpenAPI document


def is_e2b_error(response: Any) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return (
        isinstance(body, dict)
        and body.get("code") == response.status_code
        and isinstance(body.get("message"), str)
    )


def fuzz(operation: Any, mode: GenerationMode, base_url: str, key: str) -> list[str]:
    """Up to EXAMPLES cases of one operation; what went wrong, as lines."""
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,  # no .hypothesis directory left behind
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        # Valid cases carry the fuzzer's key; invalid ones keep whatever key they were given.
        given_key = any(k.lower() == "x-api-key" for k in case.headers or {})
        if not (mode is GenerationMode.NEGATIVE and given_key):
            case.headers = {**(case.headers or {}), "X-API-KEY": key}
        response = case.call(base_url=base_url, timeout=30)
        where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:150]}"
        if response.status_code >= 500:
            failures.append("server error: " + where)
        elif response.status_code >= 400 and not is_e2b_error(response):
            failures.append("not an E2B error body: " + where)

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE  # nothing in this operation can be made invalid
    return failures


@pytest.mark.slow  # schemathesis walks every route: ~20 s
def test_fuzz_finds_no_5xx_and_loses_no_sandbox(
    service_config: Config, fake_runtime: FakeRuntime, start_service: Callable[..., ServiceHarness]
) -> None:
    # A small team cap keeps the fuzz's creates (which do start guests) within the memory budget.
    service = start_service(dataclasses.replace(service_config, max_sandboxes_per_team=4), fake_runtime)
    admin = {"X-API-KEY": service.admin_token}

    def new_key(name: str) -> str:
        return str(httpx.post(f"{service.url}/cube/keys", json={"name": name}, headers=admin).json()["key"])

    bystander, fuzzer = new_key("bystander"), new_key("fuzzer")
    kept = httpx.post(f"{service.url}/v2/sandboxes", json={}, headers={"X-API-KEY": bystander}).json()
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    skipped = {(method, normalized(path)) for method, path in NOT_FUZZED}
    failures: list[str] = []
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) not in skipped:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                failures += fuzz(operation, mode, service.url, fuzzer)
    assert failures == [], "\n".join(failures[:20])
    assert time.monotonic() - started < 60
    # The sandbox another team had before the fuzz is still there and answers.
    detail = httpx.get(f"{service.url}/sandboxes/{kept['sandboxID']}", headers={"X-API-KEY": bystander})
    assert detail.status_code == 200 and detail.json()["state"] == "running"
    routed = {"E2b-Sandbox-Id": kept["sandboxID"], "X-Access-Token": kept["envdAccessToken"]}
    assert httpx.get(f"{service.url}/health", headers=routed).status_code == 204
    assert httpx.get(f"{service.url}/health").json()["status"] == "ok"


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """schemathesis calls through requests, which honours proxy variables: the service is on loopback."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
