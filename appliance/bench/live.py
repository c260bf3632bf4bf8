"""What the scenarios against a running appliance share: where it is, the SDK pointed at
it, progress bars, and killing every sandbox a scenario started.

The service is found like every other CLI command finds it (`ApiClient`: URL from
the config, key from --api-key / CUBE_API_KEY or the admin token); CUBE_API_URL
overrides the URL, e.g. for a service started on another port.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import click
import httpx

from appliance.api.client import ApiClient
from appliance.config import Config

POOL_QUIET_S = 6.0  # longer than the service's pool keeper's retry period (5 s)
SANDBOX_TIMEOUT_S = 300  # E2B timeout of every bench sandbox: a crashed bench leaves nothing for long
_SDK_VARIABLES = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "E2B_DOMAIN", "E2B_DEBUG")


def target(config: Config, api_key: str | None = None) -> ApiClient:
    api = ApiClient.from_config(config, api_key)
    url = os.environ.get("CUBE_API_URL")
    if url:
        api.base_url = url.rstrip("/")
    return api


@contextmanager
def sdk_pointed_at(api: ApiClient) -> Iterator[None]:
    """E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY set to the appliance for the block, then restored."""
    saved = {name: os.environ.get(name) for name in _SDK_VARIABLES}
    for name in ("E2B_DOMAIN", "E2B_DEBUG"):
        os.environ.pop(name, None)
    os.environ.update(E2B_API_URL=api.base_url, E2B_SANDBOX_URL=api.base_url, E2B_API_KEY=api.key)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def progress(length: int, label: str) -> Iterator[Any]:
    """A click progress bar on stderr (a plain label when stderr is not a terminal)."""
    with click.progressbar(length=length, label=f"  {label}", file=sys.stderr, show_pos=True) as bar:
        yield bar


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def http_client(api: ApiClient, timeout: float = 180) -> httpx.Client:
    return httpx.Client(base_url=api.base_url, headers=api.headers, timeout=timeout, trust_env=False)


def kill_all(client: httpx.Client, sandbox_ids: list[str], parallel: int = 4) -> int:
    """DELETE every sandbox in the list (404 counts as gone); returns how many could not be killed."""

    def kill(sandbox_id: str) -> bool:
        try:
            return client.delete(f"/sandboxes/{sandbox_id}").status_code in (200, 204, 404)
        except httpx.HTTPError:
            return False

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        failed = sum(not ok for ok in pool.map(kill, list(sandbox_ids)))
    sandbox_ids.clear()
    return failed


def pool_state_of(template_body: dict[str, Any]) -> dict[str, int]:
    """A template's warm pool from its `GET /templates/{id}` body: target, ready, booting."""
    state = template_body.get("warmPool") or {}
    return {key: int(state.get(key, 0)) for key in ("target", "ready", "booting")}


def wait_pool_idle(client: httpx.Client, template: str, limit_s: float = 600.0) -> dict[str, int]:
    """Until the template's pool is full, or nothing boots for it twice in a row `POOL_QUIET_S`
    apart (a pool the memory budget keeps short); the state then."""
    deadline = time.monotonic() + limit_s
    quiet = 0
    while True:
        state = pool_state_of(client.get(f"/templates/{template}").raise_for_status().json())
        quiet = quiet + 1 if state["booting"] == 0 else 0
        if state["ready"] >= state["target"] or quiet >= 2 or time.monotonic() > deadline:
            return state
        time.sleep(POOL_QUIET_S if state["booting"] == 0 else 1.0)


def wait_memory_settled(
    read: Callable[[], int], *, window_s: float = 2.0, tolerance: int = 16 << 20, limit_s: float = 60.0
) -> int:
    """Poll `read` (bytes) until two readings `window_s` apart differ by less than `tolerance`."""
    deadline = time.monotonic() + limit_s
    previous = read()
    while True:
        time.sleep(window_s)
        current = read()
        if abs(current - previous) < tolerance or time.monotonic() > deadline:
            return current
        previous = current
