"""The verdict of the policy program attached to a sandbox's veth, for a crafted packet.

Runs the very program tc has attached (found through the filter's program id)
with BPF_PROG_TEST_RUN: the kernel executes it on a packet built here, with
`skb->ifindex` set to the sandbox's host-side veth, and returns its verdict.
Nothing is transmitted: test runs of tc programs never reach a device, so a
verdict about 169.254.169.254 or a private range sends no packet anywhere.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import socket
import struct
import subprocess

from appliance.net.addressing import Plan

_SYS_BPF = 321  # x86_64
_BPF_PROG_TEST_RUN = 10
_BPF_PROG_GET_FD_BY_ID = 13
TC_ACT_OK = 0
TC_ACT_SHOT = 2
_SKB_IFINDEX_OFFSET = 40  # struct __sk_buff: len … ingress_ifindex, then ifindex
_CTX_SIZE = 48  # up to and including tc_index; the kernel zero-fills the rest

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _GetFdById(ctypes.Structure):
    _fields_ = (("prog_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32))


class _TestRun(ctypes.Structure):
    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    )


def _bpf(command: int, attr: ctypes.Structure) -> int:
    result = _libc.syscall(_SYS_BPF, command, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({command}): {os.strerror(err)}")
    return int(result)


def attached_program_id(host_veth: str) -> int:
    """The id of the program tc runs on `host_veth`'s ingress (what every packet meets)."""
    out = subprocess.run(
        ["tc", "-j", "filter", "show", "dev", host_veth, "ingress"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    ids = [f["options"]["prog"]["id"] for f in json.loads(out) if "prog" in f.get("options", {})]
    assert len(ids) == 1, f"expected one bpf filter on {host_veth}: {out}"
    return int(ids[0])


def _ipv4_tcp_syn(src: str, dst: str, port: int) -> bytes:
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 40, 1, 0, 64, socket.IPPROTO_TCP, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    tcp = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    return b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + struct.pack("!H", 0x0800) + ip + tcp


def _ipv6_tcp_syn(src: str, dst: str, port: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    addresses = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    ip6 = struct.pack("!IHBB", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64) + addresses
    return b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + struct.pack("!H", 0x86DD) + ip6 + tcp


def verdict(plan: Plan, ifindex: int, destination: str, port: int = 80) -> int:
    """TC_ACT_OK or TC_ACT_SHOT: what the attached program does with a TCP SYN from the sandbox
    (after its netns SNATed it to host_ip/host_ip6) to destination:port."""
    if ipaddress.ip_address(destination).version == 4:
        packet = _ipv4_tcp_syn(plan.host_ip, destination, port)
    else:
        packet = _ipv6_tcp_syn(plan.host_ip6, destination, port)
    prog_fd = _bpf(_BPF_PROG_GET_FD_BY_ID, _GetFdById(attached_program_id(plan.host_veth), 0, 0))
    try:
        data = ctypes.create_string_buffer(packet, len(packet))
        out = ctypes.create_string_buffer(len(packet) + 256)
        ctx = ctypes.create_string_buffer(_CTX_SIZE)
        struct.pack_into("<I", ctx, _SKB_IFINDEX_OFFSET, ifindex)
        attr = _TestRun(
            prog_fd=prog_fd,
            data_size_in=len(packet),
            data_size_out=len(out),
            data_in=ctypes.addressof(data),
            data_out=ctypes.addressof(out),
            repeat=1,
            ctx_size_in=_CTX_SIZE,
            ctx_in=ctypes.addressof(ctx),
        )
        _bpf(_BPF_PROG_TEST_RUN, attr)
        return int(attr.retval)
    finally:
        os.close(prog_fd)
