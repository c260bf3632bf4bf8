"""The frontend's memory as announced by VHOST_USER_SET_MEM_TABLE, mapped shared."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from appliance.runtime.virtio.memory import MappedGuestMemory

REGION_FORMAT = "<QQQQ"  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
REGION_SIZE = struct.calcsize(REGION_FORMAT)


@dataclass
class MappedRegion:
    guest_phys_addr: int
    size: int
    user_addr: int
    mapping: mmap.mmap
    offset: int  # where the region starts inside `mapping` (and its file)
    view: memoryview
    fd: int  # the memory file, kept to give pages back (FrontendMemory.file_range)


class FrontendMemory(MappedGuestMemory):
    """Guest memory over the frontend's memory files (UML: its physmem file)."""

    def __init__(self) -> None:
        self.regions: list[MappedRegion] = []

    @classmethod
    def from_table(cls, payload: bytes, fds: list[int]) -> FrontendMemory:
        count = struct.unpack_from("<I", payload)[0]
        memory = cls()
        try:
            for i in range(count):
                gpa, size, uaddr, offset = struct.unpack_from(REGION_FORMAT, payload, 8 + i * REGION_SIZE)
                fd = fds.pop(0)
                try:
                    mapping = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                except BaseException:
                    os.close(fd)
                    raise
                view = memoryview(mapping)[offset : offset + size]
                memory.regions.append(MappedRegion(gpa, size, uaddr, mapping, offset, view, fd))
        except BaseException:
            memory.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)  # more fds than regions
        return memory

    def close(self) -> None:
        for region in self.regions:
            region.view.release()
            region.mapping.close()
            os.close(region.fd)
        self.regions = []

    def user_to_guest(self, user_addr: int) -> int:
        """Ring addresses arrive in the frontend's virtual address space."""
        for r in self.regions:
            if r.user_addr <= user_addr < r.user_addr + r.size:
                return user_addr - r.user_addr + r.guest_phys_addr
        raise ValueError(f"frontend address {user_addr:#x} is not in any memory region")

    def file_range(self, gpa: int, length: int) -> tuple[int, int]:
        """(memory file fd, offset in it) of guest-physical [gpa, gpa+length), inside one region.
        The fd stays ours: dup it to use it beyond the next SET_MEM_TABLE."""
        for r in self.regions:
            if r.guest_phys_addr <= gpa and gpa + length <= r.guest_phys_addr + r.size:
                return r.fd, r.offset + gpa - r.guest_phys_addr
        raise ValueError(f"guest range {gpa:#x}+{length:#x} is not in any memory region")

    def mapped_regions(self) -> Iterator[tuple[int, memoryview]]:
        return ((r.guest_phys_addr, r.view) for r in self.regions)
