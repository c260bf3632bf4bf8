"""Directory trees whose content is untrusted (image rootfs, build contexts, build stages), touched
only through file descriptors the kernel resolved inside the tree.

A template build runs as root on the host over trees an API caller controls: image layers, an
uploaded context, whatever a RUN step left behind. Any path string into such a tree may cross a
symlink the caller planted (`etc -> /etc`, `tmp -> /`), so nothing here ever hands a joined path
to the host's path lookup. Instead:

- every lookup is `openat2(root_fd, path, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: the kernel
  follows symlinks as the guest would see them, with `/` and `..` clamped to the tree's root;
- an operation on an entry itself (create, remove, chown, chmod, xattrs, times) runs on its parent
  directory's fd with the final name (`*at` calls that do not follow it), or on an `O_PATH |
  O_NOFOLLOW` fd of the entry through `/proc/self/fd/N`, which acts on that inode and never
  follows it further;
- content is read or written only after an `O_PATH` fd says the entry is a regular file: opening a
  device node that an image planted would open the host's device.

Nothing else touches an untrusted tree: the builders use these operations, not `pathlib`. Blocking;
callers run it in a thread.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, BinaryIO

_SYS_OPENAT2 = 437  # x86_64
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
_IN_TREE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
_EAGAIN_RETRIES = 16  # RESOLVE_IN_ROOT answers EAGAIN when a rename races a `..`: try again
_CHUNK = 1 << 20
_GLOB_CHARS = frozenset("*?[")
_MAX_SYMLINK_HOPS = 40
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = _IN_TREE) -> int:
    """The raw syscall (glibc has no wrapper); returns an O_CLOEXEC fd or raises OSError."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, resolve)
    encoded = os.fsencode(path)
    for _ in range(_EAGAIN_RETRIES):
        fd = _libc.syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(encoded),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        error = ctypes.get_errno()
        if error not in (errno.EAGAIN, errno.EINTR):
            raise OSError(error, os.strerror(error), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def split_path(path: str) -> list[str]:
    """A guest path's components, without the empty and `.` ones (`..` stays: the kernel clamps it)."""
    return [part for part in path.split("/") if part not in ("", ".")]


def join_path(parts: list[str]) -> str:
    return "/".join(parts) or "."


class NotRegularFile(OSError):
    pass


class Tree:
    """One untrusted tree, held by an O_PATH fd of its root. Paths are guest paths (`/etc/passwd`,
    `etc/passwd` and `./etc/passwd` are the same entry). Use as a context manager."""

    def __init__(self, fd: int, label: str) -> None:
        self.fd = fd
        self.label = label  # for messages: the host path of the root

    @classmethod
    def open(cls, root: Path) -> Tree:
        """`root` itself is a trusted path (a directory the service made)."""
        return cls(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), str(root))

    def subtree(self, path: str) -> Tree:
        """The directory `path` (followed inside this tree) as a tree of its own: `..` and absolute
        symlinks below it stay below it."""
        return Tree(self.open_fd(path, os.O_PATH | os.O_DIRECTORY), f"{self.label}:{path}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Tree:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # Lookups.

    def open_fd(self, path: str, flags: int, *, follow: bool = True, mode: int = 0, resolve: int = 0) -> int:
        """An fd for `path`; with follow=False a final symlink is not followed (O_NOFOLLOW); `resolve`:
        more RESOLVE_* flags."""
        flags |= 0 if follow else os.O_NOFOLLOW
        return openat2(self.fd, join_path(split_path(path)), flags, mode, _IN_TREE | resolve)

    @contextmanager
    def entry(self, path: str, *, follow: bool = False) -> Iterator[int]:
        """An O_PATH fd pinning the entry `path` (the link itself unless follow)."""
        fd = self.open_fd(path, os.O_PATH, follow=follow)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def parent(self, path: str) -> Iterator[tuple[int, str]]:
        """(fd of the directory holding `path`, its final name): for the `*at` calls that create,
        replace or remove the entry itself without following it."""
        parts = split_path(path)
        if not parts or parts[-1] == "..":
            raise IsADirectoryError(errno.EISDIR, "names a directory, not an entry in one", path)
        fd = openat2(self.fd, join_path(parts[:-1]), os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def lstat(self, path: str) -> os.stat_result | None:
        """The entry's own stat (a symlink is not followed), None if it does not exist."""
        try:
            with self.entry(path) as fd:
                return os.fstat(fd)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def stat(self, path: str) -> os.stat_result | None:
        """Following symlinks inside the tree; None if it does not resolve to anything."""
        try:
            with self.entry(path, follow=True) as fd:
                return os.fstat(fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None
            raise

    def crosses_symlink(self, path: str) -> bool:
        """Whether resolving `path` (its last component too) follows a symlink."""
        try:
            fd = self.open_fd(path, os.O_PATH, resolve=RESOLVE_NO_SYMLINKS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return True
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise
        os.close(fd)
        return False

    def exists(self, path: str) -> bool:
        return self.lstat(path) is not None

    def is_dir(self, path: str, *, follow: bool = True) -> bool:
        info = self.stat(path) if follow else self.lstat(path)
        return info is not None and stat.S_ISDIR(info.st_mode)

    def readlink(self, path: str) -> str:
        with self.parent(path) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def listdir(self, path: str = "/") -> list[str]:
        fd = self.open_fd(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def glob(self, pattern: str) -> list[str]:
        """Entries matching a glob (`*?[` per component), intermediate directories followed inside
        the tree; relative guest paths, sorted."""
        found = [""]
        for part in split_path(pattern):
            following: list[str] = []
            for base in found:
                candidates = (
                    [n for n in self._safe_listdir(base or ".") if fnmatch.fnmatchcase(n, part)]
                    if any(c in _GLOB_CHARS for c in part)
                    else [part]
                )
                for name in candidates:
                    if name.startswith(".") and not part.startswith(".") and part != name:
                        continue  # like glob: `*` does not match dotfiles
                    child = f"{base}/{name}" if base else name
                    if self.exists(child):
                        following.append(child)
            found = following
        return sorted(p for p in found if p)

    def _safe_listdir(self, path: str) -> list[str]:
        try:
            return self.listdir(path)
        except (NotADirectoryError, FileNotFoundError):
            return []

    # Content.

    def open_regular(self, path: str, flags: int = os.O_RDONLY, *, follow: bool = True) -> int:
        """An fd for the regular file `path`, opened only after an O_PATH fd showed it is one."""
        with self.entry(path, follow=follow) as fd:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NotRegularFile(errno.EINVAL, "not a regular file", path)
            return os.open(_proc(fd), flags | os.O_CLOEXEC)

    def read_bytes(self, path: str, limit: int = 16 << 20) -> bytes | None:
        """A regular file's content (followed inside the tree), None if there is none."""
        try:
            fd = self.open_regular(path)
        except (FileNotFoundError, NotADirectoryError, NotRegularFile):
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"more than {limit} bytes", path)
        return data

    def read_text(self, path: str) -> str | None:
        data = self.read_bytes(path)
        return None if data is None else data.decode(errors="replace")

    @contextmanager
    def reader(self, path: str, *, follow: bool = True) -> Iterator[BinaryIO]:
        with os.fdopen(self.open_regular(path, follow=follow), "rb") as f:
            yield f

    @contextmanager
    def create(self, path: str, mode: int = 0o644) -> Iterator[BinaryIO]:
        """A new regular file at `path`, replacing whatever entry was there (never followed)."""
        with self.parent(path) as (parent, name):
            _remove_at(parent, name)
            fd = os.open(name, _NEW_FILE, mode, dir_fd=parent)
        os.fchmod(fd, mode)  # not the umask's
        with os.fdopen(fd, "wb") as out:
            yield out

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        with self.create(path, mode) as out:
            out.write(data)

    def write_from(self, path: str, source: IO[bytes], mode: int = 0o644) -> None:
        with self.create(path, mode) as out:
            shutil.copyfileobj(source, out, _CHUNK)

    def replace_file(self, path: str, data: bytes, default_mode: int = 0o644) -> None:
        """Give the file `path` new content as a new inode renamed over it (never writing into the
        old one, which may be hardlinked elsewhere), keeping its owner and mode."""
        old = self.lstat(path)
        keep = old is not None and stat.S_ISREG(old.st_mode)
        with self.parent(path) as (parent, name):
            temporary = f".{name}.cube-new"
            _remove_at(parent, temporary)
            fd = os.open(temporary, _NEW_FILE, 0o600, dir_fd=parent)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                if keep and old is not None:
                    os.fchown(fd, old.st_uid, old.st_gid)
                os.fchmod(fd, stat.S_IMODE(old.st_mode) if keep and old is not None else default_mode)
            if old is not None and stat.S_ISDIR(old.st_mode):
                shutil.rmtree(name, dir_fd=parent)
            os.rename(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)

    # Creating and removing entries (the final name is never followed).

    def remove(self, path: str) -> None:
        """Delete the entry (a directory with everything in it); nothing if it is not there."""
        try:
            with self.parent(path) as (parent, name):
                _remove_at(parent, name)
        except (FileNotFoundError, NotADirectoryError):
            pass

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """A directory at `path` unless there is one (a symlink to one, inside the tree, counts);
        anything else there is replaced."""
        if self.is_dir(path):
            return
        with self.parent(path) as (parent, name):
            _remove_at(parent, name)
            os.mkdir(name, mode, dir_fd=parent)
        self.chmod(path, mode)  # not the umask's

    def makedirs(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0, _hops: int = 0) -> None:
        """mkdir -p inside the tree: new directories get uid:gid and `mode`. A dangling symlink on
        the way gets its target made (inside the tree, as a container runtime does); any other entry
        that is not a directory where one is needed is replaced."""
        if self.is_dir(path):
            return  # the common case: one lookup
        parts = split_path(path)
        for end in range(1, len(parts) + 1):
            prefix = join_path(parts[:end])
            if parts[end - 1] == ".." or self.is_dir(prefix):
                continue
            info = self.lstat(prefix)
            if info is not None and stat.S_ISLNK(info.st_mode) and _hops < _MAX_SYMLINK_HOPS:
                target = self.readlink(prefix)
                base = [] if target.startswith("/") else parts[: end - 1]
                self.makedirs(join_path(base + split_path(target)), mode, uid, gid, _hops + 1)
                if self.is_dir(prefix):
                    continue
            self.mkdir(prefix, mode)
            self.chown(prefix, uid, gid)

    def symlink(self, path: str, target: str) -> None:
        with self.parent(path) as (parent, name):
            _remove_at(parent, name)
            os.symlink(target, name, dir_fd=parent)

    def link(self, path: str, source: str) -> None:
        """A hardlink at `path` to the entry `source` of the same tree (itself, not followed)."""
        with self.parent(source) as (source_parent, source_name):
            with self.parent(path) as (parent, name):
                _remove_at(parent, name)
                os.link(source_name, name, src_dir_fd=source_parent, dst_dir_fd=parent, follow_symlinks=False)

    def mknod(self, path: str, mode: int, device: int = 0) -> None:
        """A device node or fifo (`mode` carries the type bits)."""
        with self.parent(path) as (parent, name):
            _remove_at(parent, name)
            os.mknod(name, mode, device, dir_fd=parent)

    # Metadata of an entry (never followed unless follow=True, and then only inside the tree).

    def chown(self, path: str, uid: int, gid: int, *, follow: bool = False) -> None:
        with self.entry(path, follow=follow) as fd:
            fd_chown(fd, uid, gid)

    def chmod(self, path: str, mode: int, *, follow: bool = False) -> None:
        with self.entry(path, follow=follow) as fd:
            fd_chmod(fd, mode)

    def identity(self, path: str) -> tuple[int, int, str]:
        """Which directory entry `path` is: (device, inode of its directory, name)."""
        with self.parent(path) as (parent, name):
            info = os.fstat(parent)
            return info.st_dev, info.st_ino, name


# What to do to an entry pinned by an O_PATH fd (from Tree.entry): through /proc/self/fd/N, which
# names that inode itself (a symlink is acted on, not followed).


def fd_chown(fd: int, uid: int, gid: int) -> None:
    os.chown(_proc(fd), uid, gid)


def fd_chmod(fd: int, mode: int) -> None:
    """Linux keeps no mode on symlinks: nothing for one."""
    if not stat.S_ISLNK(os.fstat(fd).st_mode):
        os.chmod(_proc(fd), mode)


def fd_set_times(fd: int, mtime: float) -> None:
    os.utime(_proc(fd), (mtime, mtime))


def fd_set_xattr(fd: int, name: str, value: bytes) -> None:
    os.setxattr(_proc(fd), name, value)


def fd_xattrs(fd: int) -> dict[str, bytes]:
    try:
        return {name: os.getxattr(_proc(fd), name) for name in os.listxattr(_proc(fd))}
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise


def _remove_at(parent: int, name: str) -> None:
    """Remove the entry `name` of the directory fd `parent` (fd-based rmtree for a directory)."""
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(name, dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)
