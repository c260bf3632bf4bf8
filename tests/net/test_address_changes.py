"""Which host address changes refresh the always-blocked set: the service reads the netlink
notifications itself and re-reads the host's addresses only when one may need an entry of its
own (a sandbox's veth coming or going never does). A notification it cannot read refreshes.
That a real new host address is blocked is tests/net/test_always_blocked.py's attack."""

from __future__ import annotations

import ipaddress
import socket
import struct

from appliance.net import host
from appliance.net.addressing import Addressing

RTM_NEWADDR, RTM_DELADDR, RTM_NEWLINK = 20, 21, 16
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _address_message(address: str, kind: int = RTM_NEWADDR) -> bytes:
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    body = struct.pack("=BBBBI", family, ip.max_prefixlen, 0, 0, 7)
    body += _attr(IFA_ADDRESS, ip.packed) + _attr(IFA_LABEL, b"veth0\0")
    if ip.version == 4:
        body += _attr(IFA_LOCAL, ip.packed)
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_notifications_are_read_as_the_addresses_they_change() -> None:
    datagram = _address_message("198.18.0.5") + _address_message("fd00::5", RTM_DELADDR)
    assert host.changed_addresses(datagram) == [
        ipaddress.ip_network("198.18.0.5/32"),
        ipaddress.ip_network("198.18.0.5/32"),
        ipaddress.ip_network("fd00::5/128"),
    ]


def test_anything_unreadable_means_read_everything_again() -> None:
    whole = _address_message("198.18.0.5")
    assert host.changed_addresses(whole[:-3]) is None  # cut short
    link = struct.pack("=IHHII", 16 + 16, RTM_NEWLINK, 0, 0, 0) + b"\0" * 16
    assert host.changed_addresses(link) is None  # not an address notification
    bad_length = bytearray(whole)
    struct.pack_into("=H", bad_length, 16 + 8, 200)  # an attribute longer than its message
    assert host.changed_addresses(bytes(bad_length)) is None


def test_only_addresses_outside_the_blocked_ranges_need_an_entry() -> None:
    addressing = Addressing("10.229.0.0/22")
    sandbox_veth = ipaddress.ip_network(str(addressing.network.network_address + 5))
    sandbox_veth6 = ipaddress.ip_network(str(addressing.network6.network_address + 5))
    assert not host.needs_own_entry(sandbox_veth, addressing, ())
    assert not host.needs_own_entry(sandbox_veth6, addressing, ())
    assert not host.needs_own_entry(ipaddress.ip_network("fe80::1/128"), addressing, ())
    public = ipaddress.ip_network("198.18.0.5/32")
    assert host.needs_own_entry(public, addressing, ())
    # An operator's opening takes an address out of its blocked range: it then needs its own.
    lan = ipaddress.ip_network("192.168.7.9/32")
    assert not host.needs_own_entry(lan, addressing, ())
    assert host.needs_own_entry(lan, addressing, (ipaddress.ip_network("192.168.0.0/16"),))
