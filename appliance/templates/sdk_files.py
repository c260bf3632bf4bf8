"""The files the E2B SDKs upload for their COPY steps, kept per team under the SDK's `filesHash`.

The SDK asks `GET /templates/{id}/files/{hash}` whether its team already has the files of a COPY
step and gets a signed link (api/sdk_templates.py); when they are missing it PUTs a tar (gzip by
default) of them there. Here:

- `receive` writes the body as it arrives into the team's scratch space, refusing it past
  `build_context_max_size`; `build_context.extract_context` then unpacks it (untrusted_tree: no
  name leaves the tree, no link is followed, device nodes are dropped, the unpacked size is capped
  too) into `<root>/<team>/<hash>/files`, and the archive's entry names go into `entries.json`. The
  archive is not kept. A new upload under a hash replaces the old one whole (rename), never mixes.
- `verify`: the SDKs' `filesHash` is sha256 of "COPY <src> <dest>" and then, per archive entry in
  path order, its relative path, st_mode, size (Python: not for directories) and content (or link
  target). It covers metadata of the client's own files, so it can only be checked once a build
  names the step's src and dest: `verify` recomputes it from the unpacked tree. The JS SDK (2.x)
  hashes directories' sizes on the client's filesystem as well, which no archive carries: with
  directories among the entries a mismatch is `UNVERIFIABLE` rather than `MISMATCH`.

Entries live under a directory named by a digest of the team, so one team's uploads are never
another team's cache hits. Blocking except `receive`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from appliance.templates.build_caches import mark_used, private_dir
from appliance.templates.build_context import extract_context
from appliance.templates.limits import BuildLimits
from appliance.templates.untrusted_tree import Tree

FILES_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
ENTRIES_FILE = "entries.json"
FILES_DIR = "files"
_CHUNK = 1 << 20


class UploadRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Verdict(enum.Enum):
    MATCH = "match"
    MISMATCH = "mismatch"
    UNVERIFIABLE = "unverifiable"  # a mismatch that a JS SDK client's directory sizes could explain


def check_files_hash(files_hash: str) -> str:
    if not FILES_HASH_RE.match(files_hash):
        raise ValueError(f"invalid filesHash {files_hash[:80]!r}: a lowercase hex SHA-256 is expected")
    return files_hash


def _team_dir(team: str) -> str:
    return hashlib.sha256(team.encode()).hexdigest()[:32]


class UploadedFiles:
    def __init__(self, root: Path, limits: BuildLimits) -> None:
        self.root = root
        self.limits = limits

    def entry(self, team: str, files_hash: str) -> Path:
        return self.root / _team_dir(team) / check_files_hash(files_hash)

    def files(self, team: str, files_hash: str) -> Path:
        """The unpacked tree (an untrusted tree: open it with untrusted_tree.Tree)."""
        return self.entry(team, files_hash) / FILES_DIR

    def present(self, team: str, files_hash: str) -> bool:
        """Whether the team has these files; a hit counts as a use."""
        entry = self.entry(team, files_hash)
        if not (entry / ENTRIES_FILE).is_file():
            return False
        mark_used(entry)
        return True

    def discard(self, team: str, files_hash: str) -> None:
        entry = self.entry(team, files_hash)
        if entry.exists():
            doomed = entry.with_name(f".discarded-{secrets.token_hex(4)}")
            entry.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    async def receive(
        self, team: str, files_hash: str, body: AsyncIterator[bytes], declared_length: int | None
    ) -> None:
        """Store an upload (see the module doc). Raises UploadRefused: 413 past the size cap, 400 for
        what is not a safe archive."""
        limit = self.limits.context_bytes
        too_large = UploadRefused(
            413, f"the upload is larger than {limit >> 20} MiB (build_context_max_size in the config file)"
        )
        if declared_length is not None and declared_length > limit:
            raise too_large
        entry = self.entry(team, files_hash)
        incoming = private_dir(entry.parent) / f".incoming-{secrets.token_hex(6)}"
        archive = incoming.with_suffix(".tar")
        try:
            received = 0
            async with await trio.open_file(archive, "wb") as out:
                async for chunk in body:
                    received += len(chunk)
                    if received > limit:
                        raise too_large
                    await out.write(chunk)
            await trio.to_thread.run_sync(self._unpack, archive, incoming, entry)
        finally:
            with trio.CancelScope(shield=True):
                archive.unlink(missing_ok=True)
                await trio.to_thread.run_sync(lambda: shutil.rmtree(incoming, ignore_errors=True))

    def _unpack(self, archive: Path, incoming: Path, entry: Path) -> None:
        files = incoming / FILES_DIR
        files.mkdir(parents=True, mode=0o700)
        try:
            names = extract_context(archive, files, self.limits.context_bytes)
        except (ValueError, OSError, tarfile.TarError, EOFError) as exc:
            status = 413 if "build_context_max_size" in str(exc) else 400
            raise UploadRefused(status, f"the upload is not a usable tar archive: {exc}") from exc
        (incoming / ENTRIES_FILE).write_text(json.dumps(names))
        if entry.exists():
            old = entry.with_name(f".replaced-{secrets.token_hex(4)}")
            entry.rename(old)
            incoming.rename(entry)
            shutil.rmtree(old, ignore_errors=True)
        else:
            incoming.rename(entry)

    def verify(self, team: str, files_hash: str, src: str, dest: str) -> Verdict:
        """Whether the team's files under `files_hash` are what the SDK hashed for `COPY src dest`."""
        entry = self.entry(team, files_hash)
        names = sorted(
            {os.path.normpath(n) for n in json.loads((entry / ENTRIES_FILE).read_text())},
            key=lambda n: "" if n == "." else "/" + n,  # the SDKs sort absolute paths
        )
        with Tree.open(entry / FILES_DIR) as tree:
            if sdk_files_hash(tree, names, src, dest) == files_hash:
                return Verdict.MATCH
            has_directories = any(tree.is_dir(name, follow=False) for name in names)
        return Verdict.UNVERIFIABLE if has_directories else Verdict.MISMATCH


def sdk_files_hash(tree: Tree, names: list[str], src: str, dest: str) -> str:
    """The Python SDK's `calculate_files_hash` over an unpacked upload (`names` in path order)."""
    hasher = hashlib.sha256(f"COPY {src} {dest}".encode())
    for name in names:
        info = tree.lstat(name)
        if info is None:
            continue
        hasher.update(name.encode())
        hasher.update(str(info.st_mode).encode())
        if stat.S_ISLNK(info.st_mode):
            hasher.update(str(info.st_size).encode())
            hasher.update(tree.readlink(name).encode())
            continue
        if not stat.S_ISDIR(info.st_mode):
            hasher.update(str(info.st_size).encode())
        if stat.S_ISREG(info.st_mode):
            with tree.reader(name, follow=False) as f:
                while chunk := f.read(_CHUNK):
                    hasher.update(chunk)
    return hasher.hexdigest()
