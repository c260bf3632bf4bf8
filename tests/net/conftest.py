"""Fixtures for CubeVS tests (root only): the namespace world, a running CubeVS, a fake upstream DNS.

- `world` (session): internet/metadata/LAN hosts in namespaces, see networld.py.
- `upstream_server`: a DNS server on 127.0.0.1 answering `UPSTREAM_RECORDS`, logging the names
  it is asked; `dns_upstream`: its "ip:port".
- `vs`: a started CubeVS on the world's host_network with private run dir and pins.
- `sandbox`: factory `async with sandbox(policy, guest="veth"|"tap") as (net, guest)`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from networld import (
    TAP_OWNER_UID,
    DnsUpstream,
    Guest,
    SandboxFactory,
    World,
    dns_upstream_server,
    tap_guest,
    veth_guest,
)

from appliance.config import Config
from appliance.net import CubeVS, NetworkPolicy, SandboxNetwork


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("CubeVS tests need root")
    w = World.create(n=200 + os.getpid() % 50)
    yield w
    w.destroy()


@pytest.fixture
async def upstream_server() -> AsyncIterator[DnsUpstream]:
    async with dns_upstream_server() as upstream:
        yield upstream


@pytest.fixture
def dns_upstream(upstream_server: DnsUpstream) -> str:
    return upstream_server.address


@pytest.fixture
def net_config(world: World, tmp_path: Path) -> Config:
    return Config(run_dir=tmp_path / "run", state_dir=tmp_path / "state", host_network=world.host_network)


@pytest.fixture
async def vs(net_config: Config, dns_upstream: str) -> AsyncIterator[CubeVS]:
    async with CubeVS.start(net_config, dns_upstreams=[dns_upstream]) as service:
        yield service


_ids = itertools.count()


@pytest.fixture
def sandbox(vs: CubeVS) -> SandboxFactory:
    @asynccontextmanager
    async def open_sandbox(
        policy: NetworkPolicy | None = None, guest: str = "veth"
    ) -> AsyncIterator[tuple[SandboxNetwork, Guest]]:
        n = next(_ids)
        policy = policy or NetworkPolicy()
        sandbox_id = f"cubetest-net-{os.getpid() % 0x10000:04x}-{n}"
        async with vs.sandbox_network(sandbox_id, n % 60, TAP_OWNER_UID, policy) as net:
            make_guest = veth_guest if guest == "veth" else tap_guest
            async with make_guest(net, f"{os.getpid() % 0x10000:04x}-{n}") as g:
                yield net, g

    return open_sandbox
