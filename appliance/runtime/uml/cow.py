"""UML's copy-on-write disk files (`ubd0=<cow>,<base>`), read and merged into a whole image.

The format is the kernel's (arch/um/drivers/cow_user.c, version 3, big-endian):
a 4128-byte header (magic, version, backing file mtime, disk size, sector size,
alignment, format, backing file path), the bitmap at the header's size rounded up
to the alignment (one bit per sector, least significant bit first: set when the
sector lives in this file), then the sectors' data from `data_offset`, each at
`data_offset + sector * sectorsize`.

A sandbox's disk is its template's image under its COW file. A filesystem
snapshot merges the two into one standalone image (`merge_into_image`): a copy of
the base with every sector the sandbox wrote laid over it. UML cannot stack COW
files, so the snapshot must be whole to be a template other sandboxes boot from.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.runtime.sparse import sparse_copy

COW_MAGIC = 0x4F4F4F4D
COW_VERSION = 3
_HEADER = struct.Struct(">IIIQIII")  # magic, version, mtime, size, sectorsize, alignment, cow_format
HEADER_SIZE = _HEADER.size + 4096  # then backing_file[PATH_LEN_V3]
COW_BITMAP_FORMAT = 0


class CowError(ValueError):
    """Not a COW file this code reads (another version or format, or truncated)."""


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


@dataclass(frozen=True)
class CowHeader:
    size: int  # the disk's size in bytes (the base image's)
    sectorsize: int
    alignment: int
    backing_file: str

    @property
    def bitmap_offset(self) -> int:
        return _round_up(HEADER_SIZE, self.alignment)

    @property
    def bitmap_len(self) -> int:
        sectors = -(-self.size // self.sectorsize)
        return -(-sectors // 8)

    @property
    def data_offset(self) -> int:
        return _round_up(self.bitmap_offset + self.bitmap_len, self.alignment)

    @classmethod
    def read(cls, fd: int) -> CowHeader:
        raw = os.pread(fd, HEADER_SIZE, 0)
        if len(raw) < HEADER_SIZE:
            raise CowError("truncated COW header")
        magic, version, _mtime, size, sectorsize, alignment, cow_format = _HEADER.unpack_from(raw)
        if magic != COW_MAGIC or version != COW_VERSION or cow_format != COW_BITMAP_FORMAT:
            raise CowError(f"not a version {COW_VERSION} bitmap COW file (magic {magic:#x}, v{version})")
        if sectorsize <= 0 or alignment <= 0 or size <= 0:
            raise CowError("COW header with a zero size, sector size or alignment")
        backing = raw[_HEADER.size :].split(b"\0", 1)[0].decode(errors="replace")
        return cls(size=size, sectorsize=sectorsize, alignment=alignment, backing_file=backing)


def written_runs(bitmap: bytes) -> Iterator[tuple[int, int]]:
    """(first sector, sector count) of each run of set bits, in order."""
    start = -1
    for index, byte in enumerate(bitmap):
        if byte == 0 and start < 0:
            continue
        if byte == 0xFF and start >= 0:
            continue
        for bit in range(8):
            sector = index * 8 + bit
            if byte >> bit & 1:
                if start < 0:
                    start = sector
            elif start >= 0:
                yield start, sector - start
                start = -1
    if start >= 0:
        yield start, len(bitmap) * 8 - start


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    while count > 0:
        copied = os.copy_file_range(src, dst, count, src_offset, dst_offset)
        if copied <= 0:
            raise CowError("the file ends before the range to copy (a COW file shorter than its bitmap says)")
        src_offset, dst_offset, count = src_offset + copied, dst_offset + copied, count - copied


def apply_cow(cow: Path, image: Path) -> int:
    """Lay every sector `cow` holds over `image` (a copy of its base); returns the bytes laid."""
    laid = 0
    cow_fd = os.open(cow, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        header = CowHeader.read(cow_fd)
        bitmap = os.pread(cow_fd, header.bitmap_len, header.bitmap_offset)
        image_fd = os.open(image, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(image_fd).st_size != header.size:
                raise CowError(f"the image is not the COW file's base ({header.size} bytes)")
            for first, count in written_runs(bitmap):
                offset, length = first * header.sectorsize, count * header.sectorsize
                length = min(length, header.size - offset)
                _copy_range(cow_fd, image_fd, header.data_offset + offset, offset, length)
                laid += length
            os.fsync(image_fd)
        finally:
            os.close(image_fd)
    finally:
        os.close(cow_fd)
    return laid


def merge_into_image(cow: Path, base: Path, image: Path) -> int:
    """A standalone disk image at `image`: `base` with `cow`'s sectors over it; returns bytes laid."""
    sparse_copy(base, image)
    return apply_cow(cow, image)
