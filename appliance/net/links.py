"""Build and remove one sandbox's namespace, veth pair and tap (blocking; run in a thread).

Layout (names from `addressing.Plan`):

    host netns                         netns cube-<id>                    guest
    cube<tag>-<slot> 10.213.x.1/30 ── eth0 10.213.x.2/30 (= host_ip)
                     fdcb:<tag>::y+1/126    fdcb:<tag>::y+2/126 (= host_ip6)
                                       tap0 169.254.0.1/30 (gateway) ── 169.254.0.2
                                            fdcb:e0::1/126           ── fdcb:e0::2

IPv6 addresses are added without duplicate address detection (IFA_F_NODAD):
they are unique by construction, and DAD would keep them unusable for ~1 s.

The veth peer is created from inside the new netns, so no interface ever
appears in the host under a name another sandbox could collide with.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.net import netns, nft
from appliance.net.addressing import NETNS_UPLINK, TAP_NAME, Plan

_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_TUNSETOWNER = 0x400454CC
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
# What UML's vector transport asks for (arch/um/drivers/vector_user.c,
# user_init_tap_fds): a tap without packet info, with virtio-net headers.
TAP_FLAGS = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR
# tap0 and eth0 share an interface group so teardown deletes both in one
# RTM_DELLINK (one RCU grace period instead of two: ~25 ms instead of ~50 ms).
_LINK_GROUP = 0xC0BE
_IFA_F_NODAD = 0x02


def _create_tap(name: str, owner_uid: int) -> None:
    """A persistent tap in the calling thread's netns that `owner_uid` may attach to."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), TAP_FLAGS))
        fcntl.ioctl(fd, _TUNSETOWNER, owner_uid)
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def _write_sysctl(path: str, value: str) -> None:
    # /proc/sys/net resolves against the calling thread's netns.
    Path(path).write_text(value)


def build(plan: Plan, tap_owner_uid: int) -> int:
    """Create everything for `plan`; return the host-side veth's ifindex.

    On failure nothing is left: the half-built netns is removed (its links go
    with it) and a host-side veth, if it got that far, is deleted.
    """
    host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with netns.created(plan.netns), IPRoute() as ns:
            _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
            _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")
            ns.link("set", index=1, state="up")
            ns.link(
                "add",
                ifname=NETNS_UPLINK,
                kind="veth",
                group=_LINK_GROUP,
                peer={"ifname": plan.host_veth, "net_ns_fd": host_ns},
            )
            uplink = ns.link_lookup(ifname=NETNS_UPLINK)[0]
            ns.addr("add", index=uplink, address=plan.host_ip, prefixlen=plan.prefixlen)
            ns.addr("add", index=uplink, address=plan.host_ip6, prefixlen=plan.prefixlen6, flags=_IFA_F_NODAD)
            ns.link("set", index=uplink, state="up")
            _create_tap(TAP_NAME, tap_owner_uid)
            tap = ns.link_lookup(ifname=TAP_NAME)[0]
            ns.addr("add", index=tap, address=plan.gateway_ip, prefixlen=plan.guest_prefixlen)
            ns.addr("add", index=tap, address=plan.gateway_ip6, prefixlen=plan.prefixlen6, flags=_IFA_F_NODAD)
            ns.link("set", index=tap, group=_LINK_GROUP, state="up")
            ns.route("add", dst="default", gateway=plan.host_side_ip)
            ns.route("add", dst="::/0", gateway=plan.host_side_ip6, family=socket.AF_INET6)
            nft.run(nft.sandbox_ruleset(plan))
        with IPRoute() as host:
            try:
                index = host.link_lookup(ifname=plan.host_veth)[0]
                host.addr("add", index=index, address=plan.host_side_ip, prefixlen=plan.prefixlen)
                host.addr(
                    "add",
                    index=index,
                    address=plan.host_side_ip6,
                    prefixlen=plan.prefixlen6,
                    flags=_IFA_F_NODAD,
                )
                host.link("set", index=index, state="up")
            except BaseException:
                remove(plan)
                raise
        return int(index)
    finally:
        os.close(host_ns)


def remove(plan: Plan) -> None:
    """Delete the links (synchronously, so listings are clean at once) and the netns."""
    if netns.exists(plan.netns):
        with netns.entered(netns.netns_path(plan.netns)), IPRoute() as ns:
            try:  # tap0 and eth0; deleting eth0 deletes the host-side peer too
                ns.link("del", group=_LINK_GROUP)
            except NetlinkError as e:
                if e.code != errno.ENODEV:  # already gone
                    raise
    with IPRoute() as host:
        for index in host.link_lookup(ifname=plan.host_veth):
            try:
                host.link("del", index=index)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise
    netns.remove(plan.netns)
