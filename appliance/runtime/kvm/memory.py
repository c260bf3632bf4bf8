"""Guest physical memory: host mappings registered as KVM memory slots.

A fresh guest gets anonymous memory. A restored guest maps the snapshot's memory
file MAP_PRIVATE: every clone shares the file's page cache and only pages the
guest writes become private copies, which is what makes clones cheap.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.runtime.base import MemoryFootprint
from appliance.runtime.virtio.memory import MappedGuestMemory
from cffi_kvm import CData, KvmError, Vm, ffi, lib

PAGE_SIZE = 4096
GUARD_BYTES = PAGE_SIZE  # around anonymous guest RAM (`GuestMemory.anonymous`)
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
    def __init__(self, layout: RegionLayout, host_addr: CData, *, guard: int = 0) -> None:
        self.layout = layout
        self.host_addr = host_addr
        self.guard = guard  # bytes of PROT_NONE mapping on each side, unmapped with it
        self.view = memoryview(ffi.buffer(host_addr, layout.size))  # type: ignore[arg-type]

    @property
    def start(self) -> int:
        return self.layout.guest_phys_addr

    @property
    def end(self) -> int:
        return self.layout.guest_phys_addr + self.layout.size


class GuestMemory(MappedGuestMemory):
    """All RAM of one guest. Slot flags may enable dirty-page logging (for incremental pause)."""

    def __init__(self, regions: list[MemoryRegion], *, backing_file: Path | None, track_dirty: bool) -> None:
        self.regions = regions
        self.backing_file = backing_file
        self.track_dirty = track_dirty

    @classmethod
    def anonymous(cls, size: int, *, track_dirty: bool = False) -> GuestMemory:
        """Zeroed RAM, each region between two PROT_NONE guard pages: the kernel merges adjacent
        anonymous mappings with the same flags into one VMA (another guest's RAM, a heap), and
        smaps, which `footprint` reads per VMA, would then count their pages as this guest's."""
        regions = []
        for layout in default_layout(size):
            reservation = lib.cube_mmap(
                layout.size + 2 * GUARD_BYTES,
                lib.PROT_NONE,
                lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE,
                -1,
                0,
            )
            if reservation == ffi.NULL:
                raise KvmError(ffi.errno, "mmap(guest memory)")
            address = ffi.cast("char *", reservation) + GUARD_BYTES
            if lib.mprotect(address, layout.size, lib.PROT_READ | lib.PROT_WRITE) != 0:
                error = ffi.errno
                lib.munmap(reservation, layout.size + 2 * GUARD_BYTES)
                raise KvmError(error, "mprotect(guest memory)")
            regions.append(MemoryRegion(layout, address, guard=GUARD_BYTES))
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
            mapped = ffi.cast("char *", region.host_addr) - region.guard
            lib.munmap(mapped, region.layout.size + 2 * region.guard)
        self.regions = []

    def mapped_regions(self) -> Iterator[tuple[int, memoryview]]:
        return ((r.start, r.view) for r in self.regions)

    def save(self, path: Path) -> int:
        """Write all guest RAM to `path` as a sparse file (zero pages stay holes); bytes written."""
        written = 0
        zero = bytes(PAGE_SIZE)
        with open(path, "wb") as out:
            out.truncate(self.size)
            for region in self.regions:
                for page in range(region.layout.size // PAGE_SIZE):
                    data = region.view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
                    if data != zero:
                        out.seek(region.layout.file_offset + page * PAGE_SIZE)
                        out.write(data)
                        written += PAGE_SIZE
        return written

    def save_dirty(self, path: Path, vm: Vm) -> list[tuple[int, int]]:
        """Write only the pages that differ from `backing_file` (the template's memory).

        Those are the pages the guest dirtied (KVM_GET_DIRTY_LOG, reset when the guest
        was restored) plus the ones written from this side, which KVM does not log:
        device models filling guest buffers, a diff applied on resume. Every write to a
        MAP_PRIVATE file mapping leaves a private copy, which /proc/self/pagemap shows.
        `path` is a sparse file laid out like the memory file, holding just those pages;
        returns them as (first page, count) runs of memory-file page numbers.
        """
        if not self.track_dirty or self.backing_file is None:
            raise ValueError("a diff needs dirty-page tracking and a guest restored from a memory file")
        runs = []
        for region in self.regions:
            count = region.layout.size // PAGE_SIZE
            dirty = int.from_bytes(vm.get_dirty_log(region.layout.slot, count), "little")
            pages = set(_set_bits(dirty)) | _private_pages(region)
            first = region.layout.file_offset // PAGE_SIZE
            runs += [(first + start, length) for start, length in page_runs(sorted(pages))]
        with open(path, "wb") as out:
            out.truncate(self.size)
            for first, count in runs:
                out.seek(first * PAGE_SIZE)
                out.write(self._file_pages(first, count))
        return runs

    def apply_diff(self, path: Path, runs: list[tuple[int, int]]) -> None:
        """Copy a diff's pages over the mapped memory file (they become private copies)."""
        with open(path, "rb") as diff:
            for first, count in runs:
                diff.seek(first * PAGE_SIZE)
                self._file_pages(first, count)[:] = diff.read(count * PAGE_SIZE)

    def discard_private_pages(self) -> None:
        """Give the guest's private copies back to the host: every page reads as the
        memory file's again (its page cache, shared). Only after save_dirty kept them."""
        if self.backing_file is None:
            raise ValueError("anonymous guest memory has no file to fall back to")
        for region in self.regions:
            if lib.madvise(region.host_addr, region.layout.size, lib.MADV_DONTNEED) != 0:
                raise KvmError(ffi.errno, "madvise(MADV_DONTNEED)")

    def _file_pages(self, first: int, count: int) -> memoryview:
        """Guest memory behind memory-file pages [first, first+count) (within one region)."""
        offset = first * PAGE_SIZE
        for region in self.regions:
            if region.layout.file_offset <= offset < region.layout.file_offset + region.layout.size:
                start = offset - region.layout.file_offset
                return region.view[start : start + count * PAGE_SIZE]
        raise ValueError(f"memory-file page {first} is outside guest RAM")

    def resident_bytes(self) -> int:
        """Host memory the guest's RAM occupies now (Rss of its mappings, from smaps)."""
        return sum(usage.rss for usage in read_smaps(self._host_starts()).values())

    def footprint(self) -> MemoryFootprint:
        """What the guest's RAM holds now: the private copies (pages it wrote, anonymous or
        copy-on-write over the memory file) apart from the memory file's page cache it maps,
        which every guest restored from that file shares. From a parse of smaps at most
        SMAPS_MAX_AGE_S old (one parse serves every guest of the service)."""
        usage = cached_smaps(self._host_starts()).values()
        private = sum(u.anonymous + u.swap for u in usage)
        if self.backing_file is None:
            return MemoryFootprint(private)
        return MemoryFootprint(private, str(self.backing_file), sum(u.rss - u.anonymous for u in usage))

    def _host_starts(self) -> set[int]:
        return {int(ffi.cast("uintptr_t", r.host_addr)) for r in self.regions}

    def reset_dirty_log(self, vm: Vm) -> None:
        """Forget pages dirtied so far (e.g. right after restoring from a template)."""
        for region in self.regions:
            vm.get_dirty_log(region.layout.slot, region.layout.size // PAGE_SIZE)


@dataclass(frozen=True)
class MappingUsage:
    """One mapping's memory, from /proc/self/smaps."""

    rss: int  # resident: its page cache pages and its private copies
    anonymous: int  # resident pages that belong to no file (copy-on-write copies of a private file mapping)
    swap: int  # private pages swapped out


# How old a parse of /proc/self/smaps the memory budget may use: one parse (all of the service's
# mappings) then serves every guest's footprint, however many guests there are.
SMAPS_MAX_AGE_S = 1.0
_smaps_cache: tuple[float, dict[int, MappingUsage]] = (-math.inf, {})


def read_smaps(starts: set[int] | None = None) -> dict[int, MappingUsage]:
    """The usage of this process's mappings by start address (only those in `starts`, if given)."""
    mappings: dict[int, dict[str, int]] = {}
    current: dict[str, int] | None = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(" ", 1)[0]
            if "-" in head:  # a mapping's first line: "start-end perms offset dev inode path"
                start = int(head.split("-", 1)[0], 16)
                current = None
                if starts is None or start in starts:
                    current = mappings[start] = {"Rss:": 0, "Anonymous:": 0, "Swap:": 0}
            elif current is not None and head in current:
                current[head] = int(line.split()[1]) * 1024  # "Rss:   1234 kB"
    return {start: MappingUsage(f["Rss:"], f["Anonymous:"], f["Swap:"]) for start, f in mappings.items()}


def cached_smaps(starts: set[int]) -> dict[int, MappingUsage]:
    """`read_smaps` for `starts`, from the last parse if it is fresh and has them all."""
    global _smaps_cache
    at, usage = _smaps_cache
    if time.monotonic() - at > SMAPS_MAX_AGE_S or not starts <= usage.keys():
        _smaps_cache = (time.monotonic(), read_smaps())
        usage = _smaps_cache[1]
    return {start: usage[start] for start in starts if start in usage}


PAGEMAP_PRESENT_OR_SWAPPED = 0b11 << 62
PAGEMAP_FILE_OR_SHARED = 1 << 61


def _private_pages(region: MemoryRegion) -> set[int]:
    """Pages of `region` (numbered from its start) this process holds a private copy of."""
    host = int(ffi.cast("uintptr_t", region.host_addr))
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(host // PAGE_SIZE * 8)
        entries = memoryview(pagemap.read(region.layout.size // PAGE_SIZE * 8)).cast("Q")
    return {
        page
        for page, entry in enumerate(entries)
        if entry & PAGEMAP_PRESENT_OR_SWAPPED and not entry & PAGEMAP_FILE_OR_SHARED
    }


def page_runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def _set_bits(bitmap: int) -> list[int]:
    bits = []
    while bitmap:
        low = bitmap & -bitmap
        bits.append(low.bit_length() - 1)
        bitmap ^= low
    return bits
