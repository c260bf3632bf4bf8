"""Split virtqueue (virtio 1.x §2.7): descriptor table, available ring, used ring.

The queue holds only addresses and indices, all plain data (QueueState), and
reads the rings through a GuestMemoryAccess each time, so the same queue works
over KVM guest RAM and over a vhost-user frontend's shared memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from appliance.runtime.virtio.memory import GuestMemoryAccess

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
DESCRIPTOR_SIZE = 16


class QueueError(Exception):
    """The driver handed us a malformed chain (loop, bad index, out-of-RAM buffer)."""


@dataclass
class QueueState:
    max_size: int
    size: int = 0
    ready: bool = False
    desc_table: int = 0
    avail_ring: int = 0
    used_ring: int = 0
    next_avail: int = 0  # free-running 16-bit index of the next available entry to take
    next_used: int = 0  # free-running 16-bit index of the next used entry to fill


@dataclass(frozen=True)
class Descriptor:
    addr: int
    length: int
    flags: int

    @property
    def device_writable(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


@dataclass(frozen=True)
class DescriptorChain:
    head: int
    descriptors: list[Descriptor]

    def readable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if not d.device_writable]

    def writable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.device_writable]


class Queue:
    def __init__(self, max_size: int, state: QueueState | None = None) -> None:
        self.state = state or QueueState(max_size=max_size, size=max_size)

    def reset(self) -> None:
        self.state = QueueState(max_size=self.state.max_size, size=self.state.max_size)

    def pop(self, memory: GuestMemoryAccess) -> DescriptorChain | None:
        """The next chain the driver made available, or None when the ring is empty."""
        s = self.state
        avail_idx = memory.read_int(s.avail_ring + 2, 2)
        if avail_idx == s.next_avail:
            return None
        slot = s.next_avail % s.size
        head = memory.read_int(s.avail_ring + 4 + 2 * slot, 2)
        s.next_avail = (s.next_avail + 1) & 0xFFFF
        return DescriptorChain(head, self._walk(memory, head))

    def _walk(self, memory: GuestMemoryAccess, head: int) -> list[Descriptor]:
        s = self.state
        chain: list[Descriptor] = []
        index = head
        while True:
            if index >= s.size or len(chain) >= s.size:
                raise QueueError(f"descriptor chain from {head} is malformed at {index}")
            addr, length, flags, next_index = struct.unpack(
                "<QIHH", memory.slice(s.desc_table + index * DESCRIPTOR_SIZE, DESCRIPTOR_SIZE)
            )
            chain.append(Descriptor(addr, length, flags))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            index = next_index

    def add_used(self, memory: GuestMemoryAccess, head: int, written: int) -> None:
        """Return a chain to the driver, telling it how many bytes the device wrote."""
        s = self.state
        slot = s.next_used % s.size
        memory.write(s.used_ring + 4 + 8 * slot, struct.pack("<II", head, written))
        s.next_used = (s.next_used + 1) & 0xFFFF
        # The element must be visible before the index: x86 stores are ordered.
        memory.write_int(s.used_ring + 2, 2, s.next_used)

    def driver_wants_interrupt(self, memory: GuestMemoryAccess) -> bool:
        return not memory.read_int(self.state.avail_ring, 2) & VIRTQ_AVAIL_F_NO_INTERRUPT


def read_chain_bytes(memory: GuestMemoryAccess, descriptors: list[Descriptor]) -> bytes:
    return b"".join(memory.read(d.addr, d.length) for d in descriptors)


def write_chain_bytes(memory: GuestMemoryAccess, descriptors: list[Descriptor], data: bytes) -> int:
    """Scatter `data` over writable descriptors; returns bytes written."""
    offset = 0
    for d in descriptors:
        if offset >= len(data):
            break
        piece = data[offset : offset + d.length]
        memory.write(d.addr, piece)
        offset += len(piece)
    return offset
