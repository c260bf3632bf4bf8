"""The template image a memory snapshot's overlay was written over, shared by every snapshot of it.

A memory snapshot (a full snapshot, a fork's checkpoint: cubelet/checkpoints.py) is restored
over its own root image, which must be exactly the base its overlay was written over. Template
images are never written once published (a rebuild is a new file), so a hard link to the base
is that image at no cost. Where no link can be made (the appliance's shipped templates are on
its boot medium's squashfs, the snapshots on the data disk: EXDEV), a copy is needed, but one
copy per base image version, not one per snapshot: `link_base` copies the base once into
`<state_dir>/kvm-base-images/<identity>.img` and links every snapshot's image to that copy.
The identity is the base's path, size and modification time (a rebuilt image is a new file
with another; a shipped template changes only with a new appliance version).

The count of references is the copy's own link count: a copy linked by no snapshot any more
(link count 1: only its name in the store) is deleted by the next `link_base` (and what is
left when the last snapshot of it goes is one copy, never more).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from appliance.runtime.sparse import sparse_copy

BASE_IMAGES_DIR = "kvm-base-images"  # in the state dir
SUFFIX = ".img"
_COPYING = ".copying-"


def identity(base: Path) -> str:
    info = base.stat()
    key = f"{base.resolve()}\0{info.st_size}\0{info.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def link_base(base: Path, image: Path, store: Path) -> None:
    """`image` made the same file as `base` (a hard link), or else a link to the store's one copy
    of `base` (made now if there is none). OSError if neither can be made."""
    try:
        os.link(base, image)
        return
    except OSError:
        pass  # another filesystem, or links refused
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    shared = store / f"{identity(base)}{SUFFIX}"
    try:
        os.link(shared, image)
    except FileNotFoundError:
        copying = store / f"{_COPYING}{os.getpid()}-{os.urandom(4).hex()}"
        try:
            sparse_copy(base, copying)
            os.chmod(copying, 0o400)  # never written: every snapshot of the base reads it
            os.link(copying, image)  # first: its link count never drops to 1 while in use
            try:
                os.link(copying, shared)
            except FileExistsError:
                pass  # another snapshot of the same base made it meanwhile: this one is a second
        finally:
            copying.unlink(missing_ok=True)
    remove_unused(store)


def remove_unused(store: Path) -> list[str]:
    """Delete the copies no snapshot links any more, and copies a crash interrupted; their names."""
    removed = []
    for entry in store.iterdir():
        try:
            unused = entry.name.endswith(SUFFIX) and entry.stat(follow_symlinks=False).st_nlink == 1
        except FileNotFoundError:
            continue
        if unused or (entry.name.startswith(_COPYING) and not _copying_now(entry.name)):
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def _copying_now(name: str) -> bool:
    """Whether the copy `name` is one a live process is making (its pid in the name)."""
    pid = name[len(_COPYING) :].partition("-")[0]
    return pid.isdigit() and Path(f"/proc/{pid}").exists()
