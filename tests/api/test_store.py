"""The node's SQLite store: what the hot create path asks of it, and its WAL checkpoints, which
run off the event loop (`checkpoint_wal` in a worker thread), never inside a statement."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from pathlib import Path

import trio

from appliance.master.store import SqliteStore, checkpoint_wal
from appliance.records import DEAD, LIVE_STATES, PAUSED, RUNNING, SandboxRecord


def record(sandbox_id: str, state: str, team_id: str) -> SandboxRecord:
    now = time.time()
    return SandboxRecord(
        sandbox_id, "code-interpreter", None, "c", state, now, now + 300, 1, 256, 1024, "t", team_id=team_id
    )


def rows_in_database_file(db_path: Path, copy: Path) -> int:
    """The sandboxes the database file itself holds (its WAL left out): what checkpoints wrote."""
    shutil.copy(db_path, copy)
    with contextlib.closing(sqlite3.connect(copy)) as db:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sandboxes'").fetchone() is None:
            return 0  # not even the schema is checkpointed yet
        return int(db.execute("SELECT COUNT(*) FROM sandboxes").fetchone()[0])


def test_live_sandboxes_are_counted_per_team(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "cube.db")
    try:
        for i, (state, team) in enumerate([(RUNNING, "a"), (PAUSED, "a"), (DEAD, "a"), (RUNNING, "b")]):
            store.put_sandbox(record(f"s{i}", state, team))
        assert store.count_sandboxes(LIVE_STATES, "a") == 2
        assert store.count_sandboxes(LIVE_STATES, "b") == 1
        assert store.count_sandboxes((DEAD,), "a") == 1
        assert store.count_sandboxes(LIVE_STATES, "c") == 0
    finally:
        store.close()


def test_commits_never_checkpoint_and_the_checkpointer_does(tmp_path: Path) -> None:
    db_path = tmp_path / "cube.db"
    store = SqliteStore(db_path)
    try:
        before = rows_in_database_file(db_path, tmp_path / "copy0.db")
        for i in range(
            3000
        ):  # ~3 pages each with its index: far past SQLite's default 1000-page auto-checkpoint
            store.put_sandbox(record(f"s{i}", RUNNING, "a"))
        assert rows_in_database_file(db_path, tmp_path / "copy1.db") == before == 0
        store.checkpoint()
        assert rows_in_database_file(db_path, tmp_path / "copy2.db") == 3000
    finally:
        store.close()


async def test_the_service_s_checkpointer_writes_the_wal_into_the_database(tmp_path: Path) -> None:
    db_path = tmp_path / "cube.db"
    store = SqliteStore(db_path)
    try:
        store.put_sandbox(record("s0", RUNNING, "a"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(checkpoint_wal, store, 0.01)
            with trio.fail_after(30):
                while rows_in_database_file(db_path, tmp_path / "copy.db") == 0:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
