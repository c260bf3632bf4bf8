"""Apply image layers to a directory the way a container runtime does.

Layers are applied in order. `.wh.NAME` deletes NAME from the layers below;
`.wh..wh..opq` in a directory hides everything the layers below put there.
Ownership, modes, xattrs, hardlinks, symlinks, device nodes and fifos are
kept (the service runs as root). Layer content is untrusted: the tree is only
touched through `untrusted_tree` (paths resolved by the kernel inside the root,
as the guest will see them), so a layer cannot reach outside the rootfs through
`..`, an absolute name, a planted symlink or a hardlink. Decompressed content
counts against a size budget. Blocking work; callers run it in a thread.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import IO, BinaryIO, cast

from appliance.templates.limits import SizeBudget, SizeLimitExceeded
from appliance.templates.manifests import DigestMismatch, ManifestError
from appliance.templates.untrusted_tree import (
    Tree,
    fd_chmod,
    fd_chown,
    fd_set_times,
    fd_set_xattr,
    join_path,
    split_path,
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Which directory entries a layer wrote: (device, inode of the directory, name).
Written = set[tuple[int, int, str]]


class UnpackError(ManifestError):
    pass


class _HashingReader:
    """Hashes what tarfile reads, to check the uncompressed layer against its diff_id, and counts it
    against the budget."""

    def __init__(self, raw: IO[bytes], budget: SizeBudget | None) -> None:
        self._raw = raw
        self._budget = budget
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if self._budget is not None:
            self._budget.spend(len(data))
        self.hasher.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _hide_lower_entries(tree: Tree, directory: str, written: Written) -> None:
    """Opaque directory: drop everything in it that this layer did not write itself."""
    if not tree.is_dir(directory, follow=False):
        return
    for name in tree.listdir(directory):
        child = f"{directory}/{name}" if directory else name
        if tree.identity(child) not in written:
            tree.remove(child)
        elif tree.is_dir(child, follow=False):
            _hide_lower_entries(tree, child, written)


def _apply_metadata(tree: Tree, name: str, member: tarfile.TarInfo) -> None:
    with tree.entry(name) as fd:
        fd_chown(fd, member.uid, member.gid)
        for key, value in member.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                xattr = key[len("SCHILY.xattr.") :]
                try:
                    # tarfile decodes PAX values with surrogateescape: encode back to the raw bytes.
                    fd_set_xattr(fd, xattr, value.encode("utf-8", "surrogateescape"))
                except OSError as exc:
                    if not member.issym():  # Linux refuses user.* xattrs on symlinks; nothing reads them
                        raise UnpackError(f"cannot set xattr {xattr} on {member.name!r}: {exc}") from exc
        fd_chmod(fd, member.mode & 0o7777)  # after chown, which clears setuid/setgid bits
        fd_set_times(fd, member.mtime)


def _create_entry(tar: tarfile.TarFile, member: tarfile.TarInfo, tree: Tree, name: str) -> None:
    if member.isdir():
        tree.mkdir(name, 0o700)  # its own mode comes with the metadata
    elif member.isreg():
        source = tar.extractfile(member)
        assert source is not None
        tree.write_from(name, source, 0o600)
    elif member.issym():
        tree.symlink(name, member.linkname)
    elif member.ischr() or member.isblk():
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        tree.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor))
    elif member.isfifo():
        tree.mknod(name, stat.S_IFIFO | 0o600)
    else:
        raise UnpackError(f"unsupported tar entry type {member.type!r} for {member.name!r}")


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, tree: Tree, written: Written) -> None:
    parts = split_path(member.name)
    base = parts[-1] if parts else ""
    if base == OPAQUE_MARKER:
        _hide_lower_entries(tree, "/".join(parts[:-1]), written)
        return
    if base.startswith(WHITEOUT_PREFIX):
        tree.remove(join_path([*parts[:-1], base[len(WHITEOUT_PREFIX) :]]))
        return
    if not parts:  # the root directory itself
        if member.isdir():
            _apply_metadata(tree, "/", member)
        return
    if base == "..":
        raise UnpackError(f"tar entry {member.name!r} names no file")
    name = join_path(parts)
    tree.makedirs(join_path(parts[:-1]))
    existing = tree.lstat(name)
    if not (member.isdir() and existing is not None and stat.S_ISDIR(existing.st_mode)):
        tree.remove(name)
    if member.islnk():
        if not tree.exists(member.linkname):
            raise UnpackError(f"hardlink {member.name!r} points at missing {member.linkname!r}")
        tree.link(name, member.linkname)
        written.add(tree.identity(name))
        return  # a hardlink shares its inode's metadata
    _create_entry(tar, member, tree, name)
    written.add(tree.identity(name))
    _apply_metadata(tree, name, member)


def _open_decompressed(source: BinaryIO) -> tuple[IO[bytes], subprocess.Popen[bytes] | None]:
    magic = os.pread(source.fileno(), 4, 0)  # not through the buffer: zstd reads the fd itself
    if magic.startswith(_GZIP_MAGIC):
        return cast(IO[bytes], gzip.GzipFile(fileobj=source, mode="rb")), None
    if magic == _ZSTD_MAGIC:
        # Debian's zstd binary: python3-zstandard is not on every host.
        process = subprocess.Popen(["zstd", "-d", "-c", "-q"], stdin=source, stdout=subprocess.PIPE)
        assert process.stdout is not None
        return process.stdout, process
    return source, None


def apply_layer(
    root: Path, blob: Path, diff_id: str | None, what: str, budget: SizeBudget | None = None
) -> None:
    """Apply one layer (gzip, zstd or plain tar) to the directory `root`, checking the uncompressed
    content."""
    with Tree.open(root) as tree, blob.open("rb") as source:
        apply_layer_to(tree, source, diff_id, what, budget)


def apply_layer_to(
    tree: Tree, source: BinaryIO, diff_id: str | None, what: str, budget: SizeBudget | None = None
) -> None:
    """Apply the layer read from `source` (a seekable file) to `tree`."""
    stream, process = _open_decompressed(source)
    reader = _HashingReader(stream, budget)
    written: Written = set()
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                _extract_member(tar, member, tree, written)
        reader.drain()
    except SizeLimitExceeded as exc:
        raise UnpackError(f"{what}: {exc}") from exc
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
        raise UnpackError(f"{what}: cannot unpack: {exc}") from exc
    finally:
        stream.close()
        if process is not None:
            process.wait()
    if process is not None and process.returncode != 0:
        raise UnpackError(f"{what}: zstd could not decompress the layer (exit {process.returncode})")
    actual = "sha256:" + reader.hasher.hexdigest()
    if diff_id is not None and actual != diff_id:
        raise DigestMismatch(
            f"{what}: uncompressed content has digest {actual}, the image config says {diff_id}"
        )
