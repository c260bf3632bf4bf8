"""Rootfs snapshots for Dockerfile builds, and a template's files read back from its image."""

from __future__ import annotations

import shutil
from pathlib import Path

import trio


class StepCache:
    """Rootfs snapshots after RUN/COPY/ADD, by cache key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        return self.path(key).is_dir()

    async def save(self, key: str, rootfs: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
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
    """A template's files from its ext4 image into the empty directory `dest`, without mounting it."""
    scratch = dest.parent / (dest.name + ".rdump")
    scratch.mkdir()
    result = await trio.run_process(
        ["debugfs", "-R", f"rdump / {scratch}", str(image)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if result.returncode != 0:
        raise OSError(f"debugfs could not read {image}: {result.stderr.decode(errors='replace')[-300:]}")
    # rdump of "/" creates one directory named after the root inside the destination.
    inner = list(scratch.iterdir())
    source = inner[0] if len(inner) == 1 and inner[0].is_dir() else scratch
    dest.rmdir()
    source.rename(dest)
    await trio.to_thread.run_sync(lambda: shutil.rmtree(scratch, ignore_errors=True))
