"""A small world of network namespaces for CubeVS tests, and guests that live in it.

Nothing here sends a packet anywhere but into namespaces this module created
(or loopback): sandboxes use a test-only host_network, and a policy-routing
rule sends everything they emit to a routing table that knows only the world's
hosts and ends in `unreachable default`.

    host netns ── ctn<id>i ── netns cubetest-net-<id>-inet  203.0.113.10, 2001:db8:cbe::10 ("internet")
               ── ctn<id>m ── netns cubetest-net-<id>-meta  169.254.169.254, fd00:ec2::254 ("metadata")
               ── ctn<id>l ── netns cubetest-net-<id>-lan   192.168.77.10, fd77::10 ("LAN")

Guests stand in for real ones: `VethGuest` replaces the sandbox's tap0 by a veth
into a guest netns holding 169.254.0.2 (kernel speed); `TapGuest` keeps tap0 and
pumps its frames to a tap inside the guest netns (exercises the real tap). A UML
guest can replace either: tests only use `Guest.netns_path` through the socket
helpers below (`connects`, `send_udp`, `listen_tcp`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import trio

from appliance.net import netns
from appliance.net.addressing import Addressing
from appliance.net.dns import parse_answer
from appliance.net.service import CubeVS, SandboxNetwork

UPSTREAM_RECORDS = {  # name → (address, TTL s)
    "svc.example.test": ("203.0.113.10", 300),
    "example.test": ("203.0.113.10", 300),
    "metadata.example.test": ("169.254.169.254", 300),
    "short.example.test": ("203.0.113.10", 1),
}
TAP_OWNER_UID = 200_777
SERVICE_PORT = 7000
INTERNET_IP = "203.0.113.10"
METADATA_IP = "169.254.169.254"
LAN_IP = "192.168.77.10"
INTERNET_IP6 = "2001:db8:cbe::10"
METADATA_IP6 = "fd00:ec2::254"
LAN_IP6 = "fd77::10"


def dns_response(query: bytes) -> bytes:
    """A minimal authoritative answer: one A record or NXDOMAIN."""
    (qid,) = struct.unpack_from("!H", query)
    offset, labels = 12, []
    while query[offset]:
        labels.append(query[offset + 1 : offset + 1 + query[offset]].decode())
        offset += 1 + query[offset]
    question = query[12 : offset + 5]
    record = UPSTREAM_RECORDS.get(".".join(labels).lower())
    qtype = struct.unpack_from("!H", query, offset + 1)[0]
    if record is None or qtype != 1:
        return struct.pack("!6H", qid, 0x8183 if record is None else 0x8180, 1, 0, 0, 0) + question
    address, ttl = record
    answer = struct.pack("!HHHIH", 0xC00C, 1, 1, ttl, 4) + socket.inet_aton(address)
    return struct.pack("!6H", qid, 0x8180, 1, 1, 0, 0) + question + answer


def sh(*commands: str) -> None:
    for command in commands:
        subprocess.run(command, shell=True, check=True, capture_output=True, text=True)


def sh_quiet(command: str) -> None:
    subprocess.run(command, shell=True, check=False, capture_output=True, text=True)


@dataclass
class WorldHost:
    role: str
    netns: str
    ip: str
    ip6: str
    host_link: str

    @property
    def path(self) -> str:
        return str(netns.netns_path(self.netns))


@dataclass
class World:
    tag: str  # short unique id
    host_network: str  # the test CubeVS's host_network
    table: int
    hosts: dict[str, WorldHost] = field(default_factory=dict)

    @classmethod
    def create(cls, n: int) -> World:
        tag = f"{os.getpid() % 0x10000:04x}"
        world = cls(tag=tag, host_network=f"10.254.{n}.0/24", table=25000 + n)
        network6 = Addressing(world.host_network).network6
        roles = {
            "inet": (INTERNET_IP, INTERNET_IP6),
            "meta": (METADATA_IP, METADATA_IP6),
            "lan": (LAN_IP, LAN_IP6),
        }
        try:
            for i, (role, (ip, ip6)) in enumerate(roles.items()):
                base = f"198.18.{n}"  # a /30 per world host: .4i+1 host side, .4i+2 world side
                base6 = f"2001:db8:ff:{n:x}::"  # likewise, /126s
                host = WorldHost(role, f"cubetest-net-{tag}-{role}", ip, ip6, f"ctn{tag}{role[0]}")
                sh(
                    f"ip netns add {host.netns}",
                    f"ip link add {host.host_link} type veth peer name w0 netns {host.netns}",
                    f"ip addr add {base}.{4 * i + 1}/30 dev {host.host_link}",
                    f"ip link set {host.host_link} up",
                    f"ip -n {host.netns} link set lo up",
                    f"ip -n {host.netns} addr add {ip}/32 dev lo",
                    f"ip -n {host.netns} addr add {base}.{4 * i + 2}/30 dev w0",
                    f"ip -n {host.netns} link set w0 up",
                    f"ip -n {host.netns} route add default via {base}.{4 * i + 1}",
                    f"ip route add {ip}/32 via {base}.{4 * i + 2} table {world.table}",
                    f"ip addr add {base6}{4 * i + 1:x}/126 dev {host.host_link} nodad",
                    f"ip -n {host.netns} addr add {ip6}/128 dev lo",
                    f"ip -n {host.netns} addr add {base6}{4 * i + 2:x}/126 dev w0 nodad",
                    f"ip -n {host.netns} -6 route add default via {base6}{4 * i + 1:x}",
                    f"ip -6 route add {ip6}/128 via {base6}{4 * i + 2:x} table {world.table}",
                )
                world.hosts[role] = host
            sh(
                f"ip route add throw {world.host_network} table {world.table}",
                f"ip route add unreachable default table {world.table}",
                f"ip rule add from {world.host_network} lookup {world.table} priority {world.table}",
                f"ip -6 route add throw {network6} table {world.table}",
                f"ip -6 route add unreachable default table {world.table}",
                f"ip -6 rule add from {network6} lookup {world.table} priority {world.table}",
            )
        except BaseException:
            world.destroy()
            raise
        return world

    def destroy(self) -> None:
        network6 = Addressing(self.host_network).network6
        sh_quiet(f"ip rule del from {self.host_network} lookup {self.table} priority {self.table}")
        sh_quiet(f"ip -6 rule del from {network6} lookup {self.table} priority {self.table}")
        sh_quiet(f"ip route flush table {self.table}")
        sh_quiet(f"ip -6 route flush table {self.table}")
        for host in self.hosts.values():
            sh_quiet(f"ip link del {host.host_link}")
            sh_quiet(f"ip netns del {host.netns}")


# --- sockets inside a namespace ----------------------------------------------


def _socket_in(path: str, family: int, kind: int) -> socket.socket:
    with netns.entered(path):
        return socket.socket(family, kind)


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


async def socket_in(
    path: str, kind: int = socket.SOCK_STREAM, family: int = socket.AF_INET
) -> trio.socket.SocketType:
    """A socket that belongs to the netns at `path` (sockets keep their netns for life)."""
    sock = await trio.to_thread.run_sync(_socket_in, path, family, kind)
    return trio.socket.from_stdlib_socket(sock)


# How long an arrival that is expected may take. Generous: a loaded host (2 cores, other
# jobs) delays packets by seconds, and a lost SYN costs a 1 s retransmit; waits end at the
# arrival, so this costs nothing when things go well. "Did not arrive" is never decided by
# waiting (see `dropped`), and a short `timeout` only where a negative result is asserted.
ARRIVAL_S = 30.0


async def connects(path: str, ip: str, port: int = SERVICE_PORT, timeout: float = ARRIVAL_S) -> bool:
    """Does a TCP connect from netns `path` to ip:port complete within `timeout`?"""
    with await socket_in(path, family=_family(ip)) as sock, trio.move_on_after(timeout):
        try:
            await sock.connect((ip, port))
            return True
        except OSError:
            return False
    return False


async def send_udp(path: str, ip: str, payload: bytes, port: int = SERVICE_PORT) -> None:
    with await socket_in(path, socket.SOCK_DGRAM, _family(ip)) as sock:
        try:
            await sock.sendto(payload, (ip, port))
        except OSError:
            pass  # unreachable is also "did not arrive"


async def dropped(
    vs: CubeVS, net: SandboxNetwork, path: str, ip: str, payload: bytes, port: int = SERVICE_PORT
) -> bool:
    """Send a TCP connect and the UDP datagram `payload` from the guest netns `path` of the
    sandbox `net` to ip:port: True once its eBPF program has judged and dropped both (its drop
    counters grew by two packets and at least the datagram's bytes), False if the connect
    was answered (the SYN was let through).

    The verdict is an event, not a quiet interval: no sleep that a loaded host outlasts.
    Other dropped traffic (a fresh guest's MLD reports) can only end the wait early, never
    make a drop look like an arrival; the bytes bound keeps it from ending much too early
    (pass a payload of some hundreds of bytes, see `probe_payload`)."""
    before = vs.counters(net.sandbox_id)
    answered = False  # the connect completed or was refused: the SYN got through

    async def connect() -> None:
        nonlocal answered
        with await socket_in(path, family=_family(ip)) as sock:
            try:
                await sock.connect((ip, port))
            except OSError:
                pass
            answered = True

    def judged() -> bool:
        now = vs.counters(net.sandbox_id)
        return now["dropped_packets"] >= before["dropped_packets"] + 2 and now["dropped_bytes"] >= before[
            "dropped_bytes"
        ] + len(payload)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(connect)
        await send_udp(path, ip, payload, port)
        with trio.fail_after(ARRIVAL_S):
            while not answered and not judged():
                await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    return not answered


def probe_payload(tag: bytes) -> bytes:
    """A datagram that stands out in the drop counters' bytes (see `dropped`)."""
    return tag + b"." * (600 - len(tag))


@dataclass
class Server:
    """TCP and UDP on one port inside a netns; remembers who reached it."""

    tcp_peers: list[str] = field(default_factory=list)
    udp_payloads: list[tuple[bytes, str]] = field(default_factory=list)
    # trio.current_time() of each arrival, in the order of the lists above.
    tcp_times: list[float] = field(default_factory=list)
    udp_times: list[float] = field(default_factory=list)

    async def got_tcp(self, timeout: float = ARRIVAL_S) -> bool:
        """Has a TCP connection arrived (waiting up to `timeout` for one)?"""
        with trio.move_on_after(timeout):
            while not self.tcp_peers:
                await trio.sleep(0.005)
        return bool(self.tcp_peers)

    async def got_udp(self, payload: bytes, timeout: float = ARRIVAL_S) -> bool:
        with trio.move_on_after(timeout):
            while not any(p == payload for p, _ in self.udp_payloads):
                await trio.sleep(0.005)
        return any(p == payload for p, _ in self.udp_payloads)


@asynccontextmanager
async def serving(path: str, ip: str = "::", port: int = SERVICE_PORT) -> AsyncIterator[Server]:
    """Serve on ip:port; the default "::" takes IPv4 and IPv6 (peers of both as plain strings)."""
    server = Server()
    tcp = await socket_in(path, family=_family(ip))
    udp = await socket_in(path, socket.SOCK_DGRAM, _family(ip))
    if ip == "::":
        tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await tcp.bind((ip, port))
    tcp.listen(64)
    await udp.bind((ip, port))

    async def accept_loop() -> None:
        while True:
            conn, peer = await tcp.accept()
            server.tcp_peers.append(peer[0].removeprefix("::ffff:"))
            server.tcp_times.append(trio.current_time())
            conn.close()

    async def udp_loop() -> None:
        while True:
            data, peer = await udp.recvfrom(2048)
            server.udp_payloads.append((data, peer[0].removeprefix("::ffff:")))
            server.udp_times.append(trio.current_time())

    with tcp, udp:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_loop)
            nursery.start_soon(udp_loop)
            yield server
            nursery.cancel_scope.cancel()


def _udp_and_tcp_on_one_port(ip: str) -> tuple[socket.socket, socket.socket]:
    """A UDP socket and a listening TCP socket bound to the same free port of `ip`."""
    for _ in range(100):  # port allocation: a port free for UDP may be taken for TCP
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((ip, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind((ip, udp.getsockname()[1]))
        except OSError as e:
            udp.close()
            tcp.close()
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        tcp.listen(16)
        return udp, tcp
    raise RuntimeError(f"no port of {ip} free for both UDP and TCP")


@dataclass
class DnsUpstream:
    address: str  # "127.0.0.1:port"
    names: list[str] = field(default_factory=list)  # every question name it was asked, in order


@asynccontextmanager
async def dns_upstream_server() -> AsyncIterator[DnsUpstream]:
    """A DNS server on 127.0.0.1 (UDP and TCP, one port) answering `UPSTREAM_RECORDS`."""
    udp, tcp = _udp_and_tcp_on_one_port("127.0.0.1")
    sock = trio.socket.from_stdlib_socket(udp)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(tcp))
    upstream = DnsUpstream(f"127.0.0.1:{udp.getsockname()[1]}")

    def answer(query: bytes) -> bytes:
        answer = parse_answer(query)
        upstream.names.append(answer.qname if answer is not None else "<unparseable>")
        return dns_response(query)

    async def serve_udp() -> None:
        while True:
            query, peer = await sock.recvfrom(2048)
            await sock.sendto(answer(query), peer)

    async def serve_tcp(stream: trio.SocketStream) -> None:
        async with stream:
            header = await stream.receive_some(2)
            query = await stream.receive_some(struct.unpack("!H", header)[0])
            response = answer(query)
            await stream.send_all(struct.pack("!H", len(response)) + response)

    try:
        with sock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_udp)
                nursery.start_soon(trio.serve_listeners, serve_tcp, [listener])
                yield upstream
                nursery.cancel_scope.cancel()
    finally:
        await listener.aclose()


# --- guests ------------------------------------------------------------------


@dataclass
class Guest:
    netns: str

    @property
    def netns_path(self) -> str:
        return str(netns.netns_path(self.netns))


def _guest_address_commands(guest: Guest, net: SandboxNetwork) -> list[str]:
    """Give the guest end (eth0 in guest.netns) the sandbox's fixed addresses and routes."""
    return [
        f"ip -n {guest.netns} link set lo up",
        f"ip -n {guest.netns} addr add {net.guest_ip}/30 dev eth0",
        f"ip -n {guest.netns} link set eth0 up",
        f"ip -n {guest.netns} route add default via {net.gateway_ip}",
        f"ip -n {guest.netns} addr add {net.guest_ip6}/126 dev eth0 nodad",
        f"ip -n {guest.netns} -6 route add default via {net.gateway_ip6}",
    ]


@asynccontextmanager
async def veth_guest(net: SandboxNetwork, name: str) -> AsyncIterator[Guest]:
    """Replace tap0 by a veth whose other end, in a new guest netns, holds the guest address."""
    guest = Guest(f"cubetest-net-g-{name}")
    ns = net.netns
    try:
        await trio.to_thread.run_sync(
            lambda: sh(
                f"ip netns add {guest.netns}",
                f"ip -n {ns} link del {net.tap}",
                f"ip -n {ns} link add {net.tap} type veth peer name eth0 netns {guest.netns}",
                f"ip -n {ns} addr add {net.gateway_ip}/30 dev {net.tap}",
                f"ip -n {ns} addr add {net.gateway_ip6}/126 dev {net.tap} nodad",
                f"ip -n {ns} link set {net.tap} up",
                *_guest_address_commands(guest, net),
            )
        )
        yield guest
    finally:
        await trio.to_thread.run_sync(sh_quiet, f"ip netns del {guest.netns}")


_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


def _open_tap(path: str, name: str) -> int:
    """Attach to tap `name` in the netns at `path`, creating a non-persistent one if missing.

    /dev/net/tun binds to the netns of whoever opens it, so open it inside.
    """
    with netns.entered(path):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _pump(src: int, dst: int) -> None:
    while True:
        await trio.lowlevel.wait_readable(src)
        try:
            frame = os.read(src, 65536)
        except BlockingIOError:
            continue
        try:
            os.write(dst, frame)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EIO):
                raise


@asynccontextmanager
async def tap_guest(net: SandboxNetwork, name: str) -> AsyncIterator[Guest]:
    """Keep the sandbox's tap0 (as UML would use it) and wire it to a tap in a guest netns."""
    guest = Guest(f"cubetest-net-g-{name}")
    await trio.to_thread.run_sync(sh, f"ip netns add {guest.netns}")
    sandbox_fd = guest_fd = -1
    try:
        sandbox_fd = await trio.to_thread.run_sync(_open_tap, net.netns_path, net.tap)
        guest_fd = await trio.to_thread.run_sync(_open_tap, guest.netns_path, "eth0")
        await trio.to_thread.run_sync(
            lambda: sh(
                *_guest_address_commands(guest, net),
            )
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, sandbox_fd, guest_fd)
            nursery.start_soon(_pump, guest_fd, sandbox_fd)
            yield guest
            nursery.cancel_scope.cancel()
    finally:
        for fd in (sandbox_fd, guest_fd):
            if fd >= 0:
                os.close(fd)
        await trio.to_thread.run_sync(sh_quiet, f"ip netns del {guest.netns}")


# `async with sandbox(policy, guest="veth"|"tap") as (net, guest)` (the conftest fixture).
SandboxFactory = Callable[..., AbstractAsyncContextManager[tuple[SandboxNetwork, Guest]]]
