"""The state store: sandboxes, templates, API keys, idempotency keys, events.

`Store` is the interface the rest of the service uses; `SqliteStore` is the
single-node backend (one SQLite file in WAL mode, one connection owned by the
Trio thread; statements are short local writes, so they run inline). The WAL's
checkpoints are not: they fsync the database (one create waited 44 ms on one
in a burst), so the service runs them in a worker thread (`checkpoint_wal`) on a
connection of their own, never inside a statement. A cluster backend (etcd)
implements the same methods.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import trio

from appliance import __version__
from appliance.records import (
    DEAD,
    ApiKeyRecord,
    Event,
    SandboxQuery,
    SandboxRecord,
    TemplateManifest,
)
from appliance.tenancy import SYSTEM_TEAM, hash_api_key, new_api_key, new_key_id

_KEY_COLUMNS = "key_id, name, prefix, created_at, revoked_at, last_used_at, team_id"  # ApiKeyRecord's order
IDEMPOTENCY_TTL_S = 24 * 3600
LAST_USED_RESOLUTION_S = 60.0  # a key's last-use time is written at most this often
WAL_CHECKPOINT_INTERVAL_S = 2.0

log = logging.getLogger(__name__)

# Schema migrations, applied in order at start. The database's `PRAGMA
# user_version` is the number of migrations it has had; migration N (1-based)
# moves it from N-1 to N in one transaction (SQLite DDL is transactional), so a
# failure leaves the database as it was. Append new migrations; never edit one
# that has shipped. Migration 1 is the schema from before versioning: its
# statements are idempotent so a database made then (version 0, tables already
# there) is adopted as it is.
Migration = tuple[str, ...]

_OWNER_OF_OLD_ROWS = (
    "COALESCE((SELECT team_id FROM api_keys WHERE name = 'default' AND revoked_at IS NULL"
    f" ORDER BY created_at LIMIT 1), '{SYSTEM_TEAM}')"
)

MIGRATIONS: tuple[Migration, ...] = (
    (
        """CREATE TABLE IF NOT EXISTS sandboxes (
            sandbox_id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            template_id TEXT NOT NULL,
            started_at REAL NOT NULL,
            record TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS sandboxes_by_state ON sandboxes(state, started_at)",
        """CREATE TABLE IF NOT EXISTS templates (
            template_id TEXT PRIMARY KEY,
            manifest TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS api_keys (
            key_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            prefix TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            revoked_at REAL,
            last_used_at REAL
        )""",
        """CREATE TABLE IF NOT EXISTS idempotency_keys (
            key TEXT PRIMARY KEY,
            sandbox_id TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            sandbox_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS events_by_sandbox ON events(sandbox_id, id)",
    ),
    # 2: teams (appliance/tenancy.py). Every key gets a team of its own; what existed before
    # belongs to the team of the installer's key (`default`, the one key most appliances
    # have, so its sandboxes stay its own) or, without one, to the admin's system team.
    (
        "ALTER TABLE api_keys ADD COLUMN team_id TEXT NOT NULL DEFAULT ''",
        "UPDATE api_keys SET team_id = 'team-' || key_id",
        "CREATE INDEX api_keys_by_team ON api_keys(team_id)",
        f"ALTER TABLE sandboxes ADD COLUMN team_id TEXT NOT NULL DEFAULT '{SYSTEM_TEAM}'",
        f"UPDATE sandboxes SET team_id = {_OWNER_OF_OLD_ROWS}",
        "CREATE INDEX sandboxes_by_team ON sandboxes(team_id, state, started_at)",
        f"ALTER TABLE events ADD COLUMN team_id TEXT NOT NULL DEFAULT '{SYSTEM_TEAM}'",
        f"UPDATE events SET team_id = {_OWNER_OF_OLD_ROWS} WHERE sandbox_id != ''",
        "CREATE INDEX events_by_team ON events(team_id, id)",
        """CREATE TABLE team_idempotency_keys (
            team_id TEXT NOT NULL,
            key TEXT NOT NULL,
            sandbox_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (team_id, key)
        )""",
        "INSERT INTO team_idempotency_keys(team_id, key, sandbox_id, created_at)"
        f" SELECT {_OWNER_OF_OLD_ROWS}, key, sandbox_id, created_at FROM idempotency_keys",
        "DROP TABLE idempotency_keys",
        "ALTER TABLE team_idempotency_keys RENAME TO idempotency_keys",
    ),
)


class DatabaseTooNew(RuntimeError):
    """The database was migrated by a newer cube than this one; starting would corrupt it."""


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, path: Path, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Bring the database up to `len(migrations)`; returns the versions applied.

    `db` must be in autocommit mode (isolation_level=None): each migration is
    its own BEGIN IMMEDIATE ... COMMIT, which also keeps a second process
    starting at the same time from applying the same migration twice.
    """
    applied: list[int] = []
    while True:
        db.execute("BEGIN IMMEDIATE")
        try:
            current = schema_version(db)
            if current > len(migrations):
                raise DatabaseTooNew(
                    f"{path} has schema version {current}, but this cube ({__version__}) knows only up to"
                    f" {len(migrations)}: a newer cube used it. Run that version (`cube upgrade` to it),"
                    f" or restore the copy `cube upgrade` made before migrating ({path.name}.pre-*)."
                )
            if current == len(migrations):
                db.execute("COMMIT")
                return applied
            for statement in migrations[current]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {current + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        applied.append(current + 1)


def _record_to_json(record: SandboxRecord) -> str:
    return json.dumps(record.__dict__, sort_keys=True)


def _record_from_row(text: str, team_id: str) -> SandboxRecord:
    """The column is the owner: records written before teams have no `team_id` in their JSON."""
    record = SandboxRecord(**json.loads(text))
    record.team_id = team_id
    return record


class SqliteStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        try:
            migrate(self._db, path)
        except BaseException:
            self._db.close()
            raise
        # No checkpoint inside a commit: `checkpoint` does them (the last connection's close too).
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._path = path
        self._checkpointer: sqlite3.Connection | None = None

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.close()

    def checkpoint(self) -> None:
        """Copy the WAL's committed pages into the database: PASSIVE, so it neither waits for nor
        blocks a writer. For a worker thread (one at a time), on its own connection."""
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    # Sandboxes.

    def put_sandbox(self, record: SandboxRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO sandboxes(sandbox_id, state, template_id, started_at, record, team_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.sandbox_id,
                record.state,
                record.template_id,
                record.started_at,
                _record_to_json(record),
                record.team_id,
            ),
        )

    def get_sandbox(self, sandbox_id: str) -> SandboxRecord | None:
        row = self._db.execute(
            "SELECT record, team_id FROM sandboxes WHERE sandbox_id = ?", (sandbox_id,)
        ).fetchone()
        return _record_from_row(*row) if row else None

    def query_sandboxes(self, query: SandboxQuery) -> list[SandboxRecord]:
        clauses = [f"state IN ({','.join('?' * len(query.states))})"]
        params: list[object] = list(query.states)
        if query.team_id is not None:
            clauses.append("team_id = ?")
            params.append(query.team_id)
        if query.template_id is not None:
            clauses.append("template_id = ?")
            params.append(query.template_id)
        if query.started_after is not None:
            clauses.append("started_at > ?")
            params.append(query.started_after)
        op = "<" if query.newest_first else ">"
        if query.after is not None:
            clauses.append(f"(started_at, sandbox_id) {op} (?, ?)")
            params.extend(query.after)
        order = "DESC" if query.newest_first else "ASC"
        sql = (
            f"SELECT record, team_id FROM sandboxes WHERE {' AND '.join(clauses)}"
            f" ORDER BY started_at {order}, sandbox_id {order}"
        )
        found: list[SandboxRecord] = []
        for text, team_id in self._db.execute(sql, params):
            record = _record_from_row(text, team_id)
            if all(record.metadata.get(k) == v for k, v in query.metadata.items()):
                found.append(record)
                if len(found) >= query.limit:
                    break
        return found

    def count_sandboxes(self, states: Sequence[str], team_id: str) -> int:
        """How many of the team's sandboxes are in `states` (a count: no record is decoded)."""
        row = self._db.execute(
            f"SELECT COUNT(*) FROM sandboxes WHERE state IN ({','.join('?' * len(states))}) AND team_id = ?",
            (*states, team_id),
        ).fetchone()
        return int(row[0])

    def mark_live_sandboxes_dead(self, reason: str) -> list[str]:
        now = time.time()
        marked: list[str] = []
        rows = self._db.execute("SELECT record, team_id FROM sandboxes WHERE state != ?", (DEAD,)).fetchall()
        for text, team_id in rows:
            record = _record_from_row(text, team_id)
            record.state, record.ended_at, record.end_reason = DEAD, now, reason
            self.put_sandbox(record)
            self.add_event(record.sandbox_id, "dead", reason)
            marked.append(record.sandbox_id)
        return marked

    # Templates (a mirror of the manifests on disk).

    def put_template(self, manifest: TemplateManifest) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO templates(template_id, manifest) VALUES (?, ?)",
            (manifest.template_id, manifest.to_json()),
        )

    def list_templates(self) -> list[TemplateManifest]:
        rows = self._db.execute("SELECT manifest FROM templates ORDER BY template_id").fetchall()
        return [TemplateManifest.from_json(text) for (text,) in rows]

    def delete_template(self, template_id: str) -> None:
        self._db.execute("DELETE FROM templates WHERE template_id = ?", (template_id,))

    # API keys.

    def create_api_key(self, name: str, team_id: str | None = None) -> tuple[ApiKeyRecord, str]:
        """A new key in `team_id` (an existing team: the caller checks), else in a team of its own."""
        key = new_api_key()
        record = ApiKeyRecord.new(key, new_key_id(), name, team_id)
        self._db.execute(
            "INSERT INTO api_keys(key_id, name, prefix, key_hash, created_at, team_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (record.key_id, record.name, record.prefix, hash_api_key(key), record.created_at, record.team_id),
        )
        return record, key

    def api_keys_with_hashes(self) -> list[tuple[str, ApiKeyRecord]]:
        """Every key with its hash: what a node joining a cluster publishes (cluster/keys.py)."""
        sql = f"SELECT key_hash, {_KEY_COLUMNS} FROM api_keys ORDER BY created_at"
        rows = self._db.execute(sql).fetchall()
        return [(row[0], ApiKeyRecord(*row[1:])) for row in rows]

    def team_exists(self, team_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM api_keys WHERE team_id = ?", (team_id,)).fetchone() is not None

    def list_api_keys(self) -> list[ApiKeyRecord]:
        rows = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [ApiKeyRecord(*row) for row in rows]

    def revoke_api_key(self, key_id: str) -> bool:
        cursor = self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            (time.time(), key_id),
        )
        return cursor.rowcount > 0

    def check_api_key(self, key: str) -> ApiKeyRecord | None:
        row = self._db.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
            (hash_api_key(key),),
        ).fetchone()
        if row is None:
            return None
        record = ApiKeyRecord(*row)
        now = time.time()
        if record.last_used_at is None or now - record.last_used_at > LAST_USED_RESOLUTION_S:
            self._db.execute("UPDATE api_keys SET last_used_at = ? WHERE key_id = ?", (now, record.key_id))
        return record

    # Idempotency keys for create.

    def idempotent_sandbox(self, team_id: str, key: str) -> str | None:
        row = self._db.execute(
            "SELECT sandbox_id FROM idempotency_keys WHERE team_id = ? AND key = ? AND created_at > ?",
            (team_id, key, time.time() - IDEMPOTENCY_TTL_S),
        ).fetchone()
        return row[0] if row else None

    def remember_idempotency_key(self, team_id: str, key: str, sandbox_id: str) -> None:
        self._db.execute(
            "DELETE FROM idempotency_keys WHERE created_at < ?", (time.time() - IDEMPOTENCY_TTL_S,)
        )
        self._db.execute(
            "INSERT OR REPLACE INTO idempotency_keys(team_id, key, sandbox_id, created_at)"
            " VALUES (?, ?, ?, ?)",
            (team_id, key, sandbox_id, time.time()),
        )

    # Events.

    def add_event(self, sandbox_id: str, kind: str, message: str) -> None:
        """An event belongs to its sandbox's team (the node's own, like pool boots, to the system's)."""
        self._db.execute(
            "INSERT INTO events(at, sandbox_id, kind, message, team_id) VALUES (?, ?, ?, ?,"
            " COALESCE((SELECT team_id FROM sandboxes WHERE sandbox_id = ?), ?))",
            (time.time(), sandbox_id, kind, message, sandbox_id, SYSTEM_TEAM),
        )

    def events(
        self, sandbox_id: str | None = None, limit: int = 100, team_id: str | None = None
    ) -> list[Event]:
        clauses, params = [], []
        for column, value in (("sandbox_id", sandbox_id), ("team_id", team_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows: Iterable[tuple[float, str, str, str]] = self._db.execute(
            f"SELECT at, sandbox_id, kind, message FROM events{where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [Event(*row) for row in reversed(list(rows))]


async def checkpoint_wal(store: SqliteStore, interval_s: float = WAL_CHECKPOINT_INTERVAL_S) -> None:
    """The store's WAL checkpoints, every `interval_s`, in a worker thread (runs until cancelled)."""
    while True:
        await trio.sleep(interval_s)
        try:
            await trio.to_thread.run_sync(store.checkpoint)
        except sqlite3.Error as exc:
            log.warning("store: WAL checkpoint failed: %s", exc)
