"""Fixtures for real UML guests (root only) from the real default template.

- `default_template` (session): the built `code-interpreter` template of this
  host's config; built (minutes, cached by recipe hash) if missing, skipped
  with the reason when it cannot be built here.
- `uml_config`: private state/run dirs, a test-only host_network and uid range,
  so nothing collides with a running `cube serve`.
- `cubevs`: a CubeVS started for the test, whose resolver forwards to a dead
  loopback port (no test traffic leaves the host); `runtime`: an `UmlRuntime` over it.
- `boot`: `async with boot(slot) as (instance, spec):` one running sandbox,
  killed at exit; claimed open (`umlguests.claim`) unless `claimed=False`.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import umlguests

from appliance.config import Config
from appliance.net.service import CubeVS
from appliance.records import TemplateManifest
from appliance.runtime.base import BootSpec
from appliance.runtime.uml.instance import UmlInstance
from appliance.runtime.uml.runtime import UmlRuntime

TEST_HOST_NETWORK = "10.231.0.0/24"
TEST_UID_BASE = 310_000
# Nothing listens here: guest DNS lookups fail fast instead of reaching the internet.
DEAD_DNS_UPSTREAM = "127.0.0.1:9"

Boot = Callable[..., AbstractAsyncContextManager[tuple[UmlInstance, BootSpec]]]


@pytest.fixture(scope="session")
def default_template() -> TemplateManifest:
    return umlguests.default_template()


@pytest.fixture
def uml_config() -> Iterator[Config]:
    with umlguests.private_config("cubetest-uml-", TEST_HOST_NETWORK, TEST_UID_BASE) as config:
        yield config


@pytest.fixture
async def cubevs(uml_config: Config) -> AsyncIterator[CubeVS]:
    async with CubeVS.start(uml_config, dns_upstreams=[DEAD_DNS_UPSTREAM]) as started:
        yield started


@pytest.fixture
async def runtime(uml_config: Config, cubevs: CubeVS) -> UmlRuntime:
    return UmlRuntime(uml_config, cubevs)


@pytest.fixture
def boot(runtime: UmlRuntime, uml_config: Config, default_template: TemplateManifest) -> Boot:
    @asynccontextmanager
    async def booted(slot: int = 0, claimed: bool = True) -> AsyncIterator[tuple[UmlInstance, BootSpec]]:
        spec = BootSpec.for_template(
            uml_config, default_template, "cubetest-uml-" + secrets.token_hex(4), slot
        )
        async with trio.open_nursery() as nursery:
            instance = await nursery.start(runtime.run, spec)
            assert isinstance(instance, UmlInstance)
            if claimed:
                await umlguests.claim(instance)
            yield instance, spec
            nursery.cancel_scope.cancel()

    return booted
