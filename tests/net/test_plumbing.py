"""Sandbox network plumbing with real packets: netns, veth, tap, DNAT, egress NAT, teardown, sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from networld import (
    INTERNET_IP,
    METADATA_IP,
    SERVICE_PORT,
    TAP_OWNER_UID,
    SandboxFactory,
    World,
    connects,
    serving,
    veth_guest,
)

from appliance.config import Config
from appliance.net import CubeVS, NetworkPolicy, SandboxNetwork, ebpf, links
from appliance.net.addressing import Addressing
from appliance.net.ebpf import PIN_ROOT, pin_dir_of
from appliance.net.links import TAP_FLAGS
from appliance.net.sweep import Records


def run(command: str) -> str:
    return subprocess.run(command, shell=True, check=True, capture_output=True, text=True).stdout


def netns_names() -> set[str]:
    return {line.split()[0] for line in run("ip netns list").splitlines() if line.strip()}


def host_links() -> set[str]:
    return {line.split()[1].split("@")[0].rstrip(":") for line in run("ip -o link").splitlines()}


def map_keys(vs: CubeVS, name: str) -> int:
    program = vs._program
    assert program is not None
    table = {"sandboxes": program.sandboxes, "counters": program.counters}.get(name)
    if table is None:
        list_name, version = name.split("_v")
        table = program.tries[(list_name, int(version))]
    return len(list(table.keys()))


async def test_sandbox_network_layout(vs: CubeVS, sandbox: SandboxFactory) -> None:
    async with sandbox(NetworkPolicy()) as (net, _guest):
        assert net.netns in netns_names()
        assert Path(net.netns_path).exists()
        addressing = Addressing(vs.config.host_network)
        assert (net.guest_ip, net.gateway_ip) == ("169.254.0.2", "169.254.0.1")
        assert net.resolver_ip == net.gateway_ip
        assert net.host_ip.startswith(str(addressing.network.network_address)[:-1])
        inside = run(f"ip -n {net.netns} -o addr")
        assert net.host_ip in inside and "169.254.0.1/30" in inside
        assert "default via" in run(f"ip -n {net.netns} route")
        assert any(name.startswith(addressing.veth_prefix) for name in host_links())


async def test_tap_is_what_uml_vector_transport_expects(vs: CubeVS) -> None:
    async with vs.sandbox_network("cubetest-net-tapflags", 61, TAP_OWNER_UID, NetworkPolicy()) as net:
        flags = run(f"ip netns exec {net.netns} cat /sys/class/net/tap0/tun_flags")
        owner = run(f"ip netns exec {net.netns} cat /sys/class/net/tap0/owner")
        assert int(flags, 16) & TAP_FLAGS == TAP_FLAGS  # plus IFF_PERSIST
        assert int(owner) == TAP_OWNER_UID


async def test_host_reaches_guest_port_through_dnat(sandbox: SandboxFactory) -> None:
    async with sandbox() as (net, guest), serving(guest.netns_path) as server:
        stream = await trio.open_tcp_stream(net.host_ip, SERVICE_PORT)
        await stream.aclose()
        assert await server.got_tcp()


async def test_host_reaches_guest_over_ipv6(sandbox: SandboxFactory) -> None:
    async with sandbox() as (net, guest), serving(guest.netns_path) as server:
        stream = await trio.open_tcp_stream(net.host_ip6, SERVICE_PORT)
        await stream.aclose()
        assert await server.got_tcp()


async def test_guest_egress_is_masqueraded(world: World, sandbox: SandboxFactory) -> None:
    inet = world.hosts["inet"]
    async with sandbox() as (_net, guest), serving(inet.path) as server:
        assert await connects(guest.netns_path, INTERNET_IP)
        assert await server.got_tcp()
        assert server.tcp_peers[0] != "169.254.0.2"
        assert not server.tcp_peers[0].startswith("10.")  # masqueraded to the host's address


async def test_real_tap_carries_traffic(world: World, sandbox: SandboxFactory) -> None:
    inet = world.hosts["inet"]
    async with sandbox(guest="tap") as (net, guest):
        async with serving(inet.path) as server:
            assert await connects(guest.netns_path, INTERNET_IP, timeout=3)
            assert await server.got_tcp()
        async with serving(guest.netns_path) as server:
            stream = await trio.open_tcp_stream(net.host_ip, SERVICE_PORT)
            await stream.aclose()
            assert await server.got_tcp()


async def test_teardown_leaves_nothing(vs: CubeVS, sandbox: SandboxFactory) -> None:
    def own_links() -> set[str]:  # the host is shared: other services' links come and go
        return {name for name in host_links() if name.startswith(vs.addressing.veth_prefix)}

    before_links = own_links()
    policy = NetworkPolicy(allow_out=("192.168.77.0/24", "2001:db8::/32"), deny_out=("203.0.113.0/24",))
    async with sandbox(policy) as (net, guest):
        sandbox_id = net.sandbox_id
        assert map_keys(vs, "sandboxes") == 1
        assert map_keys(vs, "allow_v4") == map_keys(vs, "allow_v6") == map_keys(vs, "deny_v4") == 1
        await connects(guest.netns_path, INTERNET_IP, timeout=0.2)  # creates a counters entry
        assert map_keys(vs, "counters") == 1
    assert net.netns not in netns_names()
    assert own_links() == before_links
    for name in ("sandboxes", "counters", "allow_v4", "allow_v6", "deny_v4", "deny_v6"):
        assert map_keys(vs, name) == 0, name
    assert not (vs.config.run_dir / "net" / f"{sandbox_id}.json").exists()
    with pytest.raises(KeyError):
        vs.counters(sandbox_id)


async def test_cancellation_tears_down(vs: CubeVS) -> None:
    with trio.move_on_after(0.5):
        async with vs.sandbox_network("cubetest-net-cancel", 62, TAP_OWNER_UID, NetworkPolicy()):
            await trio.sleep_forever()
    assert "cube-cubetest-net-cancel" not in netns_names()


async def test_service_stop_removes_host_setup(net_config: Config, dns_upstream: str) -> None:
    addressing = Addressing(net_config.host_network)
    async with CubeVS.start(net_config, dns_upstreams=[dns_upstream]) as vs:
        assert vs.enforced
        assert addressing.resolver_label in run("ip -o addr show dev lo")
        assert addressing.nft_table in run("nft list tables")
    assert addressing.resolver_label not in run("ip -o addr show dev lo")
    assert addressing.nft_table not in run("nft list tables")
    assert not (PIN_ROOT / addressing.tag).exists()


async def test_the_service_takes_the_program_compiled_ahead(net_config: Config, dns_upstream: str) -> None:
    """`cube serve` compiles the eBPF program while it starts up (compile_ahead): the service
    must enforce with that very program, not compile a second one on its way to the sandboxes."""
    pin_dir = pin_dir_of(Addressing(net_config.host_network))
    ebpf.compile_ahead(pin_dir)
    assert pin_dir not in ebpf._compiling  # no previous service's maps: nothing to be quick for
    pin_dir.mkdir(parents=True)  # as a previous service whose sandboxes run on leaves it
    ebpf.compile_ahead(pin_dir)
    compiled = ebpf._compiling[pin_dir]
    async with CubeVS.start(net_config, dns_upstreams=[dns_upstream]) as vs:
        assert vs._program is not None and vs._program._bpf is compiled.result()
    assert pin_dir not in ebpf._compiling


async def test_start_sweeps_networks_left_by_a_crash(net_config: Config, dns_upstream: str) -> None:
    addressing = Addressing(net_config.host_network)
    plan = addressing.plan("cubetest-net-crashed", 63 - 1)
    Records(net_config.run_dir / "net").write(plan)
    await trio.to_thread.run_sync(links.build, plan, TAP_OWNER_UID)
    assert plan.netns in netns_names()
    async with CubeVS.start(net_config, dns_upstreams=[dns_upstream]):
        assert plan.netns not in netns_names()
        assert plan.host_veth not in host_links()
        assert not list((net_config.run_dir / "net").glob("*.json"))


_CRASHING_SERVICE = """
import dataclasses, json, sys, trio
from pathlib import Path
from appliance.config import Config
from appliance.net import CubeVS, NetworkPolicy

async def main():
    config = Config(run_dir=Path(sys.argv[1]), host_network=sys.argv[2])
    async with CubeVS.start(config, dns_upstreams=[]) as vs:
        async with vs.sandbox_network("cubetest-net-survivor", 5, 200777, NetworkPolicy()) as net:
            print(json.dumps(dataclasses.asdict(net)), flush=True)
            await trio.sleep_forever()

trio.run(main)
"""


async def test_policy_survives_a_crashed_service(world: World, net_config: Config) -> None:
    """SIGKILL the service: the pinned maps and attached program keep enforcing until the next start."""
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CRASHING_SERVICE, str(net_config.run_dir), net_config.host_network],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        with trio.fail_after(30):
            printed = (await child.stdout.receive_some(1000)).decode()
    finally:
        child.kill()
        await child.wait()
    addressing = Addressing(net_config.host_network)
    net = SandboxNetwork(**json.loads(printed))
    assert (PIN_ROOT / addressing.tag / "sandboxes").exists()
    async with veth_guest(net, "survivor") as guest:
        async with serving(world.hosts["meta"].path) as meta, serving(world.hosts["inet"].path) as inet:
            assert not await connects(guest.netns_path, METADATA_IP, timeout=0.7)
            assert not await meta.got_tcp(timeout=0.1)
            assert await connects(guest.netns_path, INTERNET_IP)
            assert await inet.got_tcp()
    async with CubeVS.start(net_config, dns_upstreams=[]):
        assert net.netns not in netns_names()
        assert not any(name.startswith(addressing.veth_prefix) for name in host_links())
    assert not (PIN_ROOT / addressing.tag).exists()


async def test_many_networks_at_once(vs: CubeVS) -> None:
    opened: list[str] = []

    async def one(i: int) -> None:
        async with vs.sandbox_network(f"cubetest-net-par{i}", 40 + i, TAP_OWNER_UID, NetworkPolicy()) as net:
            opened.append(net.netns)
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        for i in range(12):
            nursery.start_soon(one, i)
    assert len(opened) == 12
    assert not netns_names() & set(opened)


async def test_other_machines_cannot_open_connections_to_sandboxes(
    world: World, sandbox: SandboxFactory
) -> None:
    """A neighbour routing host_network via this host reaches neither guest ports nor the resolver."""
    inet = world.hosts["inet"]
    async with sandbox() as (net, guest), serving(guest.netns_path) as server:
        assert not await connects(inet.path, net.host_ip, timeout=0.7)
        assert not await connects(inet.path, net.host_ip6, timeout=0.7)
        assert not await server.got_tcp(timeout=0.1)
        resolver_ip = str(Addressing(world.host_network).resolver_ip)
        assert not await connects(inet.path, resolver_ip, 53, timeout=0.7)
