"""The virtio-vsock packet header (virtio 1.x §5.10.6) and its operations."""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("<QQIIIHHIII")  # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
HEADER_SIZE = HEADER.size  # 44
TYPE_STREAM = 1

OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7

SHUTDOWN_RCV = 1  # the sender will receive no more
SHUTDOWN_SEND = 2  # the sender will send no more


@dataclass(frozen=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    length: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def parse(cls, data: bytes) -> Header:
        return cls(*HEADER.unpack_from(data))

    def pack(self) -> bytes:
        return HEADER.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.length,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )
