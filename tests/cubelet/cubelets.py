"""What the cubelet tests share: a running cubelet over a runtime double, requests, waits."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from appliance.config import Config
from appliance.cubelet.cubelet import Cubelet, NetworkPolicyService, SandboxRequest
from appliance.master.store import SqliteStore
from appliance.master.templates import TemplateRegistry

if TYPE_CHECKING:
    from conftest import FakeRuntime


@asynccontextmanager
async def running_cubelet(
    config: Config, runtime: FakeRuntime, network: NetworkPolicyService | None = None
) -> AsyncIterator[Cubelet]:
    store = SqliteStore(config.db_path)
    registry = TemplateRegistry(config, store)
    try:
        async with trio.open_nursery() as nursery:
            cubelet = Cubelet(config, runtime, store, network, templates=registry.refresh)
            await nursery.start(cubelet.run)
            yield cubelet
            await cubelet.shutdown("test over")
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def request_for(cubelet: Cubelet, **changes: object) -> SandboxRequest:
    template = cubelet._templates()["code-interpreter"]
    return dataclasses.replace(SandboxRequest(template=template, alias=None, timeout_s=300), **changes)


def slot_of(cubelet: Cubelet, sandbox_id: str) -> int:
    live = cubelet.sandboxes.get(sandbox_id)
    assert live is not None
    return live.slot


def next_pooled(cubelet: Cubelet) -> str:
    return cubelet.pools.ready("code-interpreter")[0].sandbox_id


async def wait_until(predicate: object, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.05)
