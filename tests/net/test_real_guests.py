"""The eBPF egress policy, proved from inside two real UML guests (the default template).

Both guests boot once for this module (see realguests.py) and are attached through
CubeVS exactly as the UML runtime attaches every sandbox. `a` starts with the
default policy and gets each test's policy through `update_policy` while it keeps
running; `b` was created with `allow_internet_access: false` and is the "other
sandbox". Packets are TCP connects and UDP datagrams that python3 sends inside the
guests; they count as arrived only when the world host's server saw them.

Every packet goes to a namespace of the world (tests/net/networld.py), the root
netns addresses the world and CubeVS created, or the other guest.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import AsyncExitStack

import pytest
import trio
from networld import (
    ARRIVAL_S,
    INTERNET_IP,
    INTERNET_IP6,
    LAN_IP,
    METADATA_IP,
    SERVICE_PORT,
    World,
    serving,
)
from realguests import RealGuests, listener_command, probe, run_command, ticker_command
from umlguests import default_template

from appliance.net import NetworkPolicy

pytestmark = [pytest.mark.uml, pytest.mark.slow]

_tags = itertools.count()


@pytest.fixture(scope="module")
def guests(world: World) -> Iterator[RealGuests]:
    template = default_template()
    pid = os.getpid()
    real = RealGuests(
        world.host_network,
        uid_base=320_000 + (pid % 1000) * 4,  # apart from tests/uml's 310_000 and other runs
        tag=f"{pid % 0x10000:04x}",
        policies={"a": {}, "b": {"allow_internet_access": False}},
    )
    try:
        real.start(template)
        # The leftover check sees each kind of thing while it exists (so "nothing left" means something).
        running = real.leftovers()
        for kind in ("process", "netns", "veth", "cgroup", "directory", "bpf pins", "nft table", "resolver"):
            assert any(item.startswith(kind) for item in running), (kind, running)
        yield real
    finally:
        real.stop()
        left = real.leftovers()
        real.remove_work_dir()
    assert real.error is None, f"the guests' loop failed: {real.error!r}"
    assert left == [], left


async def reaches(
    guests: RealGuests, world: World, name: str, roles: list[str], ipv6: bool = False
) -> dict[str, tuple[bool, bool]]:
    """role → (TCP connect arrived, UDP datagram arrived) at that world host, sent from guest `name`."""
    tag = next(_tags)
    async with AsyncExitStack() as stack:
        servers = {r: await stack.enter_async_context(serving(world.hosts[r].path)) for r in roles}
        ips = {r: world.hosts[r].ip6 if ipv6 else world.hosts[r].ip for r in roles}
        results = await probe(
            guests.guests[name].host_ip,
            [{"ip": ips[r], "port": SERVICE_PORT, "udp": f"{tag}-{r}"} for r in roles],
        )
        got = {}
        for role, result in zip(roles, results, strict=True):
            # Allowed (the guest's connect completed): wait for the arrivals, however loaded the
            # host; else a short look (a load can only make a leak look blocked, never the reverse).
            wait = ARRIVAL_S if result["tcp"] else 0.3
            arrived = (
                await servers[role].got_tcp(timeout=wait),
                await servers[role].got_udp(f"{tag}-{role}".encode(), timeout=wait),
            )
            # The guest's own view agrees with the server's.
            assert result["tcp"] == arrived[0], (role, result)
            got[role] = arrived
        return got


async def test_default_policy_and_counters(guests: RealGuests, world: World) -> None:
    await guests.set_policy("a", NetworkPolicy())
    before = await guests.counters("a")
    got = await reaches(guests, world, "a", ["inet", "meta", "lan"])
    assert got == {"inet": (True, True), "meta": (False, False), "lan": (False, False)}
    after = await guests.counters("a")
    # At least: inet's SYN, ACK and datagram allowed; meta's and lan's SYN and datagram dropped.
    assert after["allowed_packets"] >= before["allowed_packets"] + 3, (before, after)
    assert after["allowed_bytes"] > before["allowed_bytes"]
    assert after["dropped_packets"] >= before["dropped_packets"] + 4, (before, after)
    assert after["dropped_bytes"] > before["dropped_bytes"]


async def test_blocked_means_dropped_by_the_program(guests: RealGuests, world: World) -> None:
    """Without the program the same packets do arrive: the denials above are the policy's, not routing's."""
    vs, sandbox_id = guests.vs, guests.guests["a"].sandbox_id
    assert vs is not None and vs.enforced
    await guests.set_policy("a", NetworkPolicy(allow_internet_access=False))
    await guests.call(vs.set_policy_attached, sandbox_id, False)
    try:
        got = await reaches(guests, world, "a", ["inet", "meta", "lan"])
    finally:
        await guests.call(vs.set_policy_attached, sandbox_id, True)
    assert got == {"inet": (True, True), "meta": (True, True), "lan": (True, True)}
    assert await reaches(guests, world, "a", ["inet", "meta"]) == {
        "inet": (False, False),
        "meta": (False, False),
    }


async def test_created_without_internet_access(guests: RealGuests, world: World) -> None:
    before = await guests.counters("b")
    got = await reaches(guests, world, "b", ["inet", "meta", "lan"])
    assert got == {"inet": (False, False), "meta": (False, False), "lan": (False, False)}
    assert (await guests.counters("b"))["dropped_packets"] >= before["dropped_packets"] + 6


async def test_no_internet_access_with_allow_list(guests: RealGuests, world: World) -> None:
    policy = NetworkPolicy(allow_internet_access=False, allow_out=(f"{INTERNET_IP}/32", f"{LAN_IP}/32"))
    await guests.set_policy("a", policy)
    got = await reaches(guests, world, "a", ["inet", "meta", "lan"])
    # No egress, but an allow entry beats it; the always-blocked private ranges beat the allow entry.
    assert got == {"inet": (True, True), "meta": (False, False), "lan": (False, False)}


async def test_allow_out_beats_deny_out_but_not_the_always_blocked(guests: RealGuests, world: World) -> None:
    policy = NetworkPolicy(allow_out=(INTERNET_IP, METADATA_IP), deny_out=("0.0.0.0/0",))
    await guests.set_policy("a", policy)
    got = await reaches(guests, world, "a", ["inet", "meta", "lan"])
    assert got == {"inet": (True, True), "meta": (False, False), "lan": (False, False)}


async def test_host_and_other_sandbox_are_blocked(guests: RealGuests, world: World) -> None:
    await guests.set_policy("a", NetworkPolicy())
    a, b = guests.guests["a"], guests.guests["b"]
    tag = next(_tags)
    log = f"/tmp/cubetest-arrivals-{tag}"
    assert (await run_command(b.host_ip, listener_command(SERVICE_PORT, log))).exit_code == 0
    try:
        with trio.fail_after(30):
            while "ready" not in (await run_command(b.host_ip, f"cat {log} 2>/dev/null")).stdout:
                await trio.sleep(0.2)
        # The host reaches b's listener (DNAT to the guest)...
        stream = await trio.open_tcp_stream(b.host_ip, SERVICE_PORT)
        await stream.aclose()
        # ...a reaches neither b nor the host: a's veth address, the world link's host
        # end, the node resolver's address off port 53.
        world_link_ip = "198.18." + world.host_network.split(".")[2] + ".1"
        host_ips = [a.plan.host_side_ip, world_link_ip, a.plan.resolver_ip]
        port = SERVICE_PORT + 1
        async with AsyncExitStack() as stack:
            root_netns = "/proc/self/ns/net"
            servers = [
                await stack.enter_async_context(serving(root_netns, ip=ip, port=port)) for ip in host_ips
            ]
            probes = [{"ip": ip, "port": port, "udp": f"{tag}-host-{ip}"} for ip in host_ips]
            probes.append({"ip": b.host_ip, "port": SERVICE_PORT, "udp": f"{tag}-a-to-b"})
            results = await probe(a.host_ip, probes)
            assert [r["tcp"] for r in results] == [False] * len(probes), results
            for ip, server in zip(host_ips, servers, strict=True):
                assert not await server.got_tcp(timeout=0.2), ip
                assert not await server.got_udp(f"{tag}-host-{ip}".encode(), timeout=0.2), ip
        arrivals = (await run_command(b.host_ip, f"cat {log}")).stdout.splitlines()
        # Only the host's connection reached b.
        assert arrivals[0] == "ready" and len(arrivals) == 2 and arrivals[1].startswith("tcp "), arrivals
    finally:
        await run_command(b.host_ip, f"pkill -f 'cubetest-arrival[s]-{tag}'; rm -f {log}")


# Generous: the update's speed is measured by benchmarks; here, only that it is prompt.
UPDATE_BOUND_S = 5.0


async def test_update_policy_promptly_while_guest_runs(guests: RealGuests, world: World) -> None:
    await guests.set_policy("a", NetworkPolicy())
    a = guests.guests["a"]
    stop = f"/tmp/cubetest-stop-ticker-{next(_tags)}"
    async with serving(world.hosts["inet"].path) as server:
        assert (await run_command(a.host_ip, ticker_command(INTERNET_IP, SERVICE_PORT, stop))).exit_code == 0
        try:
            assert await server.got_tcp(timeout=30)  # the ticker runs and gets through
            await trio.sleep(0.3)
            dropped = (await guests.counters("a"))["dropped_packets"]

            denied_at = trio.current_time()
            took = await guests.set_policy("a", NetworkPolicy(deny_out=(f"{INTERNET_IP}/32",)))
            applied_at = trio.current_time()
            assert took < UPDATE_BOUND_S  # generous: the update's speed is a benchmark's question
            await trio.sleep(2.0)
            arrivals = server.tcp_times + server.udp_times
            # Nothing gets through once the update has returned (0.5 s for packets in flight).
            assert [t - denied_at for t in arrivals if t > applied_at + 0.5] == []
            last_ms = (max(arrivals) - denied_at) * 1000
            # The guest kept sending all along: its packets were dropped, not missing.
            assert (await guests.counters("a"))["dropped_packets"] >= dropped + 8

            allowed_at = trio.current_time()
            took = await guests.set_policy("a", NetworkPolicy())
            assert took < UPDATE_BOUND_S
            with trio.move_on_after(3.0):
                while not (
                    any(t > allowed_at for t in server.tcp_times)
                    and any(t > allowed_at for t in server.udp_times)
                ):
                    await trio.sleep(0.01)
            first_tcp = min((t for t in server.tcp_times if t > allowed_at), default=float("inf"))
            first_udp = min((t for t in server.udp_times if t > allowed_at), default=float("inf"))
            back_ms = (max(first_tcp, first_udp) - allowed_at) * 1000
            print(
                f"deny: last arrival {last_ms:.0f} ms after the update began; "
                f"allow: update {took * 1000:.1f} ms, traffic back after {back_ms:.0f} ms"
            )
            assert first_tcp - allowed_at < took + 2.0 and first_udp - allowed_at < took + 2.0
        finally:
            await run_command(a.host_ip, f"touch {stop}")


async def test_domain_allow_list_through_the_guest_resolver(guests: RealGuests, world: World) -> None:
    await guests.set_policy("a", NetworkPolicy(allow_internet_access=False, allow_out=("*.example.test",)))
    host = guests.guests["a"].host_ip
    port = SERVICE_PORT
    async with serving(world.hosts["inet"].path) as inet, serving(world.hosts["meta"].path) as meta:
        # Not resolved yet: the address is not allowed.
        (direct,) = await probe(host, [{"ip": INTERNET_IP, "port": port, "udp": "dom-direct"}])
        assert direct["tcp"] is False and not await inet.got_udp(b"dom-direct", timeout=0.3)
        # The apex does not match "*.example.test": without egress it is not even resolved
        # (REFUSED, no DNS tunnel); a matching name that answers the metadata address does not
        # open it (the guest resolves via 169.254.0.1).
        apex, rebound = await probe(
            host,
            [
                {"name": "example.test", "port": port, "udp": "dom-apex"},
                {"name": "metadata.example.test", "port": port, "udp": "dom-meta"},
            ],
        )
        assert apex["resolved"] == [] and "name resolution" in apex["error"], apex
        assert rebound["resolved"] == [METADATA_IP] and rebound["tcp"] is False, rebound
        assert not inet.tcp_peers and not await inet.got_udp(b"dom-apex", timeout=0.3)
        assert not meta.tcp_peers and not await meta.got_udp(b"dom-meta", timeout=0.3)
        # A matching name: its answer is learned and its address opens.
        (named,) = await probe(host, [{"name": "svc.example.test", "port": port, "udp": "dom-svc"}])
        assert named["resolved"] == [INTERNET_IP] and named["tcp"] is True, named
        assert await inet.got_tcp() and await inet.got_udp(b"dom-svc")
        # Dropping the domain drops what was learned for it.
        await guests.set_policy("a", NetworkPolicy(allow_internet_access=False))
        (after,) = await probe(host, [{"ip": INTERNET_IP, "port": port, "udp": "dom-after"}])
        assert after["tcp"] is False and not await inet.got_udp(b"dom-after", timeout=0.3)


async def test_ipv6(guests: RealGuests, world: World) -> None:
    a = guests.guests["a"]
    setup = await run_command(
        a.host_ip,
        "dev=$(ip -o -4 addr show | awk '/169.254.0.2\\//{print $2}') && "
        f"ip -6 addr replace {a.plan.guest_ip6}/{a.plan.prefixlen6} dev $dev nodad && "
        f"ip -6 route replace default via {a.plan.gateway_ip6}",
        user="root",
    )
    assert setup.exit_code == 0, setup
    await guests.set_policy("a", NetworkPolicy())
    got = await reaches(guests, world, "a", ["inet", "meta", "lan"], ipv6=True)
    assert got == {"inet": (True, True), "meta": (False, False), "lan": (False, False)}
    await guests.set_policy("a", NetworkPolicy(deny_out=(f"{INTERNET_IP6}/128",)))
    assert await reaches(guests, world, "a", ["inet"], ipv6=True) == {"inet": (False, False)}
    assert await reaches(guests, world, "a", ["inet"]) == {"inet": (True, True)}
