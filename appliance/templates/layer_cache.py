"""Compressed layer blobs kept by digest under `<cache_dir>/layers`, shared by every build.

A blob is written to `<hex>.partial` first (so an interrupted download resumes
from where it stopped) and renamed to `<hex>` only after its sha256 matched:
whatever sits under its final name is verified content.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import trio

from appliance.templates.build_caches import mark_used, private_dir
from appliance.templates.manifests import DigestMismatch, ManifestError

_SHA256_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_HASH_CHUNK = 1 << 20


def digest_hex(digest: str) -> str:
    match = _SHA256_RE.match(digest)
    if not match:
        raise ManifestError(f"unsupported or malformed digest {digest!r} (only sha256)")
    return match.group(1)


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


class LayerCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        # One download per digest at a time; concurrent builds of images sharing
        # a base layer wait for the first and then find it complete.
        self._locks: dict[str, trio.Lock] = {}

    def blob_path(self, digest: str) -> Path:
        return self.root / "sha256" / digest_hex(digest)

    def partial_path(self, digest: str) -> Path:
        return self.root / "sha256" / (digest_hex(digest) + ".partial")

    def has(self, digest: str) -> bool:
        """Whether the verified blob is here; a hit counts as a use (see build_caches)."""
        path = self.blob_path(digest)
        if not path.is_file():
            return False
        mark_used(path)
        return True

    def lock(self, digest: str) -> trio.Lock:
        return self._locks.setdefault(digest, trio.Lock())

    def prepare_partial(self, digest: str) -> tuple[Path, int]:
        """The partial file to append to and how many bytes it already has."""
        partial = self.partial_path(digest)
        private_dir(self.root)
        partial.parent.mkdir(exist_ok=True)
        return partial, partial.stat().st_size if partial.exists() else 0

    async def commit(self, digest: str, what: str) -> Path:
        """Verify the finished partial download and give it its final name."""
        partial = self.partial_path(digest)
        actual = await trio.to_thread.run_sync(file_sha256, partial)
        if actual != digest:
            partial.unlink(missing_ok=True)
            raise DigestMismatch(
                f"{what}: downloaded content has digest {actual}, expected {digest} "
                "(the registry served a corrupt or wrong blob)"
            )
        final = self.blob_path(digest)
        os.replace(partial, final)
        return final
