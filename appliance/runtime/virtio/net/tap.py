"""Opening a tap device for virtio-net: no packet info, a 12-byte virtio-net header.

The tap itself (tap0 in the sandbox netns) is created by CubeVS; opening it by
name with TUNSETIFF attaches this fd to it. Call `open_tap` in the tap's netns.
"""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
SIOCSIFHWADDR = 0x8924  # tun's character device takes it too
ARPHRD_ETHER = 1
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
VNET_HEADER_SIZE = 12  # virtio 1.x: struct virtio_net_hdr_v1 (num_buffers always present)


def open_tap(name: str) -> int:
    """A non-blocking fd on tap `name` (created if missing, which needs CAP_NET_ADMIN)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HEADER_SIZE))
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_tap_mac(fd: int, mac: bytes) -> None:
    """The MAC of the tap's host side (the address the guest's frames to the host go to)."""
    fcntl.ioctl(fd, SIOCSIFHWADDR, struct.pack("16sH14s8x", b"", ARPHRD_ETHER, mac))


def set_offload(fd: int, flags: int) -> None:
    """Which offloaded (partial-checksum, GSO) frames the tap may hand us for the guest."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
