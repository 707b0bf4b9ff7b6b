"""The SQLite registry's schema and statements, and how a row becomes a record."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from .base import StoredResponse, TaskRecord, TaskStatus, Tombstone

__all__ = [
    "CLAIMABLE", "COLUMNS", "GET", "INSERT", "MIGRATIONS", "PENDING", "PROGRESS",
    "QUEUE_WAKEUP", "RETURNING", "SCHEMA", "SCHEMA_VERSION", "START", "expire", "expired",
    "Tombstones", "delete", "gone", "record", "settle", "trim",
]

SCHEMA_VERSION = 2

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tasks (
        id TEXT PRIMARY KEY,
        route TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        expires_at REAL,
        worker TEXT,
        owner TEXT,
        fingerprint TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        replay INTEGER NOT NULL DEFAULT 0,
        timeout REAL,
        result_ttl REAL NOT NULL,
        response_head TEXT,
        response_body BLOB,
        request_environ TEXT,
        request_body BLOB,
        idempotency_key TEXT UNIQUE,
        queue INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE INDEX IF NOT EXISTS tasks_pending_by_worker ON tasks (worker, created_at)
        WHERE status IN ('queued', 'running')""",
    """CREATE INDEX IF NOT EXISTS tasks_by_expiry ON tasks (expires_at)
        WHERE expires_at IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, lease_expires REAL NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS workers_by_lease ON workers (lease_expires)""",
    # When a lease was last renewed (by anyone), and no reaping before ``grace``.
    """CREATE TABLE IF NOT EXISTS leases (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        beat REAL NOT NULL,
        grace REAL
    )""",
    # One row counting the tasks, so that enforcing max_tasks never runs COUNT(*).
    """CREATE TABLE IF NOT EXISTS counters (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        tasks INTEGER NOT NULL,
        queued INTEGER NOT NULL DEFAULT 0
    )""",
    """INSERT OR IGNORE INTO counters (id, tasks) VALUES (1, 0)""",
    # The queue (executor="workers"): a queued task of the queue with no holder is
    # claimable; ``queued`` counts the queue's queued tasks for max_queued, kept by triggers.
    """CREATE INDEX IF NOT EXISTS tasks_claimable ON tasks (route, created_at)
        WHERE queue = 1 AND status = 'queued' AND worker IS NULL""",
    """CREATE TRIGGER IF NOT EXISTS tasks_queued_insert AFTER INSERT ON tasks
        WHEN NEW.queue = 1 AND NEW.status = 'queued'
        BEGIN UPDATE counters SET queued = queued + 1 WHERE id = 1; END""",
    """CREATE TRIGGER IF NOT EXISTS tasks_queued_update AFTER UPDATE OF status ON tasks
        WHEN NEW.queue = 1 AND (OLD.status = 'queued') != (NEW.status = 'queued')
        BEGIN UPDATE counters SET queued = queued
            + CASE WHEN NEW.status = 'queued' THEN 1 ELSE -1 END WHERE id = 1; END""",
    """CREATE TRIGGER IF NOT EXISTS tasks_queued_delete AFTER DELETE ON tasks
        WHEN OLD.queue = 1 AND OLD.status = 'queued'
        BEGIN UPDATE counters SET queued = queued - 1 WHERE id = 1; END""",
    """CREATE TRIGGER IF NOT EXISTS tasks_count_insert AFTER INSERT ON tasks
        BEGIN UPDATE counters SET tasks = tasks + 1 WHERE id = 1; END""",
    """CREATE TRIGGER IF NOT EXISTS tasks_count_delete AFTER DELETE ON tasks
        BEGIN UPDATE counters SET tasks = tasks - 1 WHERE id = 1; END""",
    # The progress of running tasks, beside the tasks (a new table needs no migration);
    # a row goes with its task.
    """CREATE TABLE IF NOT EXISTS progress (id TEXT PRIMARY KEY, document TEXT NOT NULL)""",
    """CREATE TRIGGER IF NOT EXISTS tasks_progress_delete AFTER DELETE ON tasks
        BEGIN DELETE FROM progress WHERE id = OLD.id; END""",
    # What is left of forgotten tasks, for tombstone_ttl: ``seq`` orders them oldest
    # first, so that keeping at most max_tasks drops a range of the primary key.
    """CREATE TABLE IF NOT EXISTS tombstones (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        owner TEXT,
        expires_at REAL NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS tombstones_by_expiry ON tombstones (expires_at)""",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

# From each older version to the next, run before SCHEMA (a version-1 file holds no
# queued task of the queue, so its counter starts at 0).
MIGRATIONS = {
    1: (
        "ALTER TABLE tasks ADD COLUMN queue INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE counters ADD COLUMN queued INTEGER NOT NULL DEFAULT 0",
    ),
}

COLUMNS = (
    "id, route, status, created_at, started_at, finished_at, worker, owner, fingerprint,"
    " attempts, replay, timeout, result_ttl, response_head, response_body, expires_at"
)
PENDING = "status IN ('queued', 'running')"
INSERT = (
    "INSERT INTO tasks (id, route, status, created_at, started_at, finished_at,"
    " expires_at, worker, owner, fingerprint, attempts, replay, timeout,"
    " result_ttl, response_head, response_body, request_environ, request_body,"
    f" idempotency_key, queue) VALUES ({', '.join('?' * 20)})"
)
# The oldest claimable tasks of some routes (``{routes}``: one ``?`` per route).
CLAIMABLE = (
    "SELECT id FROM tasks WHERE queue = 1 AND status = 'queued' AND worker IS NULL"
    " AND route IN ({routes}) ORDER BY created_at LIMIT ?"
)
# What workers waiting for the queue subscribe to (not a task id: those have no ':').
QUEUE_WAKEUP = "wsgi-async:queue"
START = (
    "UPDATE tasks SET status = 'running', started_at = ?, attempts = attempts + 1"
    " WHERE id = ? AND status = 'queued' AND worker = ?"
)
# A task read with its progress (the last column).
GET = (
    f"SELECT {COLUMNS}, (SELECT document FROM progress WHERE progress.id = tasks.id)"
    " FROM tasks WHERE id = ?"
)
# Progress is stored only while the task runs under the writer.
PROGRESS = (
    "INSERT OR REPLACE INTO progress (id, document)"
    " SELECT id, ? FROM tasks WHERE id = ? AND status = 'running' AND worker = ?"
)
RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)  # UPDATE ... RETURNING


def record(row: tuple[Any, ...]) -> TaskRecord:
    (
        task_id, route, status, created_at, started_at, finished_at, worker, owner,
        fingerprint, attempts, replay, timeout, result_ttl, response_head, response_body, _,
    ) = row  # fmt: skip
    response = None
    if response_head is not None:
        response = StoredResponse.from_parts(response_head, bytes(response_body))
    return TaskRecord(
        id=task_id,
        route=route,
        status=TaskStatus(status),
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        worker=worker,
        owner=owner,
        fingerprint=fingerprint,
        attempts=attempts,
        replay=bool(replay),
        timeout=timeout,
        result_ttl=result_ttl,
        response=response,
    )


def expired(row: tuple[Any, ...], now: float) -> bool:
    expires_at = row[-1]
    return expires_at is not None and bool(expires_at <= now)


def settle(
    db: sqlite3.Connection,
    where: str,
    params: tuple[str, ...],
    status: TaskStatus,
    response: StoredResponse,
    now: float | None = None,
) -> bool:
    now = time.time() if now is None else now
    cursor = db.execute(
        "UPDATE tasks SET status = ?, response_head = ?, response_body = ?, finished_at = ?,"
        " expires_at = ? + result_ttl, request_environ = NULL, request_body = NULL"
        f" WHERE {where}",
        (status.value, response.headers_json(), response.body, now, now, *params),
    )
    return cursor.rowcount > 0


# The tasks ``expire`` drops: the same rows for the tombstones and the delete.
_EXPIRED = "id IN (SELECT id FROM tasks WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)"
# A tombstone for each task ``WHERE {where}``, lasting until ``{until}``; a cancelled
# task stays "cancelled".
_BURY = (
    "INSERT OR REPLACE INTO tombstones (id, status, owner, expires_at)"
    " SELECT id, CASE status WHEN 'cancelled' THEN 'cancelled' ELSE ? END, owner, {until}"
    " FROM tasks WHERE {where}"
)


def expire(db: sqlite3.Connection, now: float, limit: int, tombstones: Tombstones) -> int:
    """Drop up to ``limit`` expired tasks, each leaving a tombstone, and expired tombstones."""
    # An expired task's tombstone lasts from its expiry, whenever the sweep comes.
    db.execute(_BURY.format(until="expires_at + ?", where=_EXPIRED),
               ("expired", tombstones.ttl, now, limit))
    cursor = db.execute(f"DELETE FROM tasks WHERE {_EXPIRED}", (now, limit))
    dropped = cursor.rowcount
    db.execute(
        "DELETE FROM tombstones WHERE seq IN (SELECT seq FROM tombstones WHERE expires_at <= ?"
        " ORDER BY expires_at LIMIT ?)",
        (now, limit),
    )
    if dropped:
        trim(db, tombstones.limit)
    return dropped


def delete(db: sqlite3.Connection, task_id: str, now: float, tombstones: Tombstones) -> bool:
    """Forget a task, leaving a ``"deleted"`` (or ``"cancelled"``) tombstone."""
    db.execute(_BURY.format(until="?", where="id = ?"),
               ("deleted", now + tombstones.ttl, task_id))
    if not db.execute("DELETE FROM tasks WHERE id = ?", (task_id,)).rowcount:
        return False
    trim(db, tombstones.limit)
    return True


def trim(db: sqlite3.Connection, limit: int) -> None:
    """Keep the newest ``limit`` tombstones: a range of ``seq``, found by its index."""
    db.execute(
        "DELETE FROM tombstones WHERE seq <= (SELECT max(seq) FROM tombstones) - ?", (limit,)
    )


def gone(
    db: sqlite3.Connection, task_id: str, now: float, tombstones: Tombstones
) -> Tombstone | None:
    """The tombstone of ``task_id``, or the one an expired task not swept yet will leave."""
    row = db.execute(
        "SELECT status, owner FROM tombstones WHERE id = ? AND expires_at > ?", (task_id, now)
    ).fetchone()
    if row is None:
        row = db.execute(
            "SELECT CASE status WHEN 'cancelled' THEN 'cancelled' ELSE 'expired' END, owner"
            " FROM tasks WHERE id = ? AND expires_at <= ? AND expires_at + ? > ?",
            (task_id, now, tombstones.ttl, now),
        ).fetchone()
    return None if row is None else Tombstone(task_id, str(row[0]), row[1])


@dataclass(frozen=True, slots=True)
class Tombstones:
    """How long tombstones last, and how many are kept."""

    ttl: float
    limit: int

