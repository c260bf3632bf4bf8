"""What a Dockerfile RUN changed, computed inside its guest (stdlib only: sent as `python3 -c`).

    snapshot FILE [EXCLUDED...]   record every entry of the root filesystem (other mounts are skipped)
    diff FILE [EXCLUDED...]       write to stdout an OCI layer (plain tar, PAX): the entries that are
                                  new or changed since FILE (inode, ctime, mtime, size, mode, owner),
                                  and a whiteout for each one that is gone

The host applies the layer to the step's rootfs directory with the image unpacker, so
ownership, modes, xattrs, hardlinks, symlinks and device nodes come back as the guest has them.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tarfile


def walk(excluded: frozenset[str], root: str = "/") -> dict[str, list[int]]:
    """Guest path -> metadata; `root` is "/" in the guest (another directory in tests)."""
    root_dev = os.lstat(root).st_dev
    found: dict[str, list[int]] = {}
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            path = "/" + os.path.relpath(entry.path, root)
            if path in excluded:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != root_dev:
                continue  # a mount point (proc, sys, dev, run): not part of the image
            found[path] = [
                st.st_mode,
                st.st_ino,
                st.st_ctime_ns,
                st.st_mtime_ns,
                st.st_size,
                st.st_uid,
                st.st_gid,
            ]
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    return found


def _add(tar: tarfile.TarFile, root: str, name: str) -> None:
    path = os.path.join(root, name.lstrip("/"))
    try:
        info = tar.gettarinfo(path, name.lstrip("/"))
    except OSError:
        return
    if info is None:  # sockets: nothing an image can carry
        return
    headers = dict(info.pax_headers)
    try:
        for name in os.listxattr(path, follow_symlinks=False):
            value = os.getxattr(path, name, follow_symlinks=False)
            headers["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    except OSError:
        pass
    info.pax_headers = headers
    if info.isreg():
        try:
            with open(path, "rb") as f:
                tar.addfile(info, f)
        except OSError:
            return
    else:
        tar.addfile(info)


def write_diff(
    before: dict[str, list[int]], after: dict[str, list[int]], out: object, root: str = "/"
) -> None:
    gone = {p for p in before if p not in after}
    changed = sorted(p for p, meta in after.items() if before.get(p) != meta)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for path in sorted(gone):
            parent, _, name = path.rpartition("/")
            if parent in gone:
                continue  # its directory goes as a whole
            whiteout = tarfile.TarInfo(f"{parent.lstrip('/')}/.wh.{name}".lstrip("/"))
            tar.addfile(whiteout)
        for path in changed:
            _add(tar, root, path)


def main(argv: list[str]) -> int:
    command, state_file, *excluded_list = argv
    excluded = frozenset(excluded_list)
    if command == "snapshot":
        with open(state_file, "w") as f:
            json.dump(walk(excluded), f)
        return 0
    if command == "diff":
        with open(state_file) as f:
            before = json.load(f)
        write_diff(before, walk(excluded), sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return 0
    print(f"unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
