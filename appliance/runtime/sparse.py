"""Sparse files walked and copied by their data extents (SEEK_DATA/SEEK_HOLE): one way for
every runtime's disks (a template image copied, a kvm overlay folded into an image, a uml
COW file copied), holes kept and never read."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path


def data_extents(fd: int) -> Iterator[tuple[int, int]]:
    """[start, end) of every data extent of the file `fd`, in order; holes are skipped."""
    size = os.fstat(fd).st_size
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


# copy_file_range refuses files on two filesystems of different kinds (EXDEV: a template
# image on the boot medium's squashfs, its copy on the data disk) or a filesystem without it.
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_CHUNK = 1 << 20


def copy_extents(source: int, target: int) -> int:
    """Write every data extent of `source` at the same offsets of `target` (in the kernel where
    it can: a filesystem that can shares the blocks); returns the bytes written."""
    written = 0
    in_kernel = True
    for start, end in data_extents(source):
        position = start
        while position < end:
            if in_kernel:
                try:
                    copied = os.copy_file_range(source, target, end - position, position, position)
                except OSError as exc:
                    if exc.errno not in _NO_KERNEL_COPY:
                        raise
                    in_kernel = False
                    continue
            else:
                chunk = os.pread(source, min(_CHUNK, end - position), position)
                copied = os.pwrite(target, chunk, position) if chunk else 0
            if copied == 0:
                raise OSError(errno.EIO, f"short copy at byte {position}")
            position += copied
        written += end - start
    return written


def sparse_copy(source: Path, target: Path) -> None:
    """`source` copied to a new file `target`, holes kept (a disk image or overlay is mostly
    holes). Neither path may be a symlink: a sandbox's own directory is its uid's to change."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    src = os.open(source, os.O_RDONLY | flags)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags, 0o644)
        try:
            os.ftruncate(dst, os.fstat(src).st_size)
            copy_extents(src, dst)
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def fold_overlay(overlay: Path, image: Path) -> int:
    """Write the data extents of `overlay` (a sparse file whose allocated blocks are its disk's
    written ones, `virtio/blk/disk.py`) over `image`, the copy of its base: `image` then reads
    as the disk did. Returns the bytes written."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    source = os.open(overlay, os.O_RDONLY | flags)
    try:
        target = os.open(image, os.O_WRONLY | flags)
        try:
            written = copy_extents(source, target)
            os.fsync(target)
        finally:
            os.close(target)
    finally:
        os.close(source)
    return written
