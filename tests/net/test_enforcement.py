"""The eBPF egress policy, proved with real TCP connects and UDP datagrams from guests."""

from __future__ import annotations

import pytest
import trio
from networld import (
    INTERNET_IP,
    INTERNET_IP6,
    LAN_IP,
    SERVICE_PORT,
    SandboxFactory,
    World,
    connects,
    send_udp,
    serving,
)

from appliance.net import CubeVS, NetworkPolicy, PolicyError


async def reaches(
    world: World, guest_path: str, role: str, tag: bytes, ipv6: bool = False
) -> tuple[bool, bool]:
    """(TCP arrived, UDP arrived) at the world host `role`, from the guest."""
    host = world.hosts[role]
    ip = host.ip6 if ipv6 else host.ip
    async with serving(host.path) as server:
        await connects(guest_path, ip, timeout=0.7)
        await send_udp(guest_path, ip, tag)
        return await server.got_tcp(timeout=0.3), await server.got_udp(tag, timeout=0.3)


async def test_default_policy(vs: CubeVS, world: World, sandbox: SandboxFactory) -> None:
    assert vs.enforced
    async with sandbox() as (_net, guest):
        assert await reaches(world, guest.netns_path, "inet", b"inet") == (True, True)
        assert await reaches(world, guest.netns_path, "meta", b"meta") == (False, False)
        assert await reaches(world, guest.netns_path, "lan", b"lan") == (False, False)


async def test_host_addresses_are_blocked(world: World, sandbox: SandboxFactory) -> None:
    host_link_ip = "198.18." + world.host_network.split(".")[2] + ".1"  # the host end of the inet link
    async with sandbox() as (net, guest):
        host_side_ip = net.host_ip.rsplit(".", 1)[0] + "." + str(int(net.host_ip.rsplit(".", 1)[1]) - 1)
        for ip in (host_link_ip, host_side_ip):
            async with serving("/proc/self/ns/net", ip=ip, port=SERVICE_PORT + 1) as server:
                assert not await connects(guest.netns_path, ip, SERVICE_PORT + 1, timeout=0.7)
                await send_udp(guest.netns_path, ip, b"host", SERVICE_PORT + 1)
                assert not await server.got_tcp(timeout=0.2)
                assert not await server.got_udp(b"host", timeout=0.2)


async def test_sandboxes_cannot_reach_each_other(sandbox: SandboxFactory) -> None:
    async with sandbox() as (_net_a, guest_a), sandbox() as (net_b, guest_b):
        async with serving(guest_b.netns_path) as server_b:
            # The host reaches b (DNAT), a does not.
            stream = await trio.open_tcp_stream(net_b.host_ip, SERVICE_PORT)
            await stream.aclose()
            assert await server_b.got_tcp()
            server_b.tcp_peers.clear()
            assert not await connects(guest_a.netns_path, net_b.host_ip, timeout=0.7)
            await send_udp(guest_a.netns_path, net_b.host_ip, b"a->b")
            assert not await server_b.got_tcp(timeout=0.2)
            assert not await server_b.got_udp(b"a->b", timeout=0.2)


async def test_no_internet_with_allow_list(world: World, sandbox: SandboxFactory) -> None:
    policy = NetworkPolicy(allow_internet_access=False, allow_out=(f"{INTERNET_IP}/32", f"{LAN_IP}/32"))
    async with sandbox(policy) as (_net, guest):
        assert await reaches(world, guest.netns_path, "inet", b"i") == (True, True)
        # The always-blocked private ranges beat the sandbox's own allow list (test_always_blocked.py).
        assert await reaches(world, guest.netns_path, "lan", b"l") == (False, False)
        assert await reaches(world, guest.netns_path, "meta", b"m") == (False, False)


async def test_allow_beats_deny(vs: CubeVS, world: World, sandbox: SandboxFactory) -> None:
    async with sandbox(NetworkPolicy(deny_out=("0.0.0.0/0",))) as (net, guest):
        assert await reaches(world, guest.netns_path, "inet", b"i") == (False, False)
        await vs.update_policy(
            net.sandbox_id, NetworkPolicy(allow_out=(INTERNET_IP,), deny_out=("0.0.0.0/0",))
        )
        assert await reaches(world, guest.netns_path, "inet", b"i2") == (True, True)


# Generous: the update's speed is measured by benchmarks; here, only that it is prompt.
UPDATE_BOUND_S = 5.0


async def test_runtime_update_applies_promptly(vs: CubeVS, world: World, sandbox: SandboxFactory) -> None:
    inet = world.hosts["inet"]
    async with sandbox() as (net, guest), serving(inet.path) as server:
        assert await connects(guest.netns_path, INTERNET_IP)
        started = trio.current_time()
        await vs.update_policy(net.sandbox_id, NetworkPolicy(deny_out=(f"{INTERNET_IP}/32",)))
        assert trio.current_time() - started < UPDATE_BOUND_S
        server.tcp_peers.clear()
        assert not await connects(guest.netns_path, INTERNET_IP, timeout=0.7)
        assert not server.tcp_peers
        started = trio.current_time()
        await vs.update_policy(net.sandbox_id, NetworkPolicy())
        assert trio.current_time() - started < UPDATE_BOUND_S
        assert await connects(guest.netns_path, INTERNET_IP)


async def test_malformed_update_keeps_previous_policy(
    vs: CubeVS, world: World, sandbox: SandboxFactory
) -> None:
    async with sandbox(NetworkPolicy(allow_internet_access=False)) as (net, guest):
        with pytest.raises(PolicyError):
            await vs.update_policy(net.sandbox_id, NetworkPolicy.from_e2b({"allowOut": ["1.2.3.4/40"]}))
        with pytest.raises(PolicyError):
            await vs.update_policy(
                net.sandbox_id,
                NetworkPolicy.from_e2b({"allowOut": [f"203.0.{i // 256}.{i % 256}" for i in range(8193)]}),
            )
        assert await reaches(world, guest.netns_path, "inet", b"i") == (False, False)


async def test_counters(vs: CubeVS, world: World, sandbox: SandboxFactory) -> None:
    async with sandbox() as (net, guest):
        assert await reaches(world, guest.netns_path, "inet", b"i") == (True, True)
        assert await reaches(world, guest.netns_path, "meta", b"m") == (False, False)
        counters = vs.counters(net.sandbox_id)
        assert counters["allowed_packets"] >= 2 and counters["allowed_bytes"] > 0
        assert counters["dropped_packets"] >= 2 and counters["dropped_bytes"] > 0


async def test_a_large_allow_list_applies(vs: CubeVS, world: World, sandbox: SandboxFactory) -> None:
    # How fast it applies is a benchmark's question (a timed assert fails on a loaded host).
    many = (*(f"100.{64 + i // 65536}.{i // 256 % 256}.{i % 256}/32" for i in range(8191)), INTERNET_IP)
    async with sandbox(NetworkPolicy(allow_internet_access=False)) as (net, guest):
        await vs.update_policy(net.sandbox_id, NetworkPolicy(allow_internet_access=False, allow_out=many))
        assert await reaches(world, guest.netns_path, "inet", b"i") == (True, True)


async def test_ipv6_default_policy(world: World, sandbox: SandboxFactory) -> None:
    async with sandbox() as (_net, guest):
        assert await reaches(world, guest.netns_path, "inet", b"inet6", ipv6=True) == (True, True)
        assert await reaches(world, guest.netns_path, "meta", b"meta6", ipv6=True) == (False, False)
        assert await reaches(world, guest.netns_path, "lan", b"lan6", ipv6=True) == (False, False)


async def test_ipv6_lists(vs: CubeVS, world: World, sandbox: SandboxFactory) -> None:
    policy = NetworkPolicy(allow_internet_access=False, allow_out=("2001:db8:cbe::/48", "fd77::/16"))
    async with sandbox(policy) as (net, guest):
        assert await reaches(world, guest.netns_path, "inet", b"i6", ipv6=True) == (True, True)
        assert await reaches(world, guest.netns_path, "lan", b"l6", ipv6=True) == (False, False)
        await vs.update_policy(net.sandbox_id, NetworkPolicy(deny_out=(f"{INTERNET_IP6}/128",)))
        assert await reaches(world, guest.netns_path, "inet", b"i6b", ipv6=True) == (False, False)
        assert await reaches(world, guest.netns_path, "inet", b"i4") == (True, True)
