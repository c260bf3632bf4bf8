"""Volumes of a team (E2B's `/volumes`, `/volumecontent`): persistent file trees under the data dir.

`<state_dir>/volumes/<volume_id>/` holds `volume.json` (id, name, team, content token;
0600) and `data/`, the volume's files. Everything inside `data/` is reached only through
`templates/untrusted_tree.Tree` (openat2 with RESOLVE_IN_ROOT: `..` and symlinks cannot
leave it; entries created and removed through their parent's fd), whatever path a
caller sends. A volume holds at most `config.volume_max_mb` (the sum of its files'
allocated blocks); a write that would pass it is refused before it lands.

Mounted into a sandbox (`volume_mounts`), a volume is held by that sandbox alone and its files
come back when it ends (cubelet/volume_mounts.py, which also owns this directory layout).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.cubelet.volume_mounts import DATA_DIR, VOLUMES_DIR
from appliance.templates.untrusted_tree import Tree

META_FILE = "volume.json"
__all__ = ["DATA_DIR", "VOLUMES_DIR", "VolumeNameTaken", "VolumeRecord", "VolumeStore"]
VOLUME_ID_PREFIX = "vol-"
_ID_RE = re.compile(r"^vol-[0-9a-f]{16}$")


class VolumeNameTaken(ValueError):
    pass


@dataclass(frozen=True)
class VolumeRecord:
    volume_id: str
    name: str
    team_id: str
    token: str  # the bearer token of its content API
    created_at: float


class VolumeStore:
    def __init__(self, state_dir: Path, max_bytes: int) -> None:
        self.root = state_dir / VOLUMES_DIR
        self.max_bytes = max_bytes
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _load(self, volume_id: str) -> VolumeRecord | None:
        if not _ID_RE.match(volume_id):
            return None
        try:
            return VolumeRecord(**json.loads((self.root / volume_id / META_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def list(self, team_id: str) -> list[VolumeRecord]:
        found = (self._load(entry.name) for entry in self.root.iterdir())
        return sorted(
            (r for r in found if r is not None and r.team_id == team_id),
            key=lambda r: (r.created_at, r.volume_id),
        )

    def get(self, team_id: str, volume_id: str) -> VolumeRecord | None:
        record = self._load(volume_id)
        return record if record is not None and record.team_id == team_id else None

    def by_token(self, volume_id: str, token: str) -> VolumeRecord | None:
        """The volume whose content token is `token` (compared in constant time)."""
        record = self._load(volume_id)
        if record is None or not secrets.compare_digest(record.token.encode(), token.encode()):
            return None
        return record

    def create(self, team_id: str, name: str) -> VolumeRecord:
        if any(r.name == name for r in self.list(team_id)):
            raise VolumeNameTaken(f"a volume named {name!r} already exists")
        record = VolumeRecord(
            volume_id=VOLUME_ID_PREFIX + secrets.token_hex(8),
            name=name,
            team_id=team_id,
            token="vt_" + secrets.token_urlsafe(32),
            created_at=time.time(),
        )
        directory = self.root / record.volume_id
        (directory / DATA_DIR).mkdir(mode=0o755, parents=True)
        meta = os.open(directory / META_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(meta, "w") as f:
            json.dump(asdict(record), f)
        return record

    def delete(self, team_id: str, volume_id: str) -> bool:
        record = self.get(team_id, volume_id)
        if record is None:
            return False
        shutil.rmtree(self.root / record.volume_id)
        return True

    def tree(self, record: VolumeRecord) -> Tree:
        """The volume's files (close it: a context manager)."""
        return Tree.open(self.root / record.volume_id / DATA_DIR)

    def usage(self, record: VolumeRecord) -> int:
        """Bytes the volume's files take on disk (nothing in it is followed)."""
        total = 0
        for directory, _, files in os.walk(self.root / record.volume_id / DATA_DIR, followlinks=False):
            for name in files:
                info = os.lstat(os.path.join(directory, name))
                if not stat.S_ISDIR(info.st_mode):
                    total += info.st_blocks * 512
        return total
