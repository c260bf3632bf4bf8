"""The frontend's memory as announced by VHOST_USER_SET_MEM_TABLE, read and written through its fds.

Never mapped: the frontend (a UML kernel, run by the sandbox's uid) owns its
memory file and may truncate it at any moment. A store to or load from a
mapping past the new end raises SIGBUS in the service, which would take every
sandbox down with it; pread/pwrite past the end only come up short, which
surfaces here as a ValueError that ends this one frontend's session. Writes
also stop at the file's end instead of growing a file the frontend cut.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

REGION_FORMAT = "<QQQQ"  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
REGION_SIZE = struct.calcsize(REGION_FORMAT)


class FrontendMemoryGone(ValueError):
    """The frontend's memory file no longer holds a range its memory table announced."""


@dataclass
class FrontendRegion:
    guest_phys_addr: int
    size: int
    user_addr: int
    offset: int  # where the region starts inside its file
    fd: int  # the memory file, ours to close

    def contains(self, gpa: int, length: int) -> bool:
        return self.guest_phys_addr <= gpa and gpa + length <= self.guest_phys_addr + self.size


class FrontendMemory:
    """Guest memory (GuestMemoryAccess) over the frontend's memory files (UML: its physmem file)."""

    def __init__(self) -> None:
        self.regions: list[FrontendRegion] = []

    @classmethod
    def from_table(cls, payload: bytes, fds: list[int]) -> FrontendMemory:
        """Take the regions and their fds (each region's fd is kept, the rest are closed)."""
        count = struct.unpack_from("<I", payload)[0]
        memory = cls()
        try:
            for i in range(count):
                gpa, size, uaddr, offset = struct.unpack_from(REGION_FORMAT, payload, 8 + i * REGION_SIZE)
                fd = fds.pop(0)
                memory.regions.append(FrontendRegion(gpa, size, uaddr, offset, fd))
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise ValueError(f"memory region {i} is not a regular file")
                if info.st_size < offset + size:
                    raise FrontendMemoryGone(f"memory region {i} runs past the end of its file")
        except BaseException:
            memory.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)  # more fds than regions
        return memory

    def close(self) -> None:
        for region in self.regions:
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
            if r.contains(gpa, length):
                return r.fd, r.offset + gpa - r.guest_phys_addr
        raise ValueError(f"guest range {gpa:#x}+{length:#x} is not in any memory region")

    def read(self, gpa: int, length: int) -> bytes:
        fd, offset = self.file_range(gpa, length)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise FrontendMemoryGone(f"guest range {gpa:#x}+{length:#x}: past the end of its memory file")
        return data

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        fd, offset = self.file_range(gpa, len(data))
        if os.fstat(fd).st_size < offset + len(data) or os.pwrite(fd, data, offset) != len(data):
            raise FrontendMemoryGone(f"guest range {gpa:#x}+{len(data):#x}: past the end of its memory file")

    def slice(self, gpa: int, length: int) -> memoryview:
        """A read-only copy (nothing here is mapped): for parsing, never for writing back."""
        return memoryview(self.read(gpa, length))

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, value.to_bytes(size, "little"))
