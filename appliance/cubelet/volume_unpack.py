"""Taking apart the tar a guest streams of its mounted volume (cubelet/volume_mounts.py): untrusted
input, unpacked into a fresh tree with no-follow operations only (`templates/untrusted_tree.Tree`)
and swapped in for the volume's files."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

from appliance.templates.untrusted_tree import Tree, fd_chmod, fd_chown, fd_set_times, join_path, split_path

DATA_DIR = "data"  # a volume's files
INCOMING_DIR = "incoming"  # the tree being unpacked from the guest's tar
OLD_DIR = "data.old"  # the tree it replaces, while it is removed


def unpack_volume(archive: Path, volume_dir: Path, cap_bytes: int) -> list[str]:
    """Replace `volume_dir/data` with the tree in `archive`; the names left out (over the cap, not
    a directory, file or link, or a path leaving the tree)."""
    incoming, old = volume_dir / INCOMING_DIR, volume_dir / OLD_DIR
    for leftover in (incoming, old):
        shutil.rmtree(leftover, ignore_errors=True)
    incoming.mkdir(mode=0o755)
    try:
        with tarfile.open(archive, mode="r:") as tar, Tree.open(incoming) as tree:
            skipped = _unpack_members(tar, tree, cap_bytes)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    data = volume_dir / DATA_DIR
    os.rename(data, old)
    os.rename(incoming, data)
    shutil.rmtree(old)  # fd-relative, never follows a link
    return skipped


def _unpack_members(tar: tarfile.TarFile, tree: Tree, cap_bytes: int) -> list[str]:
    skipped: list[str] = []
    left = cap_bytes
    # More entries than the image could hold inodes (mke2fs: one per 4 KiB at most) is a
    # fabricated stream: the rest is left out rather than filling the host's inode table.
    entries_left = cap_bytes // 4096 + 1024
    for member in _members(tar):
        entries_left -= 1
        if entries_left < 0:
            skipped.append(member.name)
            continue
        parts = split_path(member.name)
        if ".." in parts or (not parts and not member.isdir()):
            skipped.append(member.name)
            continue
        name = join_path(parts)  # "." for the root
        if parts:
            tree.makedirs(join_path(parts[:-1]))
        if member.isdir():
            if parts:
                tree.mkdir(name, 0o700)
        elif member.isreg() and member.size <= left:
            source = tar.extractfile(member)
            assert source is not None
            tree.write_from(name, source, 0o600)
            left -= member.size
        elif member.issym():
            tree.symlink(name, member.linkname)  # kept as a link; nothing of the host's follows it
        elif member.islnk() and _is_regular(tree, member.linkname):
            tree.link(name, join_path(split_path(member.linkname)))
            continue  # a hardlink shares its inode's metadata
        else:
            skipped.append(member.name)
            continue
        _apply_metadata(tree, name, member)
    return skipped


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    try:
        yield from tar
    except tarfile.ReadError as exc:
        if "empty file" not in str(exc):
            raise


def _is_regular(tree: Tree, path: str) -> bool:
    parts = split_path(path)
    if not parts or ".." in parts:
        return False
    info = tree.lstat(join_path(parts))
    return info is not None and stat.S_ISREG(info.st_mode)


def _apply_metadata(tree: Tree, name: str, member: tarfile.TarInfo) -> None:
    with tree.entry(name) as fd:
        fd_chown(fd, member.uid, member.gid)
        fd_chmod(fd, member.mode & 0o1777)  # no setuid/setgid bits on the host's copy
        try:
            fd_set_times(fd, member.mtime)
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # a symlink's own times: not settable through /proc
                raise
