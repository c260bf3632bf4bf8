"""The Dockerfile build context: upload extraction, COPY sources (selection, hashing, copying).

The context, the rootfs being built and an earlier stage's rootfs are all untrusted trees: every
file operation on them goes through `untrusted_tree` (symlinks resolved inside each tree, never on
the host).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from appliance.templates.dockerfile import DockerfileError
from appliance.templates.dockerignore import IGNORE_FILE, IgnoreRules
from appliance.templates.guest_setup import lookup_ids
from appliance.templates.limits import BuildLimits, SizeBudget
from appliance.templates.unpack import apply_layer_to
from appliance.templates.untrusted_tree import (
    Tree,
    fd_chmod,
    fd_chown,
    fd_set_times,
    fd_set_xattr,
    fd_xattrs,
    join_path,
    split_path,
)

_GLOB_CHARS = frozenset("*?[")
_TAR_HEADER = 512
_MAX_DOCKERFILE_BYTES = 1 << 20
DEFAULT_CONTEXT_BYTES = BuildLimits().context_bytes


def _safe_parts(name: str) -> list[str]:
    if name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"unsafe path {name!r} in the build context")
    return split_path(name)


def _extract_entry(tar: tarfile.TarFile, member: tarfile.TarInfo, tree: Tree, name: str) -> bool:
    """Create the entry; False for what a context does not carry (devices, fifos)."""
    existing = tree.lstat(name)
    if member.isdir():
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            tree.remove(name)
            tree.mkdir(name, 0o700)
    elif member.issym():
        tree.symlink(name, member.linkname)
    elif member.islnk():
        source = join_path(_safe_parts(member.linkname))
        info = tree.lstat(source)
        if (
            tree.crosses_symlink(join_path(split_path(source)[:-1]))
            or info is None
            or not stat.S_ISREG(info.st_mode)
        ):
            raise ValueError(f"hardlink {member.name!r} does not point at an earlier file of the context")
        tree.link(name, source)
    elif member.isfile():
        data = tar.extractfile(member)
        assert data is not None
        tree.write_from(name, data, 0o600)
    else:
        return False
    return True


def extract_context(archive: Path, dest: Path, max_bytes: int = DEFAULT_CONTEXT_BYTES) -> None:
    """Unpack an uploaded build context (a tar, maybe compressed) into the empty directory `dest`:
    files with their modes, directories, symlinks (as links: nothing here follows them), hardlinks
    to earlier files. Refused: absolute names, `..`, names below a symlink, more than `max_bytes`."""
    budget = SizeBudget(max_bytes, "the build context", "build_context_max_size")
    with Tree.open(dest) as tree, tarfile.open(archive) as tar:
        for member in tar:
            budget.spend(_TAR_HEADER + (member.size if member.isfile() else 0))
            parts = _safe_parts(member.name)
            if not parts:
                continue
            parent = join_path(parts[:-1])
            if tree.crosses_symlink(parent):
                raise ValueError(f"{member.name!r} is below a symlink in the build context")
            tree.makedirs(parent)
            name = join_path(parts)
            if _extract_entry(tar, member, tree, name) and not member.issym():
                tree.chmod(name, member.mode & 0o7777)


# Where `cube tpl build` puts a Dockerfile that lives outside the context.
OUTSIDE_DOCKERFILE = ".cube-dockerfile"


def read_context_dockerfile(context: Path, relative: str) -> str:
    """The Dockerfile uploaded inside the context (the CLI's outside-the-context copy is then dropped)."""
    parts = split_path(relative)
    if not parts or relative.startswith("/") or ".." in parts:
        raise ValueError(f"dockerfile_path {relative!r} must be relative to the context")
    with Tree.open(context) as tree:
        data = None if tree.crosses_symlink(relative) else tree.read_bytes(relative, _MAX_DOCKERFILE_BYTES)
        if data is None:
            raise ValueError(f"no Dockerfile {relative!r} in the build context")
        if parts == [OUTSIDE_DOCKERFILE]:
            tree.remove(OUTSIDE_DOCKERFILE)
    return data.decode()


def ignore_rules(context: Tree) -> IgnoreRules:
    return IgnoreRules.parse(context.read_text(IGNORE_FILE) or "")


def _is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARS for c in pattern)


def context_sources(context: Tree, pattern: str, ignore: IgnoreRules, line: int) -> list[str]:
    """Context-relative paths a COPY source names, .dockerignore applied."""
    pattern = posixpath.normpath(pattern).lstrip("/")
    if pattern.startswith(".."):
        raise DockerfileError(line, f"COPY source {pattern!r} is outside the build context")
    if _is_glob(pattern):
        matches = context.glob(pattern)
    else:
        matches = [pattern] if context.exists(pattern) else []
    matches = [m for m in matches if m == "." or not ignore.ignored(m)]
    if not matches:
        raise DockerfileError(
            line, f"COPY source {pattern!r} not found in the build context (or .dockerignore'd)"
        )
    return matches


def walk_context(context: Tree, relative: str, ignore: IgnoreRules) -> list[str]:
    """`relative` and, for a directory, everything below it that is not ignored (ignored
    directories are not entered)."""
    found = [relative]
    if not context.is_dir(relative, follow=False):
        return found
    base = "/".join(split_path(relative))
    for name in context.listdir(relative):
        path = f"{base}/{name}" if base else name
        if not ignore.ignored(path):
            found += walk_context(context, path, ignore)
    return found


def hash_sources(context: Tree, sources: tuple[str, ...], ignore: IgnoreRules) -> str:
    hasher = hashlib.sha256()
    for source in sources:
        for relative in walk_context(context, source, ignore):
            info = context.lstat(relative)
            if info is None:
                continue
            hasher.update(f"{relative}\0{info.st_mode:o}\0".encode())
            if stat.S_ISLNK(info.st_mode):
                hasher.update(context.readlink(relative).encode())
            elif stat.S_ISREG(info.st_mode):
                with context.reader(relative, follow=False) as f:
                    while chunk := f.read(1 << 20):
                        hasher.update(chunk)
    return hasher.hexdigest()


def ensure_dir(rootfs: Path, guest_path: str, uid: int = 0, gid: int = 0) -> None:
    """mkdir -p inside the rootfs; new directories get uid:gid and 0755."""
    with Tree.open(rootfs) as tree:
        tree.makedirs(guest_path, 0o755, uid, gid)


@dataclass
class _CopyRules:
    """How entries are copied from one tree to another."""

    owner: tuple[int, int] | None = None  # None: the source's
    chmod: int | None = None  # None: the source's mode
    exact: bool = False  # xattrs, hardlinks among the copied files, device nodes and fifos too (`cp -a`)
    first_copy: dict[tuple[int, int], str] = field(default_factory=dict)  # (dev, ino) -> where it went


def _create_copy(
    source: Tree, src: str, info: os.stat_result, dest: Tree, dst: str, rules: _CopyRules
) -> bool:
    """The entry itself (no metadata); False when it is nothing to copy (sockets; specials unless exact)."""
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        existing = dest.lstat(dst)
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            dest.remove(dst)
            dest.mkdir(dst, 0o700)
    elif stat.S_ISREG(mode):
        with source.reader(src, follow=False) as f:
            dest.write_from(dst, f, 0o600)
    elif stat.S_ISLNK(mode):
        dest.symlink(dst, source.readlink(src))
    elif rules.exact and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
        dest.mknod(dst, stat.S_IFMT(mode) | 0o600, info.st_rdev)
    else:
        return False
    return True


def _copy_metadata(
    source: Tree, src: str, info: os.stat_result, dest: Tree, dst: str, rules: _CopyRules
) -> None:
    with dest.entry(dst) as fd:
        fd_chown(fd, *(rules.owner or (info.st_uid, info.st_gid)))
        if rules.exact:
            with source.entry(src) as source_fd:
                for name, value in fd_xattrs(source_fd).items():
                    try:
                        fd_set_xattr(fd, name, value)
                    except OSError:
                        if not stat.S_ISLNK(info.st_mode):  # Linux refuses user.* xattrs on symlinks
                            raise
        fd_chmod(fd, rules.chmod if rules.chmod is not None else stat.S_IMODE(info.st_mode))
        fd_set_times(fd, info.st_mtime)


def copy_entry(source: Tree, src: str, dest: Tree, dst: str, rules: _CopyRules, recursive: bool) -> None:
    """Copy the entry `src` of one tree to `dst` in another (replacing what is there; a directory
    merges into an existing one), and with `recursive` everything below a directory."""
    info = source.lstat(src)
    if info is None:
        return
    if rules.exact and stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        first = rules.first_copy.get((info.st_dev, info.st_ino))
        if first is not None:
            dest.link(dst, first)
            return
        rules.first_copy[(info.st_dev, info.st_ino)] = dst
    if not _create_copy(source, src, info, dest, dst, rules):
        return
    _copy_metadata(source, src, info, dest, dst, rules)
    if recursive and stat.S_ISDIR(info.st_mode):
        for name in source.listdir(src):
            copy_entry(source, posixpath.join(src, name), dest, posixpath.join(dst, name), rules, True)


def _is_tar_archive(context: Tree, path: str) -> bool:
    info = context.lstat(path)
    if info is None or not stat.S_ISREG(info.st_mode):
        return False
    with context.reader(path, follow=False) as f:
        return tarfile.is_tarfile(f)


def copy_from_context(
    rootfs: Path,
    context: Path,
    keyword: str,
    sources: tuple[str, ...],
    dest: str,
    flags: dict[str, str],
    budget: SizeBudget | None = None,
) -> None:
    """COPY/ADD `sources` (context-relative) to the guest path `dest` (blocking); `budget` bounds what
    ADD unpacks from archives."""
    with Tree.open(rootfs) as root, Tree.open(context) as ctx:
        ignore = ignore_rules(ctx)
        owner = lookup_ids(root, flags["chown"])[:2] if "chown" in flags else (0, 0)
        rules = _CopyRules(owner=owner, chmod=int(flags["chmod"], 8) if "chmod" in flags else None)
        into_directory = dest.endswith("/") or len(sources) > 1 or ctx.is_dir(sources[0]) or root.is_dir(dest)
        for source in sources:
            if keyword == "ADD" and _is_tar_archive(ctx, source):
                # ADD unpacks local archives (tar, tar.gz, tar.zst) into the destination directory.
                root.makedirs(dest)
                with root.subtree(dest) as target, ctx.reader(source, follow=False) as archive:
                    apply_layer_to(target, archive, None, f"ADD {source}", budget)
                continue
            if ctx.is_dir(source, follow=False):
                root.makedirs(dest)
                for relative in walk_context(ctx, source, ignore)[1:]:
                    inner = posixpath.relpath(relative, source)
                    copy_entry(ctx, relative, root, posixpath.join(dest, inner), rules, recursive=False)
                continue
            guest = posixpath.join(dest, posixpath.basename(source)) if into_directory else dest
            root.makedirs(posixpath.dirname(guest.rstrip("/")) or "/")
            copy_entry(ctx, source, root, guest, rules, recursive=False)


def _stage_paths(stage: Tree, sources: tuple[str, ...], line: int) -> list[str]:
    found: list[str] = []
    for source in sources:
        paths = stage.glob(source) if _is_glob(source) else [source] if stage.exists(source) else []
        if not paths:
            raise DockerfileError(line, f"COPY --from: {source!r} does not exist in the source stage")
        found += paths
    return found


def copy_from_stage(
    rootfs: Path, stage_root: Path, sources: tuple[str, ...], dest: str, flags: dict[str, str], line: int
) -> None:
    """COPY --from=<stage>: absolute paths (globs allowed) of an earlier stage's rootfs (blocking).

    Owners, modes, xattrs, hardlinks and device nodes stay as they are in the stage (`cp -a`),
    unless --chown/--chmod say otherwise.
    """
    with Tree.open(stage_root) as stage, Tree.open(rootfs) as root:
        found = _stage_paths(stage, sources, line)
        rules = _CopyRules(
            owner=lookup_ids(root, flags["chown"])[:2] if "chown" in flags else None,
            chmod=int(flags["chmod"], 8) if "chmod" in flags else None,
            exact=True,
        )
        single_file = len(found) == 1 and not stage.is_dir(found[0], follow=False)
        if single_file and not dest.endswith("/") and not root.is_dir(dest):
            root.makedirs(posixpath.dirname(dest.rstrip("/")) or "/")
            copy_entry(stage, found[0], root, dest, rules, recursive=True)
            return
        # A directory source contributes its contents, as in Docker.
        root.makedirs(dest)
        for path in found:
            children = (
                [posixpath.join(path, name) for name in stage.listdir(path)]
                if stage.is_dir(path, follow=False)
                else [path]
            )
            for child in children:
                target = posixpath.join(dest, posixpath.basename(child))
                copy_entry(stage, child, root, target, rules, recursive=True)


def copy_url_download(rootfs: Path, download: Path, name: str, dest: str, flags: dict[str, str]) -> None:
    """ADD <url>: the downloaded file (not unpacked, as Docker) at `dest`, or `dest/<name>` for a
    directory; mode 0600 unless --chmod, as Docker."""
    with Tree.open(rootfs) as root:
        guest = posixpath.join(dest, name) if dest.endswith("/") or root.is_dir(dest) else dest
        root.makedirs(posixpath.dirname(guest.rstrip("/")) or "/")
        uid, gid = lookup_ids(root, flags["chown"])[:2] if "chown" in flags else (0, 0)
        with download.open("rb") as f:
            root.write_from(guest, f, 0o600)
        root.chown(guest, uid, gid)
        root.chmod(guest, int(flags["chmod"], 8) if "chmod" in flags else 0o600)
