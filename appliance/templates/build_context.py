"""The Dockerfile build context: upload extraction, COPY sources (selection, hashing, copying)."""

from __future__ import annotations

import glob
import hashlib
import os
import posixpath
import shutil
import subprocess
import tarfile
from pathlib import Path, PurePosixPath

from appliance.templates.dockerfile import DockerfileError
from appliance.templates.dockerignore import IgnoreRules
from appliance.templates.guest_setup import lookup_ids
from appliance.templates.unpack import apply_layer, resolve_in_root

_GLOB_CHARS = frozenset("*?[")


def extract_context(archive: Path, dest: Path) -> None:
    """Unpack an uploaded build context: files (with modes), directories, symlinks; nothing outside `dest`."""
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if member.name.startswith("/") or ".." in parts:
                raise ValueError(f"unsafe path {member.name!r} in the build context")
            if not parts or parts == (".",):
                continue
            target = dest.joinpath(*parts)
            if target.parent.is_symlink():
                raise ValueError(f"{member.name!r} is below a symlink in the build context")
            target.parent.mkdir(parents=True, exist_ok=True)
            if member.isdir():
                target.mkdir(exist_ok=True)
            elif member.issym():
                os.symlink(member.linkname, target)
                continue
            elif member.isfile():
                source = tar.extractfile(member)
                assert source is not None
                with target.open("wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
            else:
                continue  # devices, fifos, hardlinks have no place in a build context
            os.chmod(target, member.mode & 0o7777)


# Where `cube tpl build` puts a Dockerfile that lives outside the context.
OUTSIDE_DOCKERFILE = ".cube-dockerfile"


def read_context_dockerfile(context: Path, relative: str) -> str:
    """The Dockerfile uploaded inside the context (the CLI's outside-the-context copy is then dropped)."""
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or ".." in parts:
        raise ValueError(f"dockerfile_path {relative!r} must be relative to the context")
    path = context.joinpath(*parts)
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"no Dockerfile {relative!r} in the build context")
    text = path.read_text()
    if relative == OUTSIDE_DOCKERFILE:
        path.unlink()
    return text


def _is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARS for c in pattern)


def context_sources(context: Path, pattern: str, ignore: IgnoreRules, line: int) -> list[str]:
    """Context-relative paths a COPY source names, .dockerignore applied."""
    pattern = posixpath.normpath(pattern).lstrip("/")
    if pattern.startswith(".."):
        raise DockerfileError(line, f"COPY source {pattern!r} is outside the build context")
    if _is_glob(pattern):
        matches = sorted(os.path.relpath(p, context) for p in glob.glob(str(context / pattern)))
    else:
        matches = [pattern] if (context / pattern).exists() or (context / pattern).is_symlink() else []
    matches = [m for m in matches if m == "." or not ignore.ignored(m)]
    if not matches:
        raise DockerfileError(
            line, f"COPY source {pattern!r} not found in the build context (or .dockerignore'd)"
        )
    return matches


def walk_context(context: Path, relative: str, ignore: IgnoreRules) -> list[str]:
    """`relative` and, for a directory, everything below it that is not ignored."""
    root = context / relative
    if root.is_symlink() or not root.is_dir():
        return [relative]
    found = [relative]
    for directory, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.relpath(os.path.join(directory, name), context)
            if not ignore.ignored(path):
                found.append(path)
        dirnames[:] = [
            d for d in dirnames if not ignore.ignored(os.path.relpath(os.path.join(directory, d), context))
        ]
    return found


def hash_sources(context: Path, sources: tuple[str, ...], ignore: IgnoreRules) -> str:
    hasher = hashlib.sha256()
    for source in sources:
        for relative in walk_context(context, source, ignore):
            path = context / relative
            info = path.lstat()
            hasher.update(f"{relative}\0{info.st_mode:o}\0".encode())
            if path.is_symlink():
                hasher.update(os.readlink(path).encode())
            elif path.is_file():
                with path.open("rb") as f:
                    while chunk := f.read(1 << 20):
                        hasher.update(chunk)
    return hasher.hexdigest()


def ensure_dir(rootfs: Path, guest_path: str, uid: int = 0, gid: int = 0) -> Path:
    """mkdir -p inside the rootfs; new directories get uid:gid and 0755."""
    target = resolve_in_root(rootfs, guest_path)
    missing = []
    probe = target
    while probe != rootfs and not probe.is_dir():
        missing.append(probe)
        probe = resolve_in_root(rootfs, str(probe.parent.relative_to(rootfs)))
    for directory in reversed(missing):
        if directory.is_symlink() or directory.exists():
            directory.unlink()
        directory.mkdir(mode=0o755)
        os.chown(directory, uid, gid)
    return target


def _copy_entry(source: Path, target: Path, uid: int, gid: int, chmod: int | None) -> None:
    if target.is_dir() and not target.is_symlink():
        if not source.is_dir() or source.is_symlink():
            shutil.rmtree(target)  # a file replaces a directory
    elif target.exists() or target.is_symlink():
        target.unlink()
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        target.mkdir(exist_ok=True)
        shutil.copystat(source, target)
    else:
        shutil.copy2(source, target)
    os.lchown(target, uid, gid)
    if chmod is not None and not source.is_symlink():
        os.chmod(target, chmod)


def _is_tar_archive(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and tarfile.is_tarfile(path)


def copy_from_context(
    rootfs: Path, context: Path, keyword: str, sources: tuple[str, ...], dest: str, flags: dict[str, str]
) -> None:
    """COPY/ADD `sources` (context-relative) to the guest path `dest` (blocking)."""
    ignore = IgnoreRules.load(context)
    uid, gid = 0, 0
    if "chown" in flags:
        uid, gid, _ = lookup_ids(rootfs, flags["chown"])
    chmod = int(flags["chmod"], 8) if "chmod" in flags else None
    into_directory = (
        dest.endswith("/")
        or len(sources) > 1
        or (context / sources[0]).is_dir()
        or resolve_in_root(rootfs, dest).is_dir()
    )
    for source in sources:
        source_path = context / source
        if keyword == "ADD" and _is_tar_archive(source_path):
            # ADD unpacks local archives (tar, tar.gz, tar.zst) into the destination directory.
            apply_layer(ensure_dir(rootfs, dest), source_path, None, f"ADD {source}")
            continue
        if source_path.is_dir() and not source_path.is_symlink():
            ensure_dir(rootfs, dest)
            for relative in walk_context(context, source, ignore)[1:]:
                inner = os.path.relpath(relative, source)
                target = resolve_in_root(rootfs, posixpath.join(dest, inner))
                _copy_entry(context / relative, target, uid, gid, chmod)
            continue
        guest = posixpath.join(dest, posixpath.basename(source)) if into_directory else dest
        ensure_dir(rootfs, posixpath.dirname(guest.rstrip("/")) or "/")
        _copy_entry(source_path, resolve_in_root(rootfs, guest), uid, gid, chmod)


def copy_from_stage(
    rootfs: Path, stage_root: Path, sources: tuple[str, ...], dest: str, flags: dict[str, str], line: int
) -> None:
    """COPY --from=<stage>: absolute paths (globs allowed) of an earlier stage's rootfs (blocking).

    Owners, modes, xattrs, hardlinks and device nodes stay as they are in the stage (`cp -a`),
    unless --chown/--chmod say otherwise.
    """
    found: list[Path] = []
    for source in sources:
        if _is_glob(source):
            matches = sorted(glob.glob(str(stage_root) + source))
            paths = [resolve_in_root(stage_root, os.path.relpath(m, stage_root)) for m in matches]
        else:
            path = resolve_in_root(stage_root, source)
            paths = [path] if path.exists() or path.is_symlink() else []
        if not paths:
            raise DockerfileError(line, f"COPY --from: {source!r} does not exist in the source stage")
        found += paths
    uid, gid = lookup_ids(rootfs, flags["chown"])[:2] if "chown" in flags else (-1, -1)
    chmod = int(flags["chmod"], 8) if "chmod" in flags else None
    single_file = len(found) == 1 and (found[0].is_symlink() or not found[0].is_dir())
    if single_file and not dest.endswith("/") and not resolve_in_root(rootfs, dest).is_dir():
        ensure_dir(rootfs, posixpath.dirname(dest.rstrip("/")) or "/")
        target = resolve_in_root(rootfs, dest)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        _cp_archive(found, target)
        copied = [target]
    else:
        # One cp for everything: hardlinks among the sources stay one inode. A directory source
        # contributes its contents, as in Docker.
        target = ensure_dir(rootfs, dest)
        entries = [
            child
            for path in found
            for child in (sorted(path.iterdir()) if path.is_dir() and not path.is_symlink() else [path])
        ]
        _cp_archive(entries, target)
        copied = [target / entry.name for entry in entries]
    for top in copied:
        _set_owner_and_mode(top, uid, gid, chmod)


def _cp_archive(sources: list[Path], target: Path) -> None:
    """cp -a (owners, modes, xattrs, hardlinks, device nodes): into the directory `target`, or one
    source onto the path `target`."""
    if not sources:
        return
    command = ["cp", "-a", "--no-dereference", *map(str, sources), str(target)]
    if not target.is_dir():
        command = ["cp", "-a", "--no-dereference", "-T", str(sources[0]), str(target)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OSError(f"copying from the source stage failed: {result.stderr.strip()[-300:]}")


def _set_owner_and_mode(top: Path, uid: int, gid: int, chmod: int | None) -> None:
    if uid < 0 and chmod is None:
        return
    for path in [top, *(top.rglob("*") if top.is_dir() and not top.is_symlink() else [])]:
        if uid >= 0:
            os.lchown(path, uid, gid)
        if chmod is not None and not path.is_symlink():
            os.chmod(path, chmod)


def copy_url_download(rootfs: Path, download: Path, name: str, dest: str, flags: dict[str, str]) -> None:
    """ADD <url>: the downloaded file (not unpacked, as Docker) at `dest`, or `dest/<name>` for a
    directory; mode 0600 unless --chmod, as Docker."""
    guest = (
        posixpath.join(dest, name) if dest.endswith("/") or resolve_in_root(rootfs, dest).is_dir() else dest
    )
    ensure_dir(rootfs, posixpath.dirname(guest.rstrip("/")) or "/")
    uid, gid = lookup_ids(rootfs, flags["chown"])[:2] if "chown" in flags else (0, 0)
    target = resolve_in_root(rootfs, guest)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    shutil.copyfile(download, target)
    os.chown(target, uid, gid)
    os.chmod(target, int(flags["chmod"], 8) if "chmod" in flags else 0o600)
