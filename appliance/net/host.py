"""Node-wide network set-up in the host netns (blocking; run in a thread).

- IPv4 and IPv6 forwarding (off by default on Debian) so sandbox traffic can be routed;
- nft tables `cube_<tag>` (ip and ip6) masquerading sandbox egress and keeping
  other machines from opening connections to sandboxes or the resolver;
- the resolver address (first address of host_network) on the loopback device,
  labelled `lo:cube<tag>`; every sandbox reaches it as its gateway's port 53
  (a dummy link would be tidier, but not every kernel has CONFIG_DUMMY);
- the always-blocked destination set, including this host's own addresses
  (`BlockedSet`; the service follows address changes and refreshes it).

The always-blocked set beats every sandbox's own lists: a request's allowOut
never opens it. Only the operator's config (`operator_open_networks`) takes
ranges out of it, and the most specific entry wins, so opening 10.0.0.0/8 leaves
host_network and the host's own addresses blocked.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from appliance.net import nft
from appliance.net.addressing import Addressing
from appliance.net.policy import Network

ALWAYS_BLOCKED = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local, including the 169.254.169.254 metadata service
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",  # IPv4-mapped: would sidestep the IPv4 lists
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)


def _enable_ipv6_forwarding() -> None:
    """Forward IPv6 without losing router advertisements.

    With forwarding on, accept_ra=1 stops honouring RAs, and a host whose IPv6
    default route came from one would lose it; accept_ra=2 keeps them.
    """
    conf = Path("/proc/sys/net/ipv6/conf")
    for accept_ra in conf.glob("*/accept_ra"):
        if accept_ra.parent.name != "all" and accept_ra.read_text().strip() == "1":
            accept_ra.write_text("2")
    (conf / "all" / "forwarding").write_text("1")


def set_up(addressing: Addressing) -> None:
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    _enable_ipv6_forwarding()
    nft.run(
        nft.delete_tables(addressing.nft_table)
        + nft.host_ruleset(
            addressing.nft_table,
            str(addressing.network),
            str(addressing.network6),
            addressing.resolver_ip,
            addressing.veth_prefix + "*",
        )
    )
    with IPRoute() as ipr:
        try:
            ipr.addr(
                "add", index=1, address=addressing.resolver_ip, prefixlen=32, label=addressing.resolver_label
            )
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise


def tear_down(addressing: Addressing) -> None:
    nft.run(nft.delete_tables(addressing.nft_table))
    with IPRoute() as ipr:
        try:
            ipr.addr("del", index=1, address=addressing.resolver_ip, prefixlen=32)
        except NetlinkError as e:
            if e.code != errno.EADDRNOTAVAIL:
                raise


def parse_open_networks(text: str, addressing: Addressing) -> tuple[Network, ...]:
    """`operator_open_networks` ("192.168.50.0/24, fd12::/48") as networks; ValueError if malformed
    or if it lies inside the sandboxes' own networks (those stay closed: no sandbox reaches another;
    a wider entry, say 10.0.0.0/8 around host_network, leaves them blocked, being less specific)."""
    networks = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry)
        except ValueError as e:
            raise ValueError(f"operator_open_networks: {entry!r} is not a CIDR ({e})") from None
        for own in (addressing.network, addressing.network6):
            if network.version == own.version and network.subnet_of(own):  # type: ignore[arg-type]
                raise ValueError(f"operator_open_networks: {entry} is inside the sandbox network {own}")
        networks.append(network)
    return tuple(networks)


@dataclass(frozen=True)
class BlockedSet:
    """Destinations a sandbox can never open itself: the longest matching entry decides."""

    entries: dict[Network, bool]  # network → blocked (False: opened by the operator)

    def blocks(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        matches = [n for n in self.entries if n.version == address.version and address in n]
        return bool(matches) and self.entries[max(matches, key=lambda n: n.prefixlen)]


# A dump that addresses changed under (NLM_F_DUMP_INTR) is taken again, this many times at most.
_DUMP_ATTEMPTS = 10


def host_addresses() -> set[Network]:
    """Every address of every link of the host netns, as /32 and /128 networks."""
    with IPRoute() as ipr:
        for attempt in range(_DUMP_ATTEMPTS):
            try:
                messages = ipr.get_addr()
                break
            except NetlinkDumpInterrupted:  # sandboxes come and go: their veths' addresses too
                if attempt == _DUMP_ATTEMPTS - 1:
                    raise
    networks: set[Network] = set()
    for msg in messages:
        address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if address:
            networks.add(ipaddress.ip_network(address.split("%")[0]))
    return networks


def _static_blocked(addressing: Addressing) -> list[Network]:
    """The ranges blocked whatever the host's addresses: ALWAYS_BLOCKED, other sandboxes, the
    veths' host ends, the resolver's other ports."""
    blocked: list[Network] = [ipaddress.ip_network(n) for n in ALWAYS_BLOCKED]
    blocked.extend((addressing.network, addressing.network6))
    return blocked


def _covered(address: Network, networks: Sequence[Network]) -> bool:
    return any(address.network_address in n for n in networks)


def needs_own_entry(address: Network, addressing: Addressing, opened: tuple[Network, ...]) -> bool:
    """Whether a host address needs an entry of its own in the blocked set: unless a blocked range
    holds it already (the veths' ends, loopback, link-local ...) and no operator's opening takes it
    out of there. A sandbox's veth coming or going changes no entry."""
    return not _covered(address, _static_blocked(addressing)) or _covered(address, opened)


def blocked_set(addressing: Addressing, opened: tuple[Network, ...]) -> BlockedSet:
    """The always-blocked set as of now (the host's addresses change: call again when they do)."""
    blocked = _static_blocked(addressing)
    own = [a for a in host_addresses() if needs_own_entry(a, addressing, opened)]
    blocked.extend(sorted(own, key=lambda n: (n.version, n)))
    entries = dict.fromkeys(blocked, True)
    entries.update(dict.fromkeys(opened, False))
    return BlockedSet(entries)


# rtnetlink address notifications (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h).
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, ifindex
_RTATTR = struct.Struct("=HH")  # length, type
_RTM_NEWADDR, _RTM_DELADDR = 20, 21
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_ADDRESS_SIZES = {socket.AF_INET: 4, socket.AF_INET6: 16}


def _align4(n: int) -> int:
    return (n + 3) & ~3


def changed_addresses(buffer: bytes) -> list[Network] | None:
    """The host addresses that the RTM_NEWADDR / RTM_DELADDR notifications in `buffer` (one
    datagram of an address-group netlink socket) add or remove, as /32 and /128 networks; None
    if it holds anything else or anything it cannot read (the caller then re-reads them all)."""
    addresses: list[Network] = []
    offset = 0
    while offset + _NLMSG_HEADER.size <= len(buffer):
        length, kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(buffer, offset)
        end = offset + length
        if kind not in (_RTM_NEWADDR, _RTM_DELADDR) or length < _NLMSG_HEADER.size + _IFADDRMSG.size:
            return None
        if end > len(buffer):
            return None
        family = _IFADDRMSG.unpack_from(buffer, offset + _NLMSG_HEADER.size)[0]
        size = _ADDRESS_SIZES.get(family)
        if size is None:
            return None
        at = offset + _NLMSG_HEADER.size + _IFADDRMSG.size
        while at + _RTATTR.size <= end:
            attr_length, attr_type = _RTATTR.unpack_from(buffer, at)
            if attr_length < _RTATTR.size or at + attr_length > end:
                return None
            if attr_type in (_IFA_ADDRESS, _IFA_LOCAL):
                if attr_length - _RTATTR.size != size:
                    return None
                raw = buffer[at + _RTATTR.size : at + _RTATTR.size + size]
                addresses.append(ipaddress.ip_network(ipaddress.ip_address(raw)))
            at += _align4(attr_length)
        offset = _align4(end)
    return addresses if offset >= len(buffer) else None
