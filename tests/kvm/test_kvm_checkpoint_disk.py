"""A memory snapshot's own disk (cubelet/checkpoints.py): the sandbox's copy-on-write overlay folded
into a copy of its template image reads exactly as the sandbox's disk did, so the snapshot
needs nothing of its source or its source's template."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest

from appliance.runtime.kvm.base_images import BASE_IMAGES_DIR, link_base, remove_unused
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


def test_snapshots_of_an_image_on_another_filesystem_share_one_copy(tmp_path: Path) -> None:
    """The appliance ISO's template image is on its squashfs, the snapshots on the data disk: no
    hard link can be made (EXDEV), so N memory snapshots of one template link one copy of its
    image (runtime/kvm/base_images.py), not N; the copy goes once no snapshot links it."""
    store = tmp_path / "state" / BASE_IMAGES_DIR
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as other_filesystem:  # tmpfs: another kind
        base = Path(other_filesystem.name)
        with open(base, "wb") as f:
            f.write(os.urandom(MIB))
            f.truncate(8 * MIB)
        with pytest.raises(OSError):
            os.link(base, tmp_path / "probe")  # the case under test: no link across them
        images = [tmp_path / f"snapshot-{n}" / "rootfs.ext4" for n in range(3)]
        for image in images:
            image.parent.mkdir()
            link_base(base, image, store)
        copies = [p for p in store.iterdir()]
        assert len(copies) == 1 and copies[0].stat().st_nlink == 4  # its name and 3 snapshots
        assert {os.stat(image).st_ino for image in images} == {copies[0].stat().st_ino}
        assert images[0].read_bytes() == base.read_bytes()
        assert os.stat(images[0]).st_blocks * 512 < 2 * MIB  # one sparse copy
        # A rebuilt template image is another file: its own copy.
        os.utime(base, ns=(0, 0))
        rebuilt = tmp_path / "after-rebuild.ext4"
        link_base(base, rebuilt, store)
        assert len(list(store.iterdir())) == 2
    # Snapshots deleted: a copy linked by none goes, the other stays.
    for image in images:
        image.unlink()
    assert remove_unused(store) == [copies[0].name]
    (left,) = store.iterdir()
    assert left.stat().st_ino == os.stat(rebuilt).st_ino


def test_an_image_on_the_same_filesystem_is_linked_not_copied(tmp_path: Path) -> None:
    base = tmp_path / "template.ext4"
    base.write_bytes(os.urandom(MIB))
    image = tmp_path / "snapshot.ext4"
    link_base(base, image, tmp_path / BASE_IMAGES_DIR)
    assert os.stat(image).st_ino == base.stat().st_ino
    assert not (tmp_path / BASE_IMAGES_DIR).exists()
