"""The SQLite registry: one database file shared by every process of a host.

The file runs in WAL mode so that readers never block the writer, and every
write is a short ``BEGIN IMMEDIATE`` transaction, so concurrent writers queue
on the busy timeout instead of failing.  Each thread of each process has its
own connection; a connection inherited over ``fork()`` is never touched.

Completions are pushed, not polled (see :mod:`.sqlite_wakeups`); the schema
and statements are in :mod:`.sqlite_schema`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
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
    RegistryUnavailable,
    RequestSnapshot,
    StoredResponse,
    TaskRecord,
    TaskStatus,
    Tombstone,
    check_tombstone_ttl,
    lost_worker_response,
    require_final,
)
from .sqlite_schema import COLUMNS, PENDING, SCHEMA, SCHEMA_VERSION
from .sqlite_wakeups import SAFETY_NET, Wakeups, notify_directory

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
        self._closed = False
        self._ready = False
        self._inherited: list[_Process] = []
        self.notify_directory = notify_directory(self.path)
        self._process = _Process(self.notify_directory)
        _registries.add(self)
        try:
            create_private(self.path)
            self._create_schema()
            self._ready = True  # from now on a missing file was deleted: made again
        except BaseException:
            self.close()
            raise

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
        with self._write() as db:
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
            self._state().wakeups.publish([schema.QUEUE_WAKEUP])
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
        with self._state().wakeups.subscribe(schema.QUEUE_WAKEUP) as woken:
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
        with self._write() as db:
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
        with self._read() as db:
            (count,) = db.execute("SELECT queued FROM counters WHERE id = 1").fetchone()
        return int(count)

    def recover(self, task_id: str) -> TaskRecord | None:
        """A create here either stored or did not: nothing can land late."""
        return self.get(task_id)

    def get(self, task_id: str) -> TaskRecord | None:
        with self._read() as db:
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
        with self._read() as db:
            row = db.execute(
                "SELECT request_environ, request_body FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
        if row is None or row[0] is None:
            return None
        environ = {str(k): str(v) for k, v in json.loads(row[0]).items()}
        return RequestSnapshot(environ, bytes(row[1]))

    # -- transitions ---------------------------------------------------------

    def start(self, task_id: str, worker: str) -> TaskRecord | None:
        with self._write() as db:
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
        with self._write() as db:
            settled = schema.settle(
                db,
                "id = ? AND status = 'running' AND worker = ?",
                (task_id, worker),
                status,
                response,
            )
        if settled:
            self._state().wakeups.publish([task_id])
        return settled

    def fail(self, task_id: str, response: StoredResponse) -> bool:
        with self._write() as db:
            settled = schema.settle(
                db, f"id = ? AND {PENDING}", (task_id,), TaskStatus.FAILED, response
            )
        if settled:
            self._state().wakeups.publish([task_id])
        return settled

    def progress(self, task_id: str, worker: str, document: dict[str, object]) -> bool:
        data = json.dumps(document, separators=(",", ":"))
        with self._write() as db:
            return db.execute(schema.PROGRESS, (data, task_id, worker)).rowcount > 0

    def is_running(self, task_id: str, worker: str) -> bool:
        with self._read() as db:
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
        with self._state().wakeups.subscribe(task_id) as woken:
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
        with self._write() as db:
            return schema.delete(db, task_id, time.time(), self.tombstones)

    def cancel(self, task_id: str, response: StoredResponse) -> bool:
        with self._write() as db:
            settled = schema.settle(
                db, f"id = ? AND {PENDING}", (task_id,), TaskStatus.CANCELLED, response
            )
        if settled:
            self._state().wakeups.publish([task_id])
        return settled

    def gone(self, task_id: str) -> Tombstone | None:
        with self._read() as db:
            return schema.gone(db, task_id, time.time(), self.tombstones)

    # -- leases --------------------------------------------------------------

    def heartbeat(self, worker: str, lease: float) -> None:
        with self._write() as db:
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
        with self._write() as db:
            db.execute("DELETE FROM workers WHERE id = ?", (worker,))

    def reap(self, worker: str, limit: int = 100) -> list[TaskRecord]:
        now = time.time()
        requeued: list[TaskRecord] = []
        failed: list[str] = []
        requeued_on_queue = False
        with self._write() as db:
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
            self._state().wakeups.publish(
                [*failed, schema.QUEUE_WAKEUP] if requeued_on_queue else failed)
        return requeued

    # -- expiry --------------------------------------------------------------

    def expire(self, limit: int = 1000) -> int:
        with self._write() as db:
            return schema.expire(db, time.time(), limit, self.tombstones)

    def close(self) -> None:
        """Close this process's connections and its wake-up socket."""
        if self._closed:
            return
        self._closed = True
        _registries.discard(self)
        self._process.close()

    def __len__(self) -> int:
        with self._read() as db:
            return self._count(db)

    # -- connections and transactions ------------------------------------------

    def _state(self) -> _Process:
        if self._process.pid != os.getpid():
            self._after_fork()
        return self._process

    def _after_fork(self) -> None:
        """Drop what the parent process owns without closing its connections."""
        if self._process.pid == os.getpid():
            return
        # Closing a SQLite connection opened in the parent is unsafe: keep it alive, unused.
        self._inherited.append(self._process)
        self._process.wakeups.abandon()
        self._process = _Process(self.notify_directory)

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise RegistryUnavailable(f"SQLite registry {self.path} is closed")
        process = self._state()
        db: sqlite3.Connection | None = getattr(process.local, "db", None)
        # One stat a call: an old connection would go on writing into a deleted file.
        identity = _identity(self.path)
        if db is not None:
            if identity == process.local.file:
                return db
            return self._reopen(process, db)
        if identity is None and self._ready:  # deleted before this thread's first call
            return self._reopen(process, None)
        return self._open(process)

    def _open(self, process: _Process) -> sqlite3.Connection:
        """This thread's connection, on the file at ``path`` now."""
        db = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,  # close() closes every thread's connection
        )
        try:
            db.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            db.close()
            raise
        if not process.adopt(db):
            db.close()
            raise RegistryUnavailable(f"SQLite registry {self.path} is closed")
        process.local.file = _identity(self.path)
        return db

    def _reopen(self, process: _Process, stale: sqlite3.Connection | None) -> sqlite3.Connection:
        """The file was deleted or replaced under us: go on with the one at ``path``.

        Whoever finds it missing makes it again, under a lock shared by every
        process (a file beside it), after removing the old ``-wal`` and ``-shm``
        (they hold the deleted file's pages); every thread and process then
        reopens that one new file, whose schema is made if it lacks one.
        """
        if stale is not None:
            process.forget(stale)
        try:
            lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RegistryUnavailable(
                f"SQLite registry {self.path} was deleted and cannot be made again: {exc}"
            ) from exc
        try:
            _hold(lock)
            if _identity(self.path) is None:
                for suffix in ("-wal", "-shm", "-journal"):
                    with contextlib.suppress(OSError):
                        os.unlink(self.path + suffix)
                create_private(self.path)
            db = self._open(process)
            if process.announced != process.local.file:
                process.announced = process.local.file
                log.error("wsgi_async: SQLite registry %s was deleted or replaced while in use; "
                          "the tasks it held are lost; going on with a new file", self.path)
            self._create_schema()
        finally:
            os.close(lock)  # releases the lock
        return db

    def _create_schema(self) -> None:
        with self._errors():
            db = self._connection()
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise RegistryUnavailable(
                    f"SQLite registry {self.path} has schema version {version}; "
                    f"this version of wsgi_async reads version {SCHEMA_VERSION}"
                )
            mode = self._use_wal(db)
            if 0 < version < SCHEMA_VERSION:
                with self._write() as db:
                    (version,) = db.execute("PRAGMA user_version").fetchone()
                    for step in range(version or SCHEMA_VERSION, SCHEMA_VERSION):
                        for statement in schema.MIGRATIONS[step]:
                            db.execute(statement)
            if mode != "wal":
                raise RegistryUnavailable(
                    f"SQLite registry {self.path} cannot use WAL mode (got {mode!r}); "
                    "use a local file system"
                )
            with self._write() as db:
                for statement in SCHEMA:
                    db.execute(statement)

    def _use_wal(self, db: sqlite3.Connection) -> str:
        """Switch the file to WAL mode (once for its lifetime); return the mode it is in."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                (mode,) = db.execute("PRAGMA journal_mode").fetchone()
                if mode != "wal":
                    (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
                return str(mode)
            except sqlite3.OperationalError as exc:
                # Switching modes fails at once, without the busy handler, while
                # another process opens the file: only the first start-up can meet this.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Report a storage that cannot be used as :class:`RegistryUnavailable`."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise RegistryUnavailable(f"SQLite registry {self.path} is unavailable: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            if type(exc) is sqlite3.DatabaseError:  # corrupt, or not a database at all
                raise RegistryUnavailable(
                    f"SQLite registry {self.path} is unusable: {exc}"
                ) from exc
            if isinstance(exc, sqlite3.ProgrammingError) and self._closed:
                raise RegistryUnavailable(f"SQLite registry {self.path} is closed") from exc
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._errors():
            yield self._connection()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed whole or rolled back."""
        with self._errors():
            db = self._connection()
            # Threads of one process queue here, where hand-over is prompt; SQLite's
            # busy handler, which sleeps and retries, then only arbitrates between processes.
            writing = self._state().writing
            if not writing.acquire(timeout=self.busy_timeout):
                raise sqlite3.OperationalError("database is locked")
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
            finally:
                writing.release()

    @staticmethod
    def _count(db: sqlite3.Connection) -> int:
        (count,) = db.execute("SELECT tasks FROM counters WHERE id = 1").fetchone()
        return int(count)


def create_private(path: str) -> None:
    """Create the database file readable by its user only (0600), if it does not exist.

    It holds replayable requests, with their ``Authorization`` and ``Cookie``
    headers; SQLite gives its ``-wal`` and ``-shm`` files the same mode.  An
    existing file keeps its mode: a warning says when others can read it.
    """
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        with contextlib.suppress(OSError):
            if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
                log.warning("wsgi_async: SQLite registry %s can be read by other users; "
                            "it holds requests' headers: chmod 600 it", path)
    except OSError:
        pass  # a missing folder, say: connecting reports it


# -- per-process state -----------------------------------------------------------


class _Process:
    """What one process owns: its threads' connections and its wake-up socket."""

    def __init__(self, notify_directory: str) -> None:
        self.pid = os.getpid()
        self.local = threading.local()
        self.wakeups = Wakeups(notify_directory)
        self.closed = False
        self.writing = threading.Lock()
        self._lock = threading.Lock()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self.announced: tuple[int, int] | None = None  # the last new file logged

    def adopt(self, db: sqlite3.Connection) -> bool:
        """Keep the calling thread's new connection; close those of finished threads."""
        with self._lock:
            if self.closed:
                return False
            finished = [c for t, c in self._connections if not t.is_alive()]
            self._connections = [(t, c) for t, c in self._connections if t.is_alive()]
            self._connections.append((threading.current_thread(), db))
        self.local.db = db
        for stale in finished:
            stale.close()
        return True

    def forget(self, db: sqlite3.Connection) -> None:
        """Close the calling thread's connection to a file that was deleted or replaced."""
        with self._lock:
            self._connections = [(t, c) for t, c in self._connections if c is not db]
        self.local.db = None
        db.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            connections, self._connections = self._connections, []
        for _, db in connections:
            db.close()
        self.wakeups.close()


def _identity(path: str) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode); ``None`` when there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _hold(fd: int) -> None:
    """Wait for an exclusive ``flock`` on ``fd``, shared by every process (POSIX)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


_registries: weakref.WeakSet[SQLiteRegistry] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for registry in list(_registries):
        registry._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)

