"""Rootfs snapshots for Dockerfile builds, and a template's files read back from its image."""

from __future__ import annotations

import shutil
from pathlib import Path

import trio

from appliance.templates.build_caches import mark_used, private_dir
from appliance.templates.untrusted_tree import Tree


class StepCache:
    """Rootfs snapshots after RUN/COPY/ADD, by cache key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        """Whether the snapshot is here; a hit counts as a use (see build_caches)."""
        path = self.path(key)
        if not path.is_dir():
            return False
        mark_used(path)
        return True

    async def save(self, key: str, rootfs: Path) -> None:
        private_dir(self.root)
        tmp = self.root / f"{key}.tmp"
        await trio.to_thread.run_sync(lambda: shutil.rmtree(tmp, ignore_errors=True))
        await copy_tree(rootfs, tmp)
        if self.has(key):
            await trio.to_thread.run_sync(shutil.rmtree, tmp)
        else:
            tmp.rename(self.path(key))

    async def restore(self, key: str, rootfs: Path) -> None:
        await copy_tree(self.path(key), rootfs)


async def copy_tree(source: Path, dest: Path) -> None:
    """cp -a keeps owners, modes, xattrs, hardlinks and device nodes; reflinks where the fs can."""
    dest.mkdir(parents=True, exist_ok=True)
    result = await trio.run_process(
        ["cp", "-a", "--reflink=auto", f"{source}/.", str(dest)], capture_stderr=True, check=False
    )
    if result.returncode != 0:
        raise OSError(f"copying {source} failed: {result.stderr.decode(errors='replace').strip()[-300:]}")


async def export_template_rootfs(image: Path, dest: Path) -> None:
    """A template's files from its ext4 image into the empty directory `dest`, exactly: owners,
    modes, xattrs, hardlinks and device nodes (debugfs's rdump loses the last three).

    The image is loop-mounted read-only inside a private mount namespace that only this `unshare`
    process holds: when it exits, however it exits, the mount and its (autoclear) loop device go
    with it, and no one else ever sees the mount.
    """
    mount_point = dest.parent / (dest.name + ".mnt")
    mount_point.mkdir()
    script = 'mount -o ro,loop,noload "$1" "$2" && exec cp -a --reflink=auto "$2/." "$3"'
    arguments = (str(image), str(mount_point), str(dest))
    try:
        result = await trio.run_process(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *arguments],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    finally:
        mount_point.rmdir()
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip()[-300:]
        raise OSError(f"could not read the template image {image}: {detail}")
    await trio.to_thread.run_sync(_drop_empty_lost_found, dest)


def _drop_empty_lost_found(tree_root: Path) -> None:
    """mkfs.ext4's lost+found, not the template's (the tree is the template's: read it as untrusted)."""
    with Tree.open(tree_root) as tree:
        if tree.is_dir("lost+found", follow=False) and not tree.listdir("lost+found"):
            tree.remove("lost+found")
