"""Fixtures for CubeVS tests (root only): the namespace world, a running CubeVS, a fake upstream DNS.

- `world` (session): internet/metadata/LAN hosts in namespaces, see networld.py.
- `dns_upstream`: a DNS server on 127.0.0.1 answering `UPSTREAM_RECORDS`.
- `vs`: a started CubeVS on the world's host_network with private run dir and pins.
- `sandbox`: factory `async with sandbox(policy, guest="veth"|"tap") as (net, guest)`.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from networld import TAP_OWNER_UID, Guest, SandboxFactory, World, dns_response, tap_guest, veth_guest

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
async def dns_upstream() -> AsyncIterator[str]:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")

    async def serve_udp() -> None:
        while True:
            query, peer = await sock.recvfrom(2048)
            await sock.sendto(dns_response(query), peer)

    async def serve_tcp(stream: trio.SocketStream) -> None:
        async with stream:
            header = await stream.receive_some(2)
            query = await stream.receive_some(struct.unpack("!H", header)[0])
            response = dns_response(query)
            await stream.send_all(struct.pack("!H", len(response)) + response)

    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_udp)
            nursery.start_soon(trio.serve_listeners, serve_tcp, listeners)
            yield f"127.0.0.1:{port}"
            nursery.cancel_scope.cancel()


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
