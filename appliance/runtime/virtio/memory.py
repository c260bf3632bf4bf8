"""Guest-physical memory as the device models see it. The VMM's GuestMemory and the
vhost-user backend's mapping of the frontend's memory are both `MappedGuestMemory`:
regions of host mappings, each covering [guest_start, guest_start + len(view))."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from typing import Protocol

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free [offset, offset+length) of a file's storage, keeping its size (reads as zeroes after).

    Through ctypes, which drops the GIL for the call: punching hundreds of MiB of
    tmpfs takes tens of ms, which a worker thread may spend while the event loop
    runs (mmap.madvise(MADV_REMOVE) holds the GIL throughout)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class GuestMemoryAccess(Protocol):
    def slice(self, gpa: int, length: int) -> memoryview:
        """Writable view of guest-physical [gpa, gpa+length); raises ValueError outside RAM."""
        ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def read_int(self, gpa: int, size: int) -> int: ...

    def write_int(self, gpa: int, size: int, value: int) -> None: ...


class MappedGuestMemory:
    """GuestMemoryAccess over host mappings; subclasses say where their regions are."""

    def mapped_regions(self) -> Iterable[tuple[int, memoryview]]:
        """(guest-physical start, view of the whole region) of every region."""
        raise NotImplementedError

    def slice(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest memory (no copy); valid while the memory is mapped."""
        for start, view in self.mapped_regions():
            if start <= gpa and gpa + length <= start + len(view):
                return view[gpa - start : gpa - start + length]
        raise ValueError(f"guest range {gpa:#x}+{length:#x} is not in guest RAM")

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.slice(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.slice(gpa, len(data))[:] = data

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.slice(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.slice(gpa, size)[:] = value.to_bytes(size, "little")
