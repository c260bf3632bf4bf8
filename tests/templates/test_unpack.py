"""Layer application edge cases: paths leaving the rootfs, whiteouts of trees, opaque order, bad data."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from registry_world import Entry, compress, layer_tar

from appliance.templates.manifests import DigestMismatch
from appliance.templates.unpack import UnpackError, apply_layer
from appliance.templates.untrusted_tree import NotRegularFile, Tree


def write_layer(
    directory: Path, name: str, entries: list[Entry], compression: str = "gzip"
) -> tuple[Path, str]:
    tar = layer_tar(entries)
    path = directory / name
    path.write_bytes(compress(tar, compression))
    return path, "sha256:" + hashlib.sha256(tar).hexdigest()


@pytest.fixture
def rootfs(scratch: Path) -> Path:
    path = scratch / "rootfs"
    path.mkdir()
    return path


def test_tree_lookups_clamp_dotdot_and_absolute_symlinks_to_the_root(rootfs: Path) -> None:
    (rootfs / "etc").mkdir()
    (rootfs / "etc/passwd").write_text("inside")
    (rootfs / "abs").symlink_to("/etc")
    (rootfs / "up").symlink_to("../../../../..")
    with Tree.open(rootfs) as tree:
        for path in ("../../etc/passwd", "abs/passwd", "up/etc/passwd", "/up/up/abs/passwd"):
            assert tree.read_text(path) == "inside", path
        tree.write_bytes("up/abs/new", b"made")
        assert tree.lstat("abs") is not None and tree.is_dir("abs") and not tree.is_dir("abs", follow=False)
    assert (rootfs / "etc/new").read_bytes() == b"made"


@pytest.mark.root
def test_tree_never_opens_what_is_not_a_regular_file(rootfs: Path) -> None:
    """A device node an image plants is a live host device: only an O_PATH fd may touch it."""
    os.mknod(rootfs / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # /dev/zero
    os.mkfifo(rootfs / "fifo")
    (rootfs / "link").symlink_to("zero")
    with Tree.open(rootfs) as tree:
        for name in ("zero", "fifo", "link"):
            assert tree.read_bytes(name) is None, name
        with pytest.raises(NotRegularFile):
            tree.open_regular("zero", os.O_WRONLY)


@pytest.mark.root
def test_tree_makedirs_creates_a_dangling_links_target_inside(rootfs: Path) -> None:
    (rootfs / "opt").symlink_to("/elsewhere/opt")
    (rootfs / "up").symlink_to("../../../../../../srv")
    with Tree.open(rootfs) as tree:
        tree.makedirs("/opt/app/bin")
        tree.makedirs("/up/data")
        assert not tree.crosses_symlink("/elsewhere/opt/app") and tree.crosses_symlink("/opt/app")
    assert (rootfs / "elsewhere/opt/app/bin").is_dir() and (rootfs / "srv/data").is_dir()
    assert (rootfs / "opt").is_symlink()


@pytest.mark.root
def test_whiteout_of_a_directory_removes_the_tree_and_opaque_keeps_same_layer_entries(
    scratch: Path, rootfs: Path
) -> None:
    lower, lower_id = write_layer(
        scratch,
        "lower",
        [
            Entry("tree", "dir", mode=0o755),
            Entry("tree/a/b/c.txt", data=b"c"),
            Entry("dir", "dir", mode=0o755),
            Entry("dir/old.txt", data=b"old"),
            Entry("dir/sub/old2.txt", data=b"o"),
        ],
    )
    upper, upper_id = write_layer(
        scratch,
        "upper",
        [
            Entry(".wh.tree"),
            Entry("dir/sub", "dir", mode=0o700),
            Entry("dir/sub/new.txt", data=b"new"),
            Entry("dir/.wh..wh..opq"),  # after entries of the same layer: those stay
        ],
        "zstd",
    )
    apply_layer(rootfs, lower, lower_id, "lower")
    apply_layer(rootfs, upper, upper_id, "upper")
    assert not (rootfs / "tree").exists()
    assert sorted(p.relative_to(rootfs).as_posix() for p in (rootfs / "dir").rglob("*")) == [
        "dir/sub",
        "dir/sub/new.txt",
    ]
    assert (rootfs / "dir/sub").stat().st_mode & 0o777 == 0o700


def test_hardlink_outside_the_rootfs_is_clamped(scratch: Path, rootfs: Path) -> None:
    layer, diff_id = write_layer(scratch, "layer", [Entry("link", "hardlink", link="../../../../etc/passwd")])
    with pytest.raises(UnpackError, match="points at missing"):
        apply_layer(rootfs, layer, diff_id, "layer")


@pytest.mark.root
def test_content_that_does_not_match_the_diff_id_is_refused(scratch: Path, rootfs: Path) -> None:
    layer, _ = write_layer(scratch, "layer", [Entry("a.txt", data=b"a")], "none")
    with pytest.raises(DigestMismatch, match="the image config says sha256:0000"):
        apply_layer(rootfs, layer, "sha256:" + "0" * 64, "layer 1")


def test_broken_zstd_stream_is_an_unpack_error(scratch: Path, rootfs: Path) -> None:
    layer, diff_id = write_layer(scratch, "layer", [Entry("a.txt", data=b"a" * 10000)], "zstd")
    data = layer.read_bytes()
    layer.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnpackError):
        apply_layer(rootfs, layer, diff_id, "layer 1")
