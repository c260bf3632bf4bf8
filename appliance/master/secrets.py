"""Secrets of a team (E2B's `/secrets`): write-only values, versioned, kept apart from the store.

They live in their own SQLite file (`<state_dir>/secrets.db`, mode 0600, root's), so a
copy of the main store (`cube.db`, which `cube` commands and backups read) carries no
secret value. Values go in through `create` and `update`; the API never reads them back.
One reader: the egress proxy (net/egress_proxy.py), which resolves a secret's
`${e2b.secrets.NAME}` placeholder at the sandbox's egress (the sandbox's HTTP requests to a
host of its `network.rules`, rewritten on their way out), through `sandbox_secret_values`.

Names are lower-cased and unique per team; another team's secret is as missing as one
that never existed. Values are never logged: nothing here logs, and a `SecretRecord`
does not carry the value.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SECRET_ID_PREFIX = "sec_"
SECRETS_DB = "secrets.db"  # in the state dir
SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    secret_id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    value TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (team_id, name)
)
"""


class SecretNameTaken(ValueError):
    pass


@dataclass(frozen=True)
class SecretRecord:
    """A secret as the API shows it: never its value."""

    secret_id: str
    name: str
    version: int
    metadata: dict[str, str]
    created_at: float
    updated_at: float


_COLUMNS = "secret_id, name, version, metadata, created_at, updated_at"


def _record(row: tuple[str, str, int, str, float, float]) -> SecretRecord:
    secret_id, name, version, metadata, created_at, updated_at = row
    return SecretRecord(secret_id, name, version, json.loads(metadata), created_at, updated_at)


class SecretStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it: the value column is never readable by others.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=DELETE")  # no -wal file with other permissions
        self._db.execute(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def list(self, team_id: str) -> list[SecretRecord]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM secrets WHERE team_id = ? ORDER BY created_at, secret_id", (team_id,)
        ).fetchall()
        return [_record(row) for row in rows]

    def get(self, team_id: str, id_or_name: str) -> SecretRecord | None:
        """The team's secret by id, or by name (names are lower-cased)."""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM secrets WHERE team_id = ? AND (secret_id = ? OR name = ?)",
            (team_id, id_or_name, id_or_name.lower()),
        ).fetchone()
        return None if row is None else _record(row)

    def value(self, team_id: str, name: str) -> str | None:
        """The current value of the team's secret named `name` (not by id): for the egress proxy."""
        row = self._db.execute(
            "SELECT value FROM secrets WHERE team_id = ? AND name = ?", (team_id, name.lower())
        ).fetchone()
        return None if row is None else str(row[0])

    def create(self, team_id: str, name: str, value: str, metadata: dict[str, str]) -> SecretRecord:
        now = time.time()
        secret_id = SECRET_ID_PREFIX + secrets.token_hex(10)
        try:
            self._db.execute(
                "INSERT INTO secrets VALUES (?, ?, ?, 1, ?, ?, ?, ?)",
                (secret_id, team_id, name.lower(), value, json.dumps(metadata), now, now),
            )
        except sqlite3.IntegrityError as exc:
            raise SecretNameTaken(f"a secret named {name.lower()!r} already exists") from exc
        return SecretRecord(secret_id, name.lower(), 1, metadata, now, now)

    def update(
        self, team_id: str, id_or_name: str, value: str, metadata: dict[str, str] | None
    ) -> SecretRecord | None:
        """A new version holding `value` (and `metadata`, if given); None if there is no such secret."""
        current = self.get(team_id, id_or_name)
        if current is None:
            return None
        now = time.time()
        kept = current.metadata if metadata is None else metadata
        self._db.execute(
            "UPDATE secrets SET version = version + 1, value = ?, metadata = ?, updated_at = ? "
            "WHERE secret_id = ?",
            (value, json.dumps(kept), now, current.secret_id),
        )
        return SecretRecord(
            current.secret_id, current.name, current.version + 1, kept, current.created_at, now
        )

    def delete(self, team_id: str, id_or_name: str) -> bool:
        current = self.get(team_id, id_or_name)
        if current is None:
            return False
        self._db.execute("DELETE FROM secrets WHERE secret_id = ?", (current.secret_id,))
        return True


def sandbox_secret_values(
    store: SecretStore, team_of: Callable[[str], str | None]
) -> Callable[[str, str], str | None]:
    """(sandbox id, secret name) → the value of that secret of the sandbox's team (`team_of`:
    a live sandbox's team, None if it has none); what the egress proxy resolves placeholders with."""

    def value(sandbox_id: str, name: str) -> str | None:
        team_id = team_of(sandbox_id)
        return None if team_id is None else store.value(team_id, name)

    return value
