"""`cube bench net`: what CubeVS costs — per-sandbox set-up/teardown, and TCP throughput and
latency through a sandbox network with the eBPF policy attached vs detached (ratio in one run).

The bench runs its own CubeVS on a bench-only host_network and sends traffic only
between namespaces it creates: a stand-in guest (a veth into a "guest" netns put
in place of tap0, so the path measured is CubeVS's, not a VMM's) and a "peer"
netns reached through the host's routing, like an internet host would be.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import tempfile
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path

import click
import trio
from pyroute2 import IPRoute

from appliance.bench.options import json_dir_option
from appliance.bench.report import Report, percentiles
from appliance.config import Config
from appliance.net import CubeVS, NetworkPolicy, SandboxNetwork, netns

_PEER_PORT = 5201
_IFA_F_NODAD = 0x02
_CHUNK = 256 * 1024


def _make_peer(name: str, host_link: str, host_side: str, peer_ip: str) -> None:
    """A netns holding `peer_ip`, linked to the host by a /30 veth."""
    host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with netns.created(name), IPRoute() as ns:
            ns.link("set", index=1, state="up")
            ns.link("add", ifname="w0", kind="veth", peer={"ifname": host_link, "net_ns_fd": host_ns})
            index = ns.link_lookup(ifname="w0")[0]
            ns.addr("add", index=index, address=peer_ip, prefixlen=30)
            ns.link("set", index=index, state="up")
            ns.route("add", dst="default", gateway=host_side)
    finally:
        os.close(host_ns)
    with IPRoute() as host:
        index = host.link_lookup(ifname=host_link)[0]
        host.addr("add", index=index, address=host_side, prefixlen=30)
        host.link("set", index=index, state="up")


def _make_guest(net: SandboxNetwork, name: str) -> None:
    """Replace the sandbox's tap0 by a veth whose other end, in netns `name`, is the guest."""
    with netns.created(name), IPRoute() as ns:
        ns.link("set", index=1, state="up")
    guest_ns = os.open(netns.netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with netns.entered(net.netns_path), IPRoute() as ns:
            ns.link("del", index=ns.link_lookup(ifname=net.tap)[0])
            ns.link("add", ifname=net.tap, kind="veth", peer={"ifname": "eth0", "net_ns_fd": guest_ns})
            index = ns.link_lookup(ifname=net.tap)[0]
            ns.addr("add", index=index, address=net.gateway_ip, prefixlen=30)
            ns.addr("add", index=index, address=net.gateway_ip6, prefixlen=126, flags=_IFA_F_NODAD)
            ns.link("set", index=index, state="up")
    finally:
        os.close(guest_ns)
    with netns.entered(netns.netns_path(name)), IPRoute() as ns:
        index = ns.link_lookup(ifname="eth0")[0]
        ns.addr("add", index=index, address=net.guest_ip, prefixlen=30)
        ns.addr("add", index=index, address=net.guest_ip6, prefixlen=126, flags=_IFA_F_NODAD)
        ns.link("set", index=index, state="up")
        ns.route("add", dst="default", gateway=net.gateway_ip)
        ns.route("add", dst="::/0", gateway=net.gateway_ip6, family=socket.AF_INET6)


def _socket_in(name: str) -> socket.socket:
    with netns.entered(netns.netns_path(name)):
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def _connected_pair(guest: str, peer: str, peer_ip: str) -> tuple[socket.socket, socket.socket]:
    listener = _socket_in(peer)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((peer_ip, _PEER_PORT))
        listener.listen(1)
        client = _socket_in(guest)
        client.settimeout(5)
        client.connect((peer_ip, _PEER_PORT))
        server, _ = listener.accept()
    return client, server


def _throughput_mb_s(guest: str, peer: str, peer_ip: str, seconds: float) -> float:
    """Bulk TCP guest → peer for `seconds`; MB/s as the receiver saw it."""
    client, server = _connected_pair(guest, peer, peer_ip)
    received = 0

    def receive() -> None:
        nonlocal received
        buffer = bytearray(_CHUNK)
        while n := server.recv_into(buffer):
            received += n

    receiver = threading.Thread(target=receive)
    receiver.start()
    payload = b"\0" * _CHUNK
    started = time.perf_counter()
    with client:
        while time.perf_counter() - started < seconds:
            client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        receiver.join()
    elapsed = time.perf_counter() - started
    server.close()
    return received / elapsed / 1e6


def _round_trip_us(guest: str, peer: str, peer_ip: str, count: int) -> float:
    """Median of `count` 1-byte request/response round trips guest ↔ peer, in µs."""
    client, server = _connected_pair(guest, peer, peer_ip)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def echo() -> None:
        while data := server.recv(1):
            server.sendall(data)

    echoer = threading.Thread(target=echo)
    echoer.start()
    samples = []
    with client:
        for _ in range(count):
            t0 = time.perf_counter()
            client.sendall(b"x")
            client.recv(1)
            samples.append(time.perf_counter() - t0)
        client.shutdown(socket.SHUT_WR)
        echoer.join()
    server.close()
    return statistics.median(samples) * 1e6


# Per detached/attached: each round's throughput (MB/s) and median round trip (µs).
Results = dict[bool, dict[str, list[float]]]


async def _setup_teardown(vs: CubeVS, report: Report, tag: str, uid: int, sandboxes: int) -> None:
    """Create and remove `sandboxes` sandbox networks one at a time, timing each half."""
    setup, teardown = [], []
    for i in range(sandboxes):
        async with AsyncExitStack() as stack:
            t0 = time.perf_counter()
            await stack.enter_async_context(
                vs.sandbox_network(f"cubebench-{tag}-{i}", i, uid, NetworkPolicy())
            )
            setup.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        teardown.append(time.perf_counter() - t0)
    for name, samples in (("setup", setup), ("teardown", teardown)):
        stats = percentiles(samples)
        report.add(
            measure=f"sandbox network {name}",
            n=stats["n"],
            p50_ms=stats["p50_ms"],
            p95_ms=stats["p95_ms"],
            max_ms=stats["max_ms"],
        )


async def _traffic(
    vs: CubeVS, tag: str, uid: int, rounds: int, seconds: float
) -> tuple[Results, dict[str, int]]:
    """Throughput and round trips through one sandbox network, policy detached and attached in
    turn; the policy's counters after."""
    peer_ns, guest_ns, host_link = f"cubebench-{tag}-peer", f"cubebench-{tag}-guest", f"cbench{tag}"
    host_side, peer_ip = "198.18.255.1", "198.18.255.2"
    await trio.to_thread.run_sync(_make_peer, peer_ns, host_link, host_side, peer_ip)
    try:
        async with vs.sandbox_network(f"cubebench-{tag}-tp", 0, uid, NetworkPolicy()) as net:
            await trio.to_thread.run_sync(_make_guest, net, guest_ns)
            results: Results = {attached: {"mb_s": [], "rtt_us": []} for attached in (False, True)}
            for _ in range(rounds):
                for attached in (False, True):
                    await vs.set_policy_attached(net.sandbox_id, attached)
                    results[attached]["mb_s"].append(
                        await trio.to_thread.run_sync(_throughput_mb_s, guest_ns, peer_ns, peer_ip, seconds)
                    )
                    rtt_us = await trio.to_thread.run_sync(_round_trip_us, guest_ns, peer_ns, peer_ip, 2000)
                    results[attached]["rtt_us"].append(rtt_us)
            return results, dict(vs.counters(net.sandbox_id))
    finally:
        await trio.to_thread.run_sync(netns.remove, guest_ns)
        await trio.to_thread.run_sync(netns.remove, peer_ns)
        with IPRoute() as host:
            for index in host.link_lookup(ifname=host_link):
                host.link("del", index=index)


def _traffic_report(report: Report, results: Results, rounds: int, seconds: float) -> None:
    medians = {
        attached: {k: statistics.median(v) for k, v in values.items()} for attached, values in results.items()
    }
    for attached in (False, True):
        report.add(
            measure=f"guest→peer TCP, policy {'attached' if attached else 'detached'}",
            n=rounds,
            mb_s=medians[attached]["mb_s"],
            mb_s_min=min(results[attached]["mb_s"]),
            mb_s_max=max(results[attached]["mb_s"]),
            rtt_p50_us=medians[attached]["rtt_us"],
        )
    report.add(
        measure="attached / detached",
        throughput_ratio=medians[True]["mb_s"] / medians[False]["mb_s"],
        added_rtt_us=medians[True]["rtt_us"] - medians[False]["rtt_us"],
    )
    report.notes.append(
        f"guest is a veth stand-in for tap0 (no VMM in the path); {seconds:.1f} s bulk + 2000 round "
        f"trips per round, {rounds} rounds alternating detached/attached; medians. On a busy 2-core "
        "host the round-to-round spread (mb_s_min..max) is larger than the program's cost: read the "
        "ratio against it"
    )


async def run_net_bench(
    config: Config, host_network: str, sandboxes: int, rounds: int, seconds: float
) -> Report:
    report = Report("net")
    tag = f"{os.getpid() % 0x10000:04x}"
    uid = config.uid_base
    with tempfile.TemporaryDirectory(prefix="cube-bench-net-") as tmp:
        bench_config = dataclasses.replace(config, host_network=host_network, run_dir=Path(tmp))
        async with CubeVS.start(bench_config, dns_upstreams=[]) as vs:
            if not vs.enforced:
                raise click.ClickException(f"eBPF enforcement is not active: {vs.unenforced_reason}")
            await _setup_teardown(vs, report, tag, uid, sandboxes)
            results, counters = await _traffic(vs, tag, uid, rounds, seconds)
    _traffic_report(report, results, rounds, seconds)
    report.notes.append(f"policy counters after the run: {counters}")
    return report


@click.command("net")
@click.option("--sandboxes", default=20, show_default=True, help="Sandbox networks to create and remove.")
@click.option("--rounds", default=3, show_default=True, help="Detached/attached measurement pairs.")
@click.option("--seconds", default=2.0, show_default=True, help="Duration of each throughput run.")
@click.option(
    "--host-network",
    default="10.253.0.0/24",
    show_default=True,
    help="Bench-only host_network (must not overlap a running service's).",
)
@json_dir_option("net.json")
@click.pass_obj
def net_bench(
    config: Config, sandboxes: int, rounds: int, seconds: float, host_network: str, json_dir: Path | None
) -> None:
    """Sandbox network set-up cost, and TCP throughput/latency with the eBPF policy on vs off."""
    report = trio.run(run_net_bench, config, host_network, sandboxes, rounds, seconds)
    report.show(json_dir)
