"""A memory snapshot's own disk (cubelet/checkpoints.py): the sandbox's copy-on-write overlay folded
into a copy of its template image reads exactly as the sandbox's disk did, so the snapshot
needs nothing of its source or its source's template."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest

from appliance.runtime.sparse import fold_overlay, sparse_copy
from appliance.runtime.virtio.blk.disk import BLOCK, CowDisk

MIB = 1 << 20


def test_a_folded_overlay_reads_as_the_disk_did(tmp_path: Path) -> None:
    base = tmp_path / "template.ext4"
    with open(base, "wb") as f:
        f.write(os.urandom(MIB))
        f.truncate(4 * MIB)  # the rest a hole, as in a sparse image
    template_bytes = base.read_bytes()
    disk = CowDisk(tmp_path / "overlay", base=base)
    disk.write(3 * BLOCK + 100, b"a" * 5000)  # partial blocks: copied up from the base first
    disk.write(2 * MIB, b"b" * BLOCK)  # over the base's hole
    disk.write(4 * MIB - BLOCK, b"c" * BLOCK)  # the last block
    disk.discard(0, BLOCK)  # reads as the base again
    disk.flush()
    expected = disk.read(0, 4 * MIB)
    disk.close()
    image = tmp_path / "snapshot.ext4"
    sparse_copy(base, image)
    written = fold_overlay(tmp_path / "overlay", image)
    assert image.read_bytes() == expected
    assert written == 4 * BLOCK  # only the written blocks, not the whole disk
    assert base.read_bytes() == template_bytes  # the template image is untouched


def test_an_empty_overlay_leaves_the_image_as_its_base(tmp_path: Path) -> None:
    base = tmp_path / "template.ext4"
    base.write_bytes(os.urandom(2 * MIB))
    CowDisk(tmp_path / "overlay", base=base).close()
    image = tmp_path / "snapshot.ext4"
    sparse_copy(base, image)
    assert fold_overlay(tmp_path / "overlay", image) == 0
    assert image.read_bytes() == base.read_bytes()


def test_an_image_on_another_kind_of_filesystem_is_copied_hole_for_hole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The appliance's shipped template image is on its boot medium's squashfs, a snapshot's copy
    on the data disk: copy_file_range refuses files on filesystems of two kinds (EXDEV), and the
    copy is then made by reads and writes, holes kept."""
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as other_filesystem:
        base = Path(other_filesystem.name)
        with open(base, "wb") as f:
            f.write(os.urandom(MIB))
            f.seek(3 * MIB)
            f.write(os.urandom(5000))
        real = os.copy_file_range

        def refused_across_filesystems(source: int, target: int, *args: int) -> int:
            if os.fstat(source).st_dev != os.fstat(target).st_dev:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
            return real(source, target, *args)

        monkeypatch.setattr(os, "copy_file_range", refused_across_filesystems)
        image = tmp_path / "snapshot.ext4"
        sparse_copy(base, image)
        assert image.read_bytes() == base.read_bytes()
        assert os.stat(image).st_blocks * 512 < 2 * MIB  # the hole stayed a hole
