"""Apply image layers to a directory the way a container runtime does.

Layers are applied in order. `.wh.NAME` deletes NAME from the layers below;
`.wh..wh..opq` in a directory hides everything the layers below put there.
Ownership, modes, xattrs, hardlinks, symlinks, device nodes and fifos are
kept (the service runs as root). Layer content is untrusted: every path is
resolved inside the root, following symlinks as the guest would see them, so
a layer cannot write outside the rootfs through `..` or a planted symlink.
Blocking work; callers run it in a thread.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO, cast

from appliance.templates.manifests import DigestMismatch, ManifestError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_SYMLINK_HOPS = 40


class UnpackError(ManifestError):
    pass


class _HashingReader:
    """Hashes what tarfile reads, to check the uncompressed layer against its diff_id."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.hasher.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def resolve_in_root(root: Path, name: str) -> Path:
    """The host path of `name` inside `root`: parent symlinks followed, clamped to root; the last
    component is not followed (it is what gets created or replaced)."""
    pending = [p for p in reversed(PurePosixPath(name).parts) if p not in ("/", "", ".")]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if pending and candidate.is_symlink():
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                raise UnpackError(f"too many levels of symbolic links resolving {name!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending.extend(p for p in reversed(PurePosixPath(target).parts) if p not in ("/", "", "."))
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _hide_lower_entries(directory: Path, written: set[Path]) -> None:
    """Opaque directory: drop everything in it that this layer did not write itself."""
    if not directory.is_dir() or directory.is_symlink():
        return
    for entry in os.scandir(directory):
        path = Path(entry.path)
        if path not in written:
            _remove(path)
        elif entry.is_dir(follow_symlinks=False):
            _hide_lower_entries(path, written)


def _ensure_parent(path: Path, root: Path) -> None:
    parent = path.parent
    if parent != root and not parent.is_dir():
        if parent.is_symlink() or parent.exists():
            parent.unlink()  # a file where the layer expects a directory
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)


def _apply_metadata(path: Path, member: tarfile.TarInfo) -> None:
    os.lchown(path, member.uid, member.gid)
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :]
            try:
                # tarfile decodes PAX values with surrogateescape: encode back to the raw bytes.
                os.setxattr(path, name, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
            except OSError as exc:
                if not member.issym():  # Linux refuses user.* xattrs on symlinks; nothing reads them
                    raise UnpackError(f"cannot set xattr {name} on {member.name!r}: {exc}") from exc
    if not member.issym():
        os.chmod(path, member.mode)  # after chown, which clears setuid/setgid bits
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, written: set[Path]) -> None:
    name = member.name
    base = PurePosixPath(name).name
    if base == OPAQUE_MARKER:
        _hide_lower_entries(resolve_in_root(root, str(PurePosixPath(name).parent)), written)
        return
    if base.startswith(WHITEOUT_PREFIX):
        _remove(resolve_in_root(root, str(PurePosixPath(name).parent / base[len(WHITEOUT_PREFIX) :])))
        return
    target = resolve_in_root(root, name)
    if target == root:
        if member.isdir():
            _apply_metadata(root, member)
        return
    _ensure_parent(target, root)
    existing_dir = target.is_dir() and not target.is_symlink()
    if not (member.isdir() and existing_dir):
        _remove(target)
    if member.isdir():
        target.mkdir(exist_ok=True)
    elif member.isreg():
        source = tar.extractfile(member)
        assert source is not None
        with target.open("wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    elif member.issym():
        os.symlink(member.linkname, target)
    elif member.islnk():
        link_source = resolve_in_root(root, member.linkname)
        if not link_source.exists() and not link_source.is_symlink():
            raise UnpackError(f"hardlink {name!r} points at missing {member.linkname!r}")
        os.link(link_source, target, follow_symlinks=False)
        written.add(target)
        return  # a hardlink shares its inode's metadata
    elif member.ischr() or member.isblk():
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(target, kind | (member.mode & 0o7777), os.makedev(member.devmajor, member.devminor))
    elif member.isfifo():
        os.mkfifo(target, member.mode & 0o7777)
    else:
        raise UnpackError(f"unsupported tar entry type {member.type!r} for {name!r}")
    written.add(target)
    _apply_metadata(target, member)


def _open_decompressed(blob: Path) -> tuple[IO[bytes], subprocess.Popen[bytes] | None]:
    with blob.open("rb") as f:
        magic = f.read(4)
    if magic.startswith(_GZIP_MAGIC):
        return cast(IO[bytes], gzip.open(blob, "rb")), None
    if magic == _ZSTD_MAGIC:
        # Debian's zstd binary: python3-zstandard is not on every host.
        process = subprocess.Popen(["zstd", "-d", "-c", "-q", str(blob)], stdout=subprocess.PIPE)
        assert process.stdout is not None
        return process.stdout, process
    return blob.open("rb"), None


def apply_layer(root: Path, blob: Path, diff_id: str | None, what: str) -> None:
    """Apply one layer (gzip, zstd or plain tar) to `root`, checking the uncompressed content."""
    stream, process = _open_decompressed(blob)
    reader = _HashingReader(stream)
    written: set[Path] = set()
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                _extract_member(tar, member, root, written)
        reader.drain()
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
