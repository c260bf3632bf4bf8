"""Size cap and least-recently-used eviction for the build caches.

Two caches grow with every build: compressed layer blobs (`<cache_dir>/layers`,
LayerCache) and Dockerfile step snapshots (`<cache_dir>/build-steps`,
StepCache). Each entry's mtime is its last use: the caches touch an entry when
a build finds it, and a new entry is written at its first use. After every
build, and on `cube tpl cache prune`, the least recently used entries go until
the total fits the cap (`build_cache_max_size` in the config file, default
20G).

Both caches, and the builds' scratch space (`<cache_dir>/build-work`: unpacked image trees with
their setuid files and device nodes, uploaded contexts), live in directories only root may enter
(0700, `private_dir`): a device node an image carries is a live device node on the host.

What a running build uses is never evicted: a build only uses entries it
touched or wrote after it started, so everything used at or after the start of
the oldest running build stays, and so do unfinished downloads (`.partial`) and
snapshots being written (`.tmp`) while any build runs.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config
from appliance.templates.requests import parse_size_mb

DEFAULT_MAX_SIZE = "20G"
_UNFINISHED_SUFFIXES = (".partial", ".tmp")


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "layer" or "step"
    name: str  # sha256 digest (layers) or cache key (steps), with .partial/.tmp when unfinished
    path: Path
    size_bytes: int  # on disk
    last_used: float  # epoch seconds
    in_use: bool  # a running build may use it: never evicted

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "name": self.name,
            "size_bytes": self.size_bytes,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used)),
            "in_use": self.in_use,
        }


def max_cache_bytes(config: Config) -> int:
    return parse_size_mb(config.extra.get("build_cache_max_size", DEFAULT_MAX_SIZE)) << 20


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner (root) may list or enter, made so if it was not."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def mark_used(path: Path) -> None:
    """Record a use of a cache entry (its mtime is its last use)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def disk_usage(path: Path) -> int:
    """Bytes a file or tree takes on disk; a hardlinked inode counts once."""
    info = path.lstat()
    if not path.is_dir() or path.is_symlink():
        return info.st_blocks * 512
    total, seen = info.st_blocks * 512, set()
    for directory, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                entry = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            if entry.st_nlink > 1:
                if entry.st_ino in seen:
                    continue
                seen.add(entry.st_ino)
            total += entry.st_blocks * 512
    return total


class BuildCaches:
    """Lists and prunes both caches. `running_since()` gives the start (epoch) of the oldest running
    build, or None when no build runs."""

    def __init__(self, cache_dir: Path, running_since: Callable[[], float | None]) -> None:
        self.layers_dir = cache_dir / "layers" / "sha256"
        self.steps_dir = cache_dir / "build-steps"
        self.running_since = running_since

    def _candidates(self) -> Iterable[tuple[str, Path]]:
        for kind, directory in (("layer", self.layers_dir), ("step", self.steps_dir)):
            if directory.is_dir():
                for path in directory.iterdir():
                    yield kind, path

    def entries(self) -> list[CacheEntry]:
        """Every entry, least recently used first (blocking: sizes trees)."""
        since = self.running_since()
        found = []
        for kind, path in self._candidates():
            try:
                last_used = path.lstat().st_mtime
                size = disk_usage(path)
            except FileNotFoundError:
                continue  # removed meanwhile (a build finished a .tmp or .partial)
            unfinished = path.name.endswith(_UNFINISHED_SUFFIXES)
            in_use = since is not None and (unfinished or last_used >= since)
            name = f"sha256:{path.name}" if kind == "layer" else path.name
            found.append(CacheEntry(kind, name, path, size, last_used, in_use))
        return sorted(found, key=lambda e: e.last_used)

    def prune(self, max_bytes: int) -> tuple[list[CacheEntry], list[CacheEntry]]:
        """Evict least recently used entries not in use until the total is at most `max_bytes`
        (0: everything not in use). Returns (removed, kept). Blocking."""
        entries = self.entries()
        total = sum(e.size_bytes for e in entries)
        removed: list[CacheEntry] = []
        for entry in entries:
            if total <= max_bytes:
                break
            if entry.in_use:
                continue
            if entry.path.is_dir() and not entry.path.is_symlink():
                # Renamed first: a half-removed snapshot must never look like a complete one.
                doomed = entry.path.with_name(entry.path.name + ".evicting")
                entry.path.rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
            else:
                entry.path.unlink(missing_ok=True)
            total -= entry.size_bytes
            removed.append(entry)
        gone = {id(e) for e in removed}
        return removed, [e for e in entries if id(e) not in gone]
