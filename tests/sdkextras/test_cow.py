"""UML COW files merged into a whole image (appliance/runtime/uml/cow.py), on files laid out as the
kernel writes them (arch/um/drivers/cow_user.c, version 3); the real guests' COW files are merged in
test_snapshots_uml.py."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from appliance.runtime.uml.cow import (
    COW_MAGIC,
    HEADER_SIZE,
    CowError,
    CowHeader,
    merge_into_image,
    sparse_copy,
    written_runs,
)

SECTOR = 512
ALIGN = 4096


def write_cow(path: Path, base: Path, sectors: dict[int, bytes]) -> None:
    """A version 3 COW file over `base` holding `sectors` (sector number → its 512 bytes)."""
    size = base.stat().st_size
    header = struct.pack(">IIIQIII", COW_MAGIC, 3, int(base.stat().st_mtime), size, SECTOR, ALIGN, 0)
    header += str(base).encode().ljust(4096, b"\0")
    bitmap = bytearray(-(-(size // SECTOR) // 8))
    for sector in sectors:
        bitmap[sector // 8] |= 1 << (sector % 8)
    bitmap_offset = -(-HEADER_SIZE // ALIGN) * ALIGN
    data_offset = -(-(bitmap_offset + len(bitmap)) // ALIGN) * ALIGN
    with open(path, "wb") as f:
        f.write(header)
        f.seek(bitmap_offset)
        f.write(bitmap)
        for sector, data in sectors.items():
            f.seek(data_offset + sector * SECTOR)
            f.write(data)


def test_written_runs_are_the_set_bits_in_order() -> None:
    assert list(written_runs(bytes([0b00000110, 0xFF, 0x01, 0, 0x80]))) == [(1, 2), (8, 9), (39, 1)]
    assert list(written_runs(bytes([0xFF, 0xFF]))) == [(0, 16)]
    assert list(written_runs(bytes(4))) == []


def test_merge_lays_the_written_sectors_over_a_copy_of_the_base(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.write(b"B" * SECTOR * 4)
        f.truncate(64 * 1024 * 1024)  # a hole after the first sectors, as in an ext4 image
    before = base.read_bytes()[: SECTOR * 4]
    cow = tmp_path / "disk.cow"
    written = {1: b"x" * SECTOR, 2: b"y" * SECTOR, 70_000: b"z" * SECTOR, 131_071: b"e" * SECTOR}
    write_cow(cow, base, written)
    header = CowHeader.read(os.open(cow, os.O_RDONLY))
    assert (header.size, header.backing_file) == (base.stat().st_size, str(base))

    image = tmp_path / "snapshot.img"
    laid = merge_into_image(cow, base, image)

    assert laid == len(written) * SECTOR
    data = image.read_bytes()
    assert len(data) == base.stat().st_size
    assert data[:SECTOR] == b"B" * SECTOR and data[3 * SECTOR : 4 * SECTOR] == b"B" * SECTOR
    for sector, content in written.items():
        assert data[sector * SECTOR : (sector + 1) * SECTOR] == content
    assert data[4 * SECTOR : 70_000 * SECTOR] == bytes(70_000 * SECTOR - 4 * SECTOR)
    assert base.read_bytes()[: SECTOR * 4] == before  # the base is untouched
    assert image.stat().st_blocks * 512 < 1024 * 1024  # holes stay holes


def test_a_cow_file_for_another_size_or_not_a_cow_file_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"B" * SECTOR * 16)
    other = tmp_path / "other.img"
    other.write_bytes(b"O" * SECTOR * 32)
    cow = tmp_path / "disk.cow"
    write_cow(cow, base, {0: b"x" * SECTOR})
    with pytest.raises(CowError, match="not the COW file's base"):
        merge_into_image(cow, other, tmp_path / "out1.img")
    junk = tmp_path / "junk.cow"
    junk.write_bytes(b"\0" * 8192)
    with pytest.raises(CowError, match="not a version 3"):
        merge_into_image(junk, base, tmp_path / "out2.img")


def test_a_symlink_in_place_of_a_disk_is_not_followed(tmp_path: Path) -> None:
    """A sandbox's directory is its uid's: a disk file swapped for a link to a host file copies nothing."""
    secret = tmp_path / "host-secret"
    secret.write_text("host data")
    planted = tmp_path / "disk.cow"
    planted.symlink_to(secret)
    with pytest.raises(OSError):
        sparse_copy(planted, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    target_link = tmp_path / "out"
    target_link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        sparse_copy(secret, target_link)
    assert not (tmp_path / "elsewhere").exists()
