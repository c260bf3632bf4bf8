"""The template's rootfs.ext4: `mkfs.ext4 -d` straight from a directory (no loop mounts).

Sized to the content plus the writable layer a sandbox may fill. The file is
sparse, so the free space costs nothing on the host until a sandbox writes.
Inode tables and the journal are initialised at mkfs time: with lazy init the
kernel would write them later into every sandbox's copy-on-write file.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import trio

BLOCK = 4096
_INODE_SIZE = 256
_BYTES_PER_INODE = 16384
_FIXED_OVERHEAD = 64 << 20  # journal, group descriptors, reserved GDT blocks
_METADATA_FACTOR = 1.10  # extent blocks, directory growth


class Ext4Error(Exception):
    pass


@dataclass(frozen=True)
class TreeUsage:
    data_bytes: int  # file data rounded to blocks, directories, symlinks
    inodes: int


def measure_tree(root: Path) -> TreeUsage:
    data, inodes = 0, 1
    seen: set[tuple[int, int]] = set()
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(directory, name))
            if (info.st_dev, info.st_ino) in seen:
                continue  # a hardlink costs nothing more
            seen.add((info.st_dev, info.st_ino))
            inodes += 1
            data += (
                -(-info.st_size // BLOCK) * BLOCK if info.st_size > 60 else 0
            )  # short symlinks live in the inode
        data += BLOCK
    return TreeUsage(data, inodes)


def image_size_bytes(usage: TreeUsage, writable_bytes: int) -> int:
    inode_count = usage.inodes + writable_bytes // _BYTES_PER_INODE
    size = (
        int(usage.data_bytes * _METADATA_FACTOR)
        + inode_count * _INODE_SIZE
        + _FIXED_OVERHEAD
        + writable_bytes
    )
    return -(-size // (1 << 20)) * (1 << 20)


async def build_ext4(source: Path, image: Path, writable_bytes: int) -> int:
    """Write `image` from `source`; returns its (apparent) size in bytes."""
    usage = await trio.to_thread.run_sync(measure_tree, source)
    size = image_size_bytes(usage, writable_bytes)
    free = shutil.disk_usage(image.parent).free
    needed = int(usage.data_bytes * _METADATA_FACTOR) + _FIXED_OVERHEAD
    if free < needed:
        raise Ext4Error(
            f"not enough disk space in {image.parent}: the image needs about {needed >> 20} MiB, "
            f"{free >> 20} MiB are free"
        )
    inode_count = usage.inodes + writable_bytes // _BYTES_PER_INODE
    image.unlink(missing_ok=True)
    result = await trio.run_process(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            str(BLOCK),
            "-N",
            str(inode_count),
            "-m",
            "0",
            "-L",
            "cube-rootfs",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            str(source),
            str(image),
            f"{size // 1024}k",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if result.returncode != 0:
        image.unlink(missing_ok=True)
        detail = (result.stderr or result.stdout).decode(errors="replace").strip()[-500:]
        raise Ext4Error(f"mkfs.ext4 failed (exit {result.returncode}): {detail}")
    return size
