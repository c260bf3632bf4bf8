"""Guest physical memory: host mappings registered as KVM memory slots.

A fresh guest gets anonymous memory. A restored guest maps the snapshot's memory
file MAP_PRIVATE: every clone shares the file's page cache and only pages the
guest writes become private copies, which is what makes clones cheap.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cffi_kvm import CData, KvmError, Vm, ffi, lib

PAGE_SIZE = 4096
# x86 keeps 3 GiB..4 GiB free for MMIO (virtio-mmio devices, IOAPIC, LAPIC).
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000


@dataclass(frozen=True)
class RegionLayout:
    """One slot of guest RAM, as recorded in a snapshot (plain data)."""

    slot: int
    guest_phys_addr: int
    size: int
    file_offset: int  # where the region's pages start in the memory file


def default_layout(size: int) -> list[RegionLayout]:
    below_gap = min(size, MMIO_GAP_START)
    layout = [RegionLayout(0, 0, below_gap, 0)]
    if size > below_gap:
        layout.append(RegionLayout(1, MMIO_GAP_END, size - below_gap, below_gap))
    return layout


class MemoryRegion:
    def __init__(self, layout: RegionLayout, host_addr: CData) -> None:
        self.layout = layout
        self.host_addr = host_addr
        self.view = memoryview(ffi.buffer(host_addr, layout.size))  # type: ignore[arg-type]

    @property
    def start(self) -> int:
        return self.layout.guest_phys_addr

    @property
    def end(self) -> int:
        return self.layout.guest_phys_addr + self.layout.size


class GuestMemory:
    """All RAM of one guest. Slot flags may enable dirty-page logging (for incremental pause)."""

    def __init__(self, regions: list[MemoryRegion], *, backing_file: Path | None, track_dirty: bool) -> None:
        self.regions = regions
        self.backing_file = backing_file
        self.track_dirty = track_dirty

    @classmethod
    def anonymous(cls, size: int, *, track_dirty: bool = False) -> GuestMemory:
        regions = []
        for layout in default_layout(size):
            address = lib.cube_mmap(
                layout.size,
                lib.PROT_READ | lib.PROT_WRITE,
                lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE,
                -1,
                0,
            )
            if address == ffi.NULL:
                raise KvmError(ffi.errno, "mmap(guest memory)")
            regions.append(MemoryRegion(layout, address))
        return cls(regions, backing_file=None, track_dirty=track_dirty)

    @classmethod
    def from_file(cls, path: Path, layout: list[RegionLayout], *, track_dirty: bool = False) -> GuestMemory:
        """Map a snapshot's memory file copy-on-write (MAP_PRIVATE): the file never changes."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            regions = []
            for region in layout:
                address = lib.cube_mmap(
                    region.size,
                    lib.PROT_READ | lib.PROT_WRITE,
                    lib.MAP_PRIVATE | lib.MAP_NORESERVE,
                    fd,
                    region.file_offset,
                )
                if address == ffi.NULL:
                    raise KvmError(ffi.errno, "mmap(memory file)")
                regions.append(MemoryRegion(region, address))
        finally:
            os.close(fd)  # the mappings keep the file referenced
        return cls(regions, backing_file=path, track_dirty=track_dirty)

    @property
    def size(self) -> int:
        return sum(r.layout.size for r in self.regions)

    @property
    def layout(self) -> list[RegionLayout]:
        return [r.layout for r in self.regions]

    def register(self, vm: Vm) -> None:
        flags = lib.KVM_MEM_LOG_DIRTY_PAGES if self.track_dirty else 0
        for region in self.regions:
            host = int(ffi.cast("uintptr_t", region.host_addr))
            vm.set_user_memory_region(region.layout.slot, region.start, region.layout.size, host, flags)

    def close(self) -> None:
        for region in self.regions:
            region.view.release()
            lib.munmap(region.host_addr, region.layout.size)
        self.regions = []

    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        for region in self.regions:
            if region.start <= gpa and gpa + length <= region.end:
                return region, gpa - region.start
        raise ValueError(f"guest range {gpa:#x}+{length:#x} is not RAM")

    def slice(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest memory (no copy); valid while the memory is mapped."""
        region, offset = self._locate(gpa, length)
        return region.view[offset : offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.slice(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.slice(gpa, len(data))[:] = data

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.slice(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.slice(gpa, size)[:] = value.to_bytes(size, "little")

    def save(self, path: Path, *, vm: Vm | None = None, base: Path | None = None) -> int:
        """Write guest RAM to `path`; returns the bytes written.

        With `base` (the memory file this guest was restored from) and dirty
        tracking on, `path` starts as a copy of `base` and only the pages dirtied
        since the last dirty-log read are written. Otherwise every non-zero page is
        written into a sparse file.
        """
        written = 0
        incremental = base is not None and vm is not None and self.track_dirty
        if incremental:
            assert base is not None
            shutil.copyfile(base, path)
        with open(path, "r+b" if incremental else "wb") as out:
            if not incremental:
                out.truncate(sum(r.layout.size for r in self.regions))
            for region in self.regions:
                pages = region.layout.size // PAGE_SIZE
                candidates: list[int] | range
                if incremental:
                    assert vm is not None
                    bitmap = int.from_bytes(vm.get_dirty_log(region.layout.slot, pages), "little")
                    candidates = _set_bits(bitmap)
                else:
                    candidates = range(pages)
                zero = bytes(PAGE_SIZE)
                for page in candidates:
                    data = region.view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
                    if not incremental and data == zero:
                        continue
                    out.seek(region.layout.file_offset + page * PAGE_SIZE)
                    out.write(data)
                    written += PAGE_SIZE
        return written

    def resident_bytes(self) -> int:
        """Host memory the guest's RAM occupies now (Rss of its mappings, from smaps)."""
        starts = {f"{int(ffi.cast('uintptr_t', r.host_addr)):x}-" for r in self.regions}
        total = 0
        inside = False
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                if "-" in line.split(" ", 1)[0]:
                    inside = any(line.startswith(start) for start in starts)
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
        return total

    def reset_dirty_log(self, vm: Vm) -> None:
        """Forget pages dirtied so far (e.g. right after restoring from a template)."""
        for region in self.regions:
            vm.get_dirty_log(region.layout.slot, region.layout.size // PAGE_SIZE)


def _set_bits(bitmap: int) -> list[int]:
    bits = []
    while bitmap:
        low = bitmap & -bitmap
        bits.append(low.bit_length() - 1)
        bitmap ^= low
    return bits
