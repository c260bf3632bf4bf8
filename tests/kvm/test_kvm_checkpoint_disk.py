"""A memory snapshot's own disk (cubelet/checkpoints.py): the sandbox's copy-on-write overlay folded
into a copy of its template image reads exactly as the sandbox's disk did, so the snapshot
needs nothing of its source or its source's template."""

from __future__ import annotations

import os
from pathlib import Path

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
