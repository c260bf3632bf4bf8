"""Addresses and interface names CubeVS hands out.

`config.host_network` (default 10.213.0.0/16) is cut into /30s. The first /30
belongs to the node: its .1 is the DNS resolver every sandbox reaches through
its gateway. Sandbox slot N gets /30 number N+1: the host side of its veth is
.1, the netns side is .2 — the `host_ip` the proxy connects to.

IPv6 mirrors it: the veth carries a /126 from the ULA fdcb:<tag>::/64 (same
slot arithmetic), and every guest has fdcb:e0::2/126 behind gateway fdcb:e0::1.

Several services (and test runs) may share one host, each with its own
host_network; the short `tag` derived from it keeps their host-side interface
names, nft tables and bpf pins apart.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

# Every guest has the same address (snapshots and warm instances need it); the host
# reaches guest ports through the sandbox's `SandboxNetwork.host_ip`. The default
# template's init (guest/guest_init.py, which imports nothing of the host) says the same.
GUEST_IP = "169.254.0.2"
GATEWAY_IP = "169.254.0.1"
GUEST_PREFIX = 30
# Their IPv6 counterparts: the same in every sandbox.
GUEST_IP6 = "fdcb:e0::2"
GATEWAY_IP6 = "fdcb:e0::1"
GUEST_PREFIX6 = 126
NETNS_UPLINK = "eth0"  # the netns side of the veth
TAP_NAME = "tap0"


@dataclass(frozen=True)
class Plan:
    """Where one sandbox network's pieces go (pure data, no kernel state)."""

    sandbox_id: str
    slot: int
    netns: str
    host_veth: str
    host_side_ip: str  # on the host end of the veth; the host's source towards the sandbox
    host_ip: str  # on the netns end; host → host_ip:PORT reaches the guest
    prefixlen: int
    resolver_ip: str
    host_side_ip6: str
    host_ip6: str
    guest_ip: str = GUEST_IP
    gateway_ip: str = GATEWAY_IP
    guest_prefixlen: int = GUEST_PREFIX
    guest_ip6: str = GUEST_IP6
    gateway_ip6: str = GATEWAY_IP6
    prefixlen6: int = GUEST_PREFIX6


class Addressing:
    def __init__(self, host_network: str) -> None:
        self.network = ipaddress.IPv4Network(host_network)
        if self.network.prefixlen > 29:
            raise ValueError(f"host_network {host_network} is too small (need at least a /29)")
        self.tag = hashlib.sha1(str(self.network).encode()).hexdigest()[:4]
        self.max_slots = self.network.num_addresses // 4 - 1
        self.resolver_ip = str(self.network.network_address + 1)
        self.network6 = ipaddress.IPv6Network(f"fdcb:{self.tag}::/64")

    @property
    def veth_prefix(self) -> str:
        return f"cube{self.tag}-"

    @property
    def nft_table(self) -> str:
        return f"cube_{self.tag}"

    @property
    def resolver_label(self) -> str:
        return f"lo:cube{self.tag}"

    def plan(self, sandbox_id: str, slot: int) -> Plan:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} outside 0..{self.max_slots - 1} for {self.network}")
        base = self.network.network_address + 4 * (slot + 1)
        base6 = self.network6.network_address + 4 * (slot + 1)
        return Plan(
            sandbox_id=sandbox_id,
            slot=slot,
            netns=f"cube-{sandbox_id}",
            host_veth=f"{self.veth_prefix}{slot}",
            host_side_ip=str(base + 1),
            host_ip=str(base + 2),
            prefixlen=30,
            resolver_ip=self.resolver_ip,
            host_side_ip6=str(base6 + 1),
            host_ip6=str(base6 + 2),
        )
