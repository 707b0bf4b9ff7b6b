"""The SQLite registry: one database file shared by every process of a host.

The file runs in WAL mode so that readers never block the writer, and every
write is a short ``BEGIN IMMEDIATE`` transaction, so concurrent writers queue
on the busy timeout instead of failing.  Connections (per thread, per process,
fork-safe) are in :mod:`.sqlite_connections`; completions are pushed, not
polled (:mod:`.sqlite_wakeups`); the schema and statements are in
:mod:`.sqlite_schema`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

from . import sqlite_schema as schema
from .base import (
    TOMBSTONE_TTL,
    Capabilities,
    Claimed,
    QueueFull,
    RegistryError,
    RegistryFull,
    RequestSnapshot,
    StoredResponse,
    TaskRecord,
    TaskStatus,
    Tombstone,
    check_tombstone_ttl,
    lost_worker_response,
    require_final,
)
from .sqlite_connections import Connections
from .sqlite_schema import COLUMNS, PENDING
from .sqlite_wakeups import SAFETY_NET, notify_directory

__all__ = ["SQLiteRegistry"]

log = logging.getLogger(__name__)

#: How many expired tasks ``create`` drops when the registry is full.
EXPIRE_ON_FULL = 100


class SQLiteRegistry:
    """Registry in one SQLite file, shared by the processes of a host (``sqlite:///path``)."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        shared=True, queue=True, blocking_wait=True
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_tasks: int = 10_000,
        busy_timeout: float = 30.0,
        tombstone_ttl: float = TOMBSTONE_TTL,
    ) -> None:
        name = os.fspath(path)
        if not isinstance(name, str) or not name or name == ":memory:" or "\0" in name:
            raise ValueError(f"path must name a database file, got {name!r}")
        if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1:
            raise ValueError(f"max_tasks must be at least 1, got {max_tasks!r}")
        if (
            isinstance(busy_timeout, bool)
            or not isinstance(busy_timeout, (int, float))
            or not math.isfinite(busy_timeout)
            or busy_timeout <= 0
        ):
            raise ValueError(
                f"busy_timeout must be a positive number of seconds, got {busy_timeout!r}"
            )
        check_tombstone_ttl(tombstone_ttl)
        self.path = os.path.abspath(name)
        self.max_tasks = max_tasks
        self.tombstones = schema.Tombstones(float(tombstone_ttl), max_tasks)
        self.busy_timeout = float(busy_timeout)
        self.notify_directory = notify_directory(self.path)
        #: This process's connections to the file (public for tests of fork safety).
        self.connections = Connections(self.path, self.busy_timeout, self.notify_directory)

    @classmethod
    def from_url(
        cls, url: str, *, max_tasks: int = 10_000, tombstone_ttl: float = TOMBSTONE_TTL
    ) -> SQLiteRegistry:
        """Open ``sqlite:///relative/tasks.db`` or ``sqlite:////absolute/tasks.db``.

        The only query option is ``busy_timeout`` (seconds).
        """
        parts = urlsplit(url)
        if parts.scheme != "sqlite" or parts.netloc or len(parts.path) < 2:
            raise ValueError(
                f"registry: a SQLite URL is sqlite:///relative/path or "
                f"sqlite:////absolute/path, got {url!r}"
            )
        busy_timeout = 30.0
        for option, value in parse_qsl(parts.query, keep_blank_values=True):
            if option != "busy_timeout":
                raise ValueError(f"registry: unknown SQLite option {option!r} in {url!r}")
            try:
                busy_timeout = float(value)
            except ValueError:
                raise ValueError(
                    f"registry: busy_timeout must be a number of seconds, got {value!r}"
                ) from None
        return cls(unquote(parts.path[1:]), max_tasks=max_tasks, busy_timeout=busy_timeout,
                   tombstone_ttl=tombstone_ttl)

    def __repr__(self) -> str:
        return f"<SQLiteRegistry {self.path!r}>"

    # -- creation and lookup -------------------------------------------------

    def create(
        self,
        record: TaskRecord,
        request: RequestSnapshot | None = None,
        idempotency_key: str | None = None,
    ) -> TaskRecord:
        return self._insert(record, request, idempotency_key, None)

    def _insert(
        self,
        record: TaskRecord,
        request: RequestSnapshot | None,
        idempotency_key: str | None,
        max_queued: int | None,
    ) -> TaskRecord:
        """Store ``record``; on the queue (with no holder) when ``max_queued`` is given."""
        now = time.time()
        queue = max_queued is not None
        with self.connections.write() as db:
            if idempotency_key is not None:
                row = db.execute(
                    f"SELECT {COLUMNS} FROM tasks WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None and not schema.expired(row, now):
                    return schema.record(row)
                if row is not None:
                    db.execute("DELETE FROM tasks WHERE id = ?", (row[0],))
            if self._count(db) >= self.max_tasks:
                schema.expire(db, now, EXPIRE_ON_FULL, self.tombstones)
                if self._count(db) >= self.max_tasks:
                    raise RegistryFull(f"the registry holds its maximum of {self.max_tasks} tasks")
            if max_queued is not None:
                (queued,) = db.execute("SELECT queued FROM counters WHERE id = 1").fetchone()
                if queued >= max_queued:
                    raise QueueFull(f"{queued} tasks wait for a worker, and max_queued is "
                                    f"{max_queued}")
            response = record.response
            try:
                db.execute(
                    schema.INSERT,
                    (
                        record.id,
                        record.route,
                        record.status.value,
                        record.created_at,
                        record.started_at,
                        record.finished_at,
                        record.expires_at,
                        None if queue else record.worker,
                        record.owner,
                        record.fingerprint,
                        record.attempts,
                        int(record.replay),
                        record.timeout,
                        record.result_ttl,
                        None if response is None else response.headers_json(),
                        None if response is None else response.body,
                        None if request is None else json.dumps(request.environ),
                        None if request is None else request.body,
                        idempotency_key,
                        int(queue),
                    ),
                )
            except sqlite3.IntegrityError:
                raise RegistryError(f"a task with id {record.id!r} already exists") from None
        stored = record.copy()
        if queue:
            stored.worker = None
            self.connections.state().wakeups.publish([schema.QUEUE_WAKEUP])
        return stored

    # -- the queue -------------------------------------------------------------

    def enqueue(
        self,
        record: TaskRecord,
        request: RequestSnapshot,
        idempotency_key: str | None = None,
        *,
        max_queued: int,
    ) -> TaskRecord:
        return self._insert(record, request, idempotency_key, max_queued)

    def claim(
        self, worker: str, routes: Sequence[str], limit: int, wait: float, lease: float
    ) -> list[Claimed]:
        """Claim in one ``UPDATE ... RETURNING``; wait for a queue wake-up while none is queued.

        A claim is held under ``worker``'s lease (its heartbeat): when that
        lapses, :meth:`reap` puts the task back on the queue or fails it.
        """
        if limit < 1 or not routes:
            return []
        claimed = self._claim(worker, routes, limit)
        if claimed or wait <= 0:
            return claimed
        deadline = time.monotonic() + wait
        with self.connections.state().wakeups.subscribe(schema.QUEUE_WAKEUP) as woken:
            while True:
                claimed = self._claim(worker, routes, limit)
                remaining = deadline - time.monotonic()
                if claimed or remaining <= 0:
                    return claimed
                woken.wait(min(remaining, SAFETY_NET))
                woken.clear()

    def _claim(self, worker: str, routes: Sequence[str], limit: int) -> list[Claimed]:
        pick = schema.CLAIMABLE.format(routes=", ".join("?" * len(routes)))
        params = (worker, *routes, limit)
        with self.connections.write() as db:
            if schema.RETURNING:
                rows = db.execute(
                    f"UPDATE tasks SET worker = ? WHERE id IN ({pick})"
                    f" RETURNING {COLUMNS}, request_environ, request_body", params
                ).fetchall()
            else:
                ids = [row[0] for row in db.execute(pick, params[1:]).fetchall()]
                marks = ", ".join("?" * len(ids))
                db.execute(f"UPDATE tasks SET worker = ? WHERE id IN ({marks})", (worker, *ids))
                rows = db.execute(
                    f"SELECT {COLUMNS}, request_environ, request_body FROM tasks"
                    f" WHERE id IN ({marks})", ids
                ).fetchall()
        claimed = []
        for row in sorted(rows, key=lambda row: row[3]):  # oldest first
            environ = {str(k): str(v) for k, v in json.loads(row[-2] or "{}").items()}
            claimed.append(Claimed(schema.record(row[:-2]), RequestSnapshot(
                environ, bytes(row[-1] or b""))))
        return claimed

    def queued(self) -> int:
        with self.connections.read() as db:
            (count,) = db.execute("SELECT queued FROM counters WHERE id = 1").fetchone()
        return int(count)

    def recover(self, task_id: str) -> TaskRecord | None:
        """A create here either stored or did not: nothing can land late."""
        return self.get(task_id)

    def get(self, task_id: str) -> TaskRecord | None:
        with self.connections.read() as db:
            row = db.execute(schema.GET, (task_id,)).fetchone()
        if row is None:
            return None
        columns, progress = row[:-1], row[-1]
        if schema.expired(columns, time.time()):
            return None
        record = schema.record(columns)
        if progress is not None:
            record.progress = json.loads(progress)
        return record

    def request(self, task_id: str) -> RequestSnapshot | None:
        with self.connections.read() as db:
            row = db.execute(
                "SELECT request_environ, request_body FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
        if row is None or row[0] is None:
            return None
        environ = {str(k): str(v) for k, v in json.loads(row[0]).items()}
        return RequestSnapshot(environ, bytes(row[1]))

    # -- transitions ---------------------------------------------------------

    def start(self, task_id: str, worker: str) -> TaskRecord | None:
        with self.connections.write() as db:
            params = (time.time(), task_id, worker)
            if schema.RETURNING:  # one statement instead of two
                rows = db.execute(schema.START + f" RETURNING {COLUMNS}", params).fetchall()
                if not rows:
                    return None
                row = rows[0]
            else:
                if not db.execute(schema.START, params).rowcount:
                    return None
                row = db.execute(f"SELECT {COLUMNS} FROM tasks WHERE id = ?",
                                 (task_id,)).fetchone()
        return schema.record(row)

    def finish(
        self, task_id: str, worker: str, status: TaskStatus, response: StoredResponse
    ) -> bool:
        require_final(status)
        with self.connections.write() as db:
            settled = schema.settle(
                db,
                "id = ? AND status = 'running' AND worker = ?",
                (task_id, worker),
                status,
                response,
            )
        if settled:
            self.connections.state().wakeups.publish([task_id])
        return settled

    def fail(self, task_id: str, response: StoredResponse) -> bool:
        with self.connections.write() as db:
            settled = schema.settle(
                db, f"id = ? AND {PENDING}", (task_id,), TaskStatus.FAILED, response
            )
        if settled:
            self.connections.state().wakeups.publish([task_id])
        return settled

    def progress(self, task_id: str, worker: str, document: dict[str, object]) -> bool:
        data = json.dumps(document, separators=(",", ":"))
        with self.connections.write() as db:
            return db.execute(schema.PROGRESS, (data, task_id, worker)).rowcount > 0

    def is_running(self, task_id: str, worker: str) -> bool:
        with self.connections.read() as db:
            row = db.execute(
                "SELECT 1 FROM tasks WHERE id = ? AND status = 'running' AND worker = ?",
                (task_id, worker),
            ).fetchone()
        return row is not None

    def wait(self, task_id: str, timeout: float) -> TaskRecord | None:
        return self.wait_if(task_id, timeout, None)

    def wait_if(
        self, task_id: str, timeout: float, accept: Callable[[TaskRecord], bool] | None
    ) -> TaskRecord | None:
        """:meth:`wait`, but ``None`` at once if the first read is not accepted."""
        deadline = time.monotonic() + timeout
        # A plain read first: subscribing costs more than a read, and most
        # tasks asked about are already final, or not the caller's.
        record = self.get(task_id)
        if record is None or (accept is not None and not accept(record)):
            return None
        if record.status.is_final or timeout <= 0:
            return record
        # Subscribe, then read again: a completion after that read always wakes us.
        with self.connections.state().wakeups.subscribe(task_id) as woken:
            latest = self.get(task_id)
            if latest is None:
                return None
            record = latest
            while True:
                remaining = deadline - time.monotonic()
                if record.status.is_final or remaining <= 0:
                    return record
                woken.wait(min(remaining, SAFETY_NET))
                woken.clear()
                latest = self.get(task_id)
                if latest is None:
                    return None
                record = latest

    def delete(self, task_id: str) -> bool:
        with self.connections.write() as db:
            return schema.delete(db, task_id, time.time(), self.tombstones)

    def cancel(self, task_id: str, response: StoredResponse) -> bool:
        with self.connections.write() as db:
            settled = schema.settle(
                db, f"id = ? AND {PENDING}", (task_id,), TaskStatus.CANCELLED, response
            )
        if settled:
            self.connections.state().wakeups.publish([task_id])
        return settled

    def gone(self, task_id: str) -> Tombstone | None:
        with self.connections.read() as db:
            return schema.gone(db, task_id, time.time(), self.tombstones)

    # -- leases --------------------------------------------------------------

    def heartbeat(self, worker: str, lease: float) -> None:
        with self.connections.write() as db:
            now = time.time()
            row = db.execute("SELECT beat, grace FROM leases WHERE id = 1").fetchone()
            grace = None if row is None else row[1]
            if row is not None and now - row[0] > lease / 2:
                # Nobody renewed a lease for a while: an outage every worker suffered.
                # None is reaped until each has had a whole lease to renew its own.
                grace = now + lease
            db.execute(
                "INSERT OR REPLACE INTO leases (id, beat, grace) VALUES (1, ?, ?)", (now, grace)
            )
            db.execute(
                "INSERT OR REPLACE INTO workers (id, lease_expires) VALUES (?, ?)",
                (worker, now + lease),
            )

    def retire(self, worker: str) -> None:
        with self.connections.write() as db:
            db.execute("DELETE FROM workers WHERE id = ?", (worker,))

    def reap(self, worker: str, limit: int = 100) -> list[TaskRecord]:
        now = time.time()
        requeued: list[TaskRecord] = []
        failed: list[str] = []
        requeued_on_queue = False
        with self.connections.write() as db:
            grace = db.execute("SELECT grace FROM leases WHERE id = 1").fetchone()
            if grace is not None and grace[0] is not None and grace[0] > now:
                return []
            dead = db.execute(
                "SELECT id FROM workers WHERE lease_expires <= ? AND id != ?"
                " ORDER BY lease_expires LIMIT ?",
                (now, worker, max(limit, 1)),
            ).fetchall()
            for (dead_worker,) in dead:
                room = max(0, limit - len(requeued) - len(failed))
                held = db.execute(
                    "SELECT id, replay, request_environ IS NOT NULL, queue, status FROM tasks"
                    f" WHERE worker = ? AND {PENDING} ORDER BY created_at LIMIT ?",
                    (dead_worker, room + 1),
                ).fetchall()
                for task_id, replay, has_request, queue, status in held[:room]:
                    if queue and has_request and (replay or status == "queued"):
                        # Back on the queue, for any worker: the reaper may be a web process.
                        db.execute(
                            "UPDATE tasks SET status = 'queued', worker = NULL, started_at = NULL"
                            " WHERE id = ?",
                            (task_id,),
                        )
                        db.execute("DELETE FROM progress WHERE id = ?", (task_id,))
                        requeued_on_queue = True
                    elif replay and has_request:
                        db.execute(
                            "UPDATE tasks SET status = 'queued', worker = ?, started_at = NULL"
                            " WHERE id = ?",
                            (worker, task_id),
                        )
                        db.execute("DELETE FROM progress WHERE id = ?", (task_id,))
                        row = db.execute(
                            f"SELECT {COLUMNS} FROM tasks WHERE id = ?", (task_id,)
                        ).fetchone()
                        requeued.append(schema.record(row))
                    else:
                        response = lost_worker_response(task_id)
                        schema.settle(db, "id = ?", (task_id,), TaskStatus.FAILED, response, now)
                        failed.append(task_id)
                if len(held) <= room:
                    db.execute("DELETE FROM workers WHERE id = ?", (dead_worker,))
        if failed or requeued_on_queue:
            self.connections.state().wakeups.publish(
                [*failed, schema.QUEUE_WAKEUP] if requeued_on_queue else failed)
        return requeued

    # -- expiry --------------------------------------------------------------

    def expire(self, limit: int = 1000) -> int:
        with self.connections.write() as db:
            return schema.expire(db, time.time(), limit, self.tombstones)

    def close(self) -> None:
        """Close this process's connections and its wake-up socket."""
        self.connections.close()

    def __len__(self) -> int:
        with self.connections.read() as db:
            return self._count(db)

    @staticmethod
    def _count(db: sqlite3.Connection) -> int:
        (count,) = db.execute("SELECT tasks FROM counters WHERE id = 1").fetchone()
        return int(count)
