"""The store's schema migrations: old databases are brought forward with their rows, newer ones refused."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.master.store import (
    MIGRATIONS,
    DatabaseTooNew,
    SqliteStore,
    hash_api_key,
    migrate,
    schema_version,
)
from appliance.records import SandboxQuery

# The schema as `SqliteStore` created it before databases carried a version
# (user_version 0): what every appliance installed until then has on disk.
UNVERSIONED_SCHEMA = """
CREATE TABLE sandboxes (sandbox_id TEXT PRIMARY KEY, state TEXT NOT NULL, template_id TEXT NOT NULL,
    started_at REAL NOT NULL, record TEXT NOT NULL);
CREATE INDEX sandboxes_by_state ON sandboxes(state, started_at);
CREATE TABLE templates (template_id TEXT PRIMARY KEY, manifest TEXT NOT NULL);
CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, name TEXT NOT NULL, prefix TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, revoked_at REAL, last_used_at REAL);
CREATE TABLE idempotency_keys (key TEXT PRIMARY KEY, sandbox_id TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, sandbox_id TEXT NOT NULL,
    kind TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX events_by_sandbox ON events(sandbox_id, id);
"""

RECORD = (
    '{"alias": null, "allow_internet_access": true, "auto_resume": false, "client_id": "c",'
    ' "console_log": "", "cpu_count": 1, "disk_size_mb": 1024, "end_at": 1300.0, "end_reason": "",'
    ' "ended_at": null, "envd_access_token": "t", "memory_mb": 256, "metadata": {"team": "a"},'
    ' "network": {}, "on_timeout": "kill", "sandbox_id": "old1", "started_at": 1000.0,'
    ' "state": "paused", "template_id": "code-interpreter"}'
)


def _unversioned_database(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(UNVERSIONED_SCHEMA)
    db.execute("INSERT INTO sandboxes VALUES ('old1', 'paused', 'code-interpreter', 1000.0, ?)", (RECORD,))
    db.execute(
        "INSERT INTO api_keys(key_id, name, prefix, key_hash, created_at)"
        " VALUES ('k1', 'ops', 'cube_ab12', ?, 5)",
        (hash_api_key("cube_ab12secret"),),
    )
    db.execute("INSERT INTO events(at, sandbox_id, kind, message) VALUES (1000.0, 'old1', 'created', 'x')")
    db.commit()
    db.close()


def test_unversioned_database_is_adopted_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "cube.db"
    _unversioned_database(path)
    store = SqliteStore(path)
    try:
        assert schema_version(store._db) == len(MIGRATIONS)
        [sandbox] = store.query_sandboxes(SandboxQuery(states=("paused",)))
        assert (sandbox.sandbox_id, sandbox.metadata) == ("old1", {"team": "a"})
        key = store.check_api_key("cube_ab12secret")
        assert key is not None and key.name == "ops"
        assert [e.kind for e in store.events("old1")] == ["created"]
    finally:
        store.close()


def test_current_database_reopens_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "cube.db"
    store = SqliteStore(path)
    _, secret = store.create_api_key("kept")
    store.close()
    again = SqliteStore(path)
    try:
        assert schema_version(again._db) == len(MIGRATIONS)
        assert again.check_api_key(secret) is not None
    finally:
        again.close()


def test_migrations_apply_in_order_and_a_failing_one_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cube.db"
    _unversioned_database(path)
    db = sqlite3.connect(path, isolation_level=None)
    add_column = ("ALTER TABLE api_keys ADD COLUMN scope TEXT NOT NULL DEFAULT 'all'",)
    broken = ("CREATE TABLE half_done (x INTEGER)", "INSERT INTO no_such_table VALUES (1)")
    try:
        assert migrate(db, path, (*MIGRATIONS, add_column)) == list(range(1, len(MIGRATIONS) + 2))
        assert db.execute("SELECT key_id, scope FROM api_keys").fetchall() == [("k1", "all")]
        with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
            migrate(db, path, (*MIGRATIONS, add_column, broken))
        assert schema_version(db) == len(MIGRATIONS) + 1
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "half_done" not in tables
    finally:
        db.close()


def test_database_from_a_newer_cube_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cube.db"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 3}")
    db.close()
    with pytest.raises(DatabaseTooNew, match=f"schema version {len(MIGRATIONS) + 3}.*newer cube"):
        SqliteStore(path)
    db = sqlite3.connect(path)
    try:
        assert schema_version(db) == len(MIGRATIONS) + 3  # left as it was
    finally:
        db.close()


def test_cube_serve_on_a_newer_database_stops_with_the_reason(tmp_path: Path) -> None:
    state = tmp_path / "state"
    SqliteStore(state / "cube.db").close()
    db = sqlite3.connect(state / "cube.db")
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    env = {
        "PATH": os.environ["PATH"],
        "CUBE_CONFIG": "/nonexistent",
        "CUBE_STATE_DIR": str(state),
        "CUBE_RUN_DIR": str(tmp_path / "run"),
        "CUBE_CACHE_DIR": str(tmp_path / "cache"),
    }
    cube = Path(sys.executable).with_name("cube")
    result = subprocess.run([str(cube), "serve"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Error: " in result.stderr and "a newer cube used it" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "cube.pid").exists()
