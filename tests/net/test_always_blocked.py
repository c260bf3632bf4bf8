"""Attack: a sandbox's own allowOut re-opening the always-blocked set (issue #14.8).

The verdicts come from the attached program itself (BPF_PROG_TEST_RUN, verdicts.py):
no packet is sent to any address outside this machine. Where real packets are
sent, they go to stand-ins served inside namespaces the test made (networld.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess
from collections.abc import AsyncIterator

import pytest
import trio
from networld import (
    INTERNET_IP,
    LAN_IP,
    LAN_IP6,
    METADATA_IP,
    METADATA_IP6,
    TAP_OWNER_UID,
    SandboxFactory,
    World,
    connects,
    dropped,
    probe_payload,
    serving,
)
from verdicts import TC_ACT_OK, TC_ACT_SHOT, verdict

from appliance.config import Config
from appliance.net import CubeVS, NetworkPolicy, SandboxNetwork

# Everything a request may name to try to re-open the always-blocked set.
GREEDY_ALLOW = (
    "169.254.169.254/32",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/0",
    "::/0",
    "fe80::/10",
    "fc00::/7",
    "::ffff:0:0/96",
)


def _verdict(vs: CubeVS, net: SandboxNetwork, destination: str, port: int = 80) -> int:
    live = vs._live[net.sandbox_id]
    return verdict(live.plan, live.ifindex, destination, port)


def _host_addresses(world: World) -> list[str]:
    """This host's addresses on links that stay while the test runs (others come and go:
    the machine is shared): loopback, the uplink, the world's links."""
    route = subprocess.run(
        ["ip", "-j", "route", "show", "default"], check=True, capture_output=True, text=True
    )
    links = {
        "lo",
        *(r["dev"] for r in json.loads(route.stdout)),
        *(h.host_link for h in world.hosts.values()),
    }
    addresses = []
    for link in links:
        out = subprocess.run(
            ["ip", "-j", "addr", "show", "dev", link], check=True, capture_output=True, text=True
        )
        addresses += [a["local"] for entry in json.loads(out.stdout) for a in entry["addr_info"]]
    assert len(addresses) >= 4
    return addresses


async def test_allow_out_cannot_reopen_always_blocked(
    vs: CubeVS, world: World, sandbox: SandboxFactory
) -> None:
    async with sandbox() as (other, _g), sandbox(NetworkPolicy()) as (net, _guest):
        policy = NetworkPolicy(
            allow_internet_access=False,
            allow_out=(
                world.host_network,
                net.host_ip,
                other.host_ip,
                *GREEDY_ALLOW,
                *_host_addresses(world),
            ),
        )
        await vs.update_policy(net.sandbox_id, policy)
        blocked = [
            METADATA_IP,
            METADATA_IP6,
            "169.254.1.1",
            "127.0.0.1",
            "::1",
            "fe80::1",
            LAN_IP,
            LAN_IP6,
            "10.0.0.1",
            "172.16.0.1",
            "100.64.0.1",
            "::ffff:169.254.169.254",
            other.host_ip,  # another sandbox
            other.host_ip6,
            str(ipaddress.ip_address(other.host_ip) - 1),  # the host side of its veth
            vs.addressing.resolver_ip,  # the resolver's address, on a port other than 53
            *_host_addresses(world),
        ]
        for destination in blocked:
            assert _verdict(vs, net, destination) == TC_ACT_SHOT, destination
        # The lists still work outside the always-blocked set.
        assert _verdict(vs, net, INTERNET_IP) == TC_ACT_OK
        assert _verdict(vs, net, vs.addressing.resolver_ip, 53) == TC_ACT_OK
        await vs.update_policy(net.sandbox_id, NetworkPolicy(allow_internet_access=False))
        assert _verdict(vs, net, INTERNET_IP) == TC_ACT_SHOT


async def test_allow_out_cannot_reach_stand_ins(vs: CubeVS, world: World, sandbox: SandboxFactory) -> None:
    """Real packets from the sandbox to the metadata and LAN stand-ins (test netns only)."""
    policy = NetworkPolicy(allow_internet_access=False, allow_out=(*GREEDY_ALLOW, world.host_network))
    async with (
        sandbox(policy) as (net, guest),
        serving(world.hosts["meta"].path) as meta,
        serving(world.hosts["lan"].path) as lan,
        serving(world.hosts["inet"].path) as inet,
    ):
        assert await dropped(vs, net, guest.netns_path, METADATA_IP, probe_payload(b"meta"))
        assert await dropped(vs, net, guest.netns_path, LAN_IP, probe_payload(b"lan"))
        assert not meta.tcp_peers and not meta.udp_payloads
        assert not lan.tcp_peers and not lan.udp_payloads
        assert await connects(guest.netns_path, INTERNET_IP)  # 0.0.0.0/0 allowed: the internet only
        assert await inet.got_tcp()


@pytest.fixture
async def operator_vs(net_config: Config, dns_upstream: str) -> AsyncIterator[CubeVS]:
    config = dataclasses.replace(net_config, operator_open_networks=f"{LAN_IP}/32, {LAN_IP6}/128")
    async with CubeVS.start(config, dns_upstreams=[dns_upstream]) as service:
        yield service


async def test_only_the_operator_opens_blocked_ranges(operator_vs: CubeVS, world: World) -> None:
    from networld import veth_guest

    vs = operator_vs
    async with vs.sandbox_network("cubetest-net-op", 5, TAP_OWNER_UID, NetworkPolicy()) as net:
        async with veth_guest(net, "op") as guest, serving(world.hosts["lan"].path) as lan:
            # Opened by the operator: an ordinary destination, the sandbox's lists apply.
            assert _verdict(vs, net, LAN_IP) == TC_ACT_OK
            assert _verdict(vs, net, LAN_IP6) == TC_ACT_OK
            assert await connects(guest.netns_path, LAN_IP)
            assert await lan.got_tcp()
            await vs.update_policy(net.sandbox_id, NetworkPolicy(deny_out=(f"{LAN_IP}/32",)))
            assert _verdict(vs, net, LAN_IP) == TC_ACT_SHOT
            # Neighbours in the same private range and the metadata service stay closed.
            await vs.update_policy(net.sandbox_id, NetworkPolicy(allow_out=GREEDY_ALLOW))
            assert _verdict(vs, net, LAN_IP) == TC_ACT_OK
            assert _verdict(vs, net, "192.168.77.11") == TC_ACT_SHOT
            assert _verdict(vs, net, METADATA_IP) == TC_ACT_SHOT


async def test_new_host_addresses_are_blocked(vs: CubeVS, world: World, sandbox: SandboxFactory) -> None:
    """An address the host gains after the service started is blocked as soon as it appears."""
    link = world.hosts["inet"].host_link
    new_ip = "198.18." + world.host_network.split(".")[2] + ".200"
    async with sandbox() as (net, guest):
        assert _verdict(vs, net, new_ip) == TC_ACT_OK  # not the host's (yet): the internet
        subprocess.run(["ip", "addr", "add", f"{new_ip}/32", "dev", link], check=True)
        try:
            with trio.fail_after(5):  # the service follows address changes (netlink), not a timer
                while _verdict(vs, net, new_ip) != TC_ACT_SHOT:
                    await trio.sleep(0.01)
            async with serving("/proc/self/ns/net", ip=new_ip, port=7001) as server:
                assert await dropped(vs, net, guest.netns_path, new_ip, probe_payload(b"new"), 7001)
                assert not server.tcp_peers and not server.udp_payloads
        finally:
            subprocess.run(["ip", "addr", "del", f"{new_ip}/32", "dev", link], check=True)
        with trio.fail_after(5):
            while _verdict(vs, net, new_ip) != TC_ACT_OK:
                await trio.sleep(0.01)
