"""The disks behind virtio-blk: `CowDisk`, a read-only base image and a sparse overlay file of
the same size (a sandbox's root disk), and `RawDisk`, one plain file (a volume's image).

Which blocks the sandbox has written is the overlay's own allocation map
(SEEK_DATA/SEEK_HOLE), so there is no side table to keep consistent: a block
with data in the overlay is read from it, a hole is read from the base image.
Partial-block writes copy the block up from the base first. Discard punches the
hole back (the block reads as the template again, which virtio allows).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Protocol

from appliance.runtime.virtio.memory import punch_hole

BLOCK = 4096


class Disk(Protocol):
    """What virtio-blk serves: `size` bytes, read and written at byte offsets."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes | memoryview) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class RawDisk:
    """One plain file, read and written as it is (`fd` is the disk's: `close` closes it). With no
    file (`RawDisk.empty()`), a disk of 0 bytes: an empty volume slot (runtime/kvm/volumes.py)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size

    @classmethod
    def empty(cls) -> RawDisk:
        return cls(-1, 0)

    def read(self, offset: int, length: int) -> bytes:
        _check(offset, length, self.size)
        return os.pread(self._fd, length, offset).ljust(length, b"\0")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        _check(offset, len(data), self.size)
        os.pwrite(self._fd, data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def discard(self, offset: int, length: int) -> None:
        _check(offset, length, self.size)
        start = (offset + BLOCK - 1) // BLOCK * BLOCK
        stop = (offset + length) // BLOCK * BLOCK
        if stop > start:
            punch_hole(self._fd, start, stop - start)

    def flush(self) -> None:
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


def _check(offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"I/O at {offset}+{length} beyond the disk's {size} bytes")


class CowDisk:
    def __init__(self, overlay: Path, *, base: Path | None = None, size: int | None = None) -> None:
        if size is None:
            if base is None:
                raise ValueError("a disk without a base image needs a size")
            size = base.stat().st_size
        self.size = size
        self.base_path = base
        self.overlay_path = overlay
        self._base_fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC) if base is not None else -1
        self._base_size = base.stat().st_size if base is not None else 0
        self._fd = os.open(overlay, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size != size:
            os.ftruncate(self._fd, size)

    def close(self) -> None:
        for fd in (self._fd, self._base_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._base_fd = -1

    def _overlay_extents(self, offset: int, end: int) -> list[tuple[int, int, bool]]:
        """[start, stop) pieces of [offset, end), each flagged True when in the overlay."""
        pieces: list[tuple[int, int, bool]] = []
        position = offset
        while position < end:
            try:
                data = os.lseek(self._fd, position, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end  # no data after position
            if data > position:
                stop = min(data, end)
                pieces.append((position, stop, False))
                position = stop
                continue
            hole = os.lseek(self._fd, position, os.SEEK_HOLE)
            stop = min(hole, end)
            pieces.append((position, stop, True))
            position = stop
        return pieces

    def _read_base(self, offset: int, length: int) -> bytes:
        available = max(0, min(length, self._base_size - offset))
        data = os.pread(self._base_fd, available, offset) if available else b""
        return data.ljust(length, b"\0")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if self._base_fd < 0:
            return os.pread(self._fd, length, offset).ljust(length, b"\0")
        return b"".join(
            os.pread(self._fd, stop - start, start) if in_overlay else self._read_base(start, stop - start)
            for start, stop, in_overlay in self._overlay_extents(offset, offset + length)
        )

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        if self._base_fd >= 0:
            # Copy up the partially written blocks at both edges, so a block in the
            # overlay is always complete.
            first = offset - offset % BLOCK
            last = (offset + len(data) + BLOCK - 1) // BLOCK * BLOCK
            for block in {first, last - BLOCK}:
                covered = offset <= block and block + BLOCK <= offset + len(data)
                if not covered and block < self.size:
                    length = min(BLOCK, self.size - block)
                    if not self._overlay_extents(block, block + length)[0][2]:
                        os.pwrite(self._fd, self._read_base(block, length), block)
        os.pwrite(self._fd, data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def discard(self, offset: int, length: int) -> None:
        """Give whole blocks back (they read as the base image again)."""
        self._check(offset, length)
        start = (offset + BLOCK - 1) // BLOCK * BLOCK
        stop = (offset + length) // BLOCK * BLOCK
        if stop > start:
            punch_hole(self._fd, start, stop - start)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def overlay_bytes(self) -> int:
        """Bytes the sandbox has written so far (allocated in the overlay)."""
        return os.fstat(self._fd).st_blocks * 512

    def _check(self, offset: int, length: int) -> None:
        _check(offset, length, self.size)
