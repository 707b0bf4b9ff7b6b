"""Connections to the SQLite registry's file: per thread, per process, fork-safe.

Each thread of each process has its own connection, and a connection
inherited over ``fork()`` is never touched.  Every write is one short
``BEGIN IMMEDIATE`` transaction.  A file deleted or replaced under running
processes is noticed at each thread's next call (one ``stat``) and made again,
once, for every thread and process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Iterator

from . import sqlite_schema as schema
from .base import RegistryUnavailable
from .sqlite_schema import SCHEMA, SCHEMA_VERSION
from .sqlite_wakeups import Wakeups

log = logging.getLogger("wsgi_async.registry.sqlite")


class Connections:
    """The file at ``path``: this process's connections to it, and its wake-ups."""

    def __init__(self, path: str, busy_timeout: float, notify_directory: str) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.notify_directory = notify_directory
        self.closed = False
        self._ready = False
        self._inherited: list[Process] = []
        self.process = Process(notify_directory)
        _open_files.add(self)
        try:
            create_private(self.path)
            self.create_schema()
            self._ready = True  # from now on a missing file was deleted: made again
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close this process's connections and its wake-up socket."""
        if self.closed:
            return
        self.closed = True
        _open_files.discard(self)
        self.process.close()

    def state(self) -> Process:
        if self.process.pid != os.getpid():
            self.after_fork()
        return self.process

    def after_fork(self) -> None:
        """Drop what the parent process owns without closing its connections."""
        if self.process.pid == os.getpid():
            return
        # Closing a SQLite connection opened in the parent is unsafe: keep it alive, unused.
        self._inherited.append(self.process)
        self.process.wakeups.abandon()
        self.process = Process(self.notify_directory)

    def connection(self) -> sqlite3.Connection:
        if self.closed:
            raise RegistryUnavailable(f"SQLite registry {self.path} is closed")
        process = self.state()
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

    def _open(self, process: Process) -> sqlite3.Connection:
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

    def _reopen(self, process: Process, stale: sqlite3.Connection | None) -> sqlite3.Connection:
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
            self.create_schema()
        finally:
            os.close(lock)  # releases the lock
        return db

    def create_schema(self) -> None:
        with self.errors():
            db = self.connection()
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise RegistryUnavailable(
                    f"SQLite registry {self.path} has schema version {version}; "
                    f"this version of wsgi_async reads version {SCHEMA_VERSION}"
                )
            mode = self._use_wal(db)
            if 0 < version < SCHEMA_VERSION:
                with self.write() as db:
                    (version,) = db.execute("PRAGMA user_version").fetchone()
                    for step in range(version or SCHEMA_VERSION, SCHEMA_VERSION):
                        for statement in schema.MIGRATIONS[step]:
                            db.execute(statement)
            if mode != "wal":
                raise RegistryUnavailable(
                    f"SQLite registry {self.path} cannot use WAL mode (got {mode!r}); "
                    "use a local file system"
                )
            with self.write() as db:
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
    def errors(self) -> Iterator[None]:
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
            if isinstance(exc, sqlite3.ProgrammingError) and self.closed:
                raise RegistryUnavailable(f"SQLite registry {self.path} is closed") from exc
            raise

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self.errors():
            yield self.connection()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed whole or rolled back."""
        with self.errors():
            db = self.connection()
            # Threads of one process queue here, where hand-over is prompt; SQLite's
            # busy handler, which sleeps and retries, then only arbitrates between processes.
            writing = self.state().writing
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


class Process:
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


_open_files: weakref.WeakSet[Connections] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for connections in list(_open_files):
        connections.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)

