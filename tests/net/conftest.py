"""Fixtures for CubeVS tests (root only): the namespace world, a running CubeVS, a fake upstream DNS.

- `world` (session): internet/metadata/LAN hosts in namespaces, see networld.py.
- `upstream_server`: a DNS server on 127.0.0.1 answering `UPSTREAM_RECORDS`, logging the names
  it is asked; `dns_upstream`: its "ip:port".
- `vs`: a started CubeVS on the world's host_network with private run dir and pins.
- `sandbox`: factory `async with sandbox(policy, guest="veth"|"tap") as (net, guest)`.
"""

from __future__ import annotations

import fcntl
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
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

WORLDS = 50  # test worlds 200..249: 10.254.<n>.0/24 each


def _lock(path: str) -> int | None:
    """An fd holding an exclusive lock on the file at `path` (made if missing), or None if
    someone else holds it. The file is removed by whoever holds the lock when done, so the
    lock only counts while the path still names the locked file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


@contextmanager
def _world_number() -> Iterator[int]:
    """A world number (its host_network, routing table, CubeVS tag) no other test session on
    this host holds: concurrent sessions sharing one tore down each other's routes."""
    first = os.getpid() % WORLDS
    for i in range(WORLDS):
        n = 200 + (first + i) % WORLDS
        path = f"/run/lock/cubetest-net-world-{n}"
        fd = _lock(path)
        if fd is None:
            continue
        try:
            yield n
        finally:
            os.unlink(path)
            os.close(fd)
        return
    raise RuntimeError(f"all {WORLDS} CubeVS test worlds are in use on this host")


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("CubeVS tests need root")
    with _world_number() as n:
        w = World.create(n=n)
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
