"""The SQLite registry beyond the shared contract: processes, threads, files, fork."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import random
import signal
import socket
import sqlite3
import stat
import statistics
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from conftest import new_task, on_read
from wsgi_async.registry import (
    RegistryFull,
    RegistryUnavailable,
    RequestSnapshot,
    StoredResponse,
    TaskStatus,
    open_registry,
)
from wsgi_async.registry.sqlite import SQLiteRegistry

OK = StoredResponse("200 OK", (("Content-Type", "text/plain"),), b"\x00done\xff")
SPAWN = multiprocessing.get_context("spawn")


def answer(text: str) -> StoredResponse:
    return StoredResponse("200 OK", (("Content-Type", "text/plain"),), text.encode())


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "tasks.db"


@pytest.fixture
def reg(db_path: Path) -> Iterator[SQLiteRegistry]:
    registry = SQLiteRegistry(db_path)
    yield registry
    registry.close()


def stop(*processes: Any) -> None:
    """Join every process, killing those that do not end in time."""
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


# -- cross-process wake-ups ------------------------------------------------------


SUBSCRIBED = 2  # a wait reads, subscribes, then reads again: the read that follows it


def settle_on_request(path: str, pipe: Connection) -> None:
    """Child: for each task id received, start it, and once told, settle it."""
    registry = SQLiteRegistry(path)
    try:
        while True:
            message = pipe.recv()
            if message is None:
                return
            task_id, how = message
            registry.start(task_id, "child")
            assert pipe.recv() == "go"  # the parent's waiter is subscribed
            if how == "finish":
                registry.finish(task_id, "child", TaskStatus.DONE, OK)
            else:
                registry.fail(task_id, answer("failed"))
    finally:
        registry.close()
        pipe.close()


@pytest.mark.parametrize("how", ["finish", "fail"])
def test_a_waiter_is_woken_by_a_settle_in_another_process(reg: SQLiteRegistry, how: str) -> None:
    parent_end, child_end = SPAWN.Pipe()
    child = SPAWN.Process(target=settle_on_request, args=(reg.path, child_end))
    child.start()
    child_end.close()
    latencies = []
    try:
        for _ in range(10):
            task = reg.create(new_task("child"))
            parent_end.send((task.id, how))
            on_read(reg, task.id, SUBSCRIBED, lambda: parent_end.send("go"))
            got = reg.wait(task.id, 10)  # one wait: a lost wake-up is not retried
            woken = time.time()
            expected = TaskStatus.DONE if how == "finish" else TaskStatus.FAILED
            assert got is not None and got.status is expected
            assert got.finished_at is not None
            latencies.append(woken - got.finished_at)
        parent_end.send(None)
    finally:
        stop(child)
        parent_end.close()
    assert child.exitcode == 0
    print(
        f"\ncross-process wake-up: median {statistics.median(latencies) * 1000:.2f} ms,"
        f" max {max(latencies) * 1000:.2f} ms over {len(latencies)} tasks"
    )
    assert max(latencies) < 0.5  # well under the 1 s safety net


# -- 4 processes x 8 threads -------------------------------------------------------

PROCESSES = 4
THREADS = 8
OWN_TASKS = 100  # per thread
SHARED_TASKS = 100


def hammer(path: str, index: int, shared: list[str], ready: Any, results: Any) -> None:
    """Child: 8 threads run tasks of their own and race every other thread on the shared ones."""
    errors: list[str] = []
    wins: list[tuple[str, str]] = []
    own: list[str] = []
    elapsed = 0.0
    lock = threading.Lock()
    go = threading.Event()

    def run(registry: SQLiteRegistry, thread: int) -> None:
        worker = f"p{index}t{thread}"
        order = list(shared)
        random.Random(worker).shuffle(order)
        chunk = math.ceil(len(order) / OWN_TASKS)
        go.wait(60)
        try:
            for i in range(OWN_TASKS):
                task = registry.create(new_task(worker), idempotency_key=f"{worker}:{i}")
                assert registry.start(task.id, worker) is not None
                assert registry.finish(task.id, worker, TaskStatus.DONE, answer(task.id))
                assert not registry.finish(task.id, worker, TaskStatus.DONE, OK)
                with lock:
                    own.append(task.id)
                for task_id in order[i * chunk : (i + 1) * chunk]:
                    if thread % 2:
                        won = registry.fail(task_id, answer(worker))
                    else:
                        won = registry.finish(task_id, "shared", TaskStatus.DONE, answer(worker))
                    if won:
                        with lock:
                            wins.append((task_id, worker))
        except BaseException:
            with lock:
                errors.append(traceback.format_exc())

    registry = None
    try:
        registry = SQLiteRegistry(path)
        threads = [threading.Thread(target=run, args=(registry, n)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        ready.wait(60)  # every process is up
        began = time.monotonic()
        go.set()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
    except BaseException:
        go.set()
        errors.append(traceback.format_exc())
    finally:
        if registry is not None:
            registry.close()
        results.put({"errors": errors, "wins": wins, "own": own, "elapsed": elapsed})


def test_four_processes_of_eight_threads(reg: SQLiteRegistry) -> None:
    shared = []
    for _ in range(SHARED_TASKS):
        task = reg.create(new_task("shared"))
        reg.start(task.id, "shared")
        shared.append(task.id)
    ready = SPAWN.Barrier(PROCESSES + 1)
    results = SPAWN.Queue()
    children = [
        SPAWN.Process(target=hammer, args=(reg.path, n, shared, ready, results))
        for n in range(PROCESSES)
    ]
    try:
        for child in children:
            child.start()
        ready.wait(60)
        reports = [results.get(timeout=300) for _ in children]
    finally:
        stop(*children)
        results.close()
        results.join_thread()
    assert [child.exitcode for child in children] == [0] * PROCESSES

    errors = [error for report in reports for error in report["errors"]]
    assert errors == [], errors[0]
    wins = Counter(task_id for report in reports for task_id, _ in report["wins"])
    assert sorted(wins) == sorted(shared) and set(wins.values()) == {1}
    for report in reports:
        for task_id, winner in report["wins"]:
            got = reg.get(task_id)
            assert got is not None and got.response == answer(winner)
    own = [task_id for report in reports for task_id in report["own"]]
    assert len(own) == len(set(own)) == PROCESSES * THREADS * OWN_TASKS
    for task_id in own:
        got = reg.get(task_id)
        assert got is not None and got.status is TaskStatus.DONE
        assert got.response == answer(task_id)
    assert len(reg) == len(own) + len(shared)

    elapsed = max(report["elapsed"] for report in reports)
    writes = len(own) * 4 + len(shared) * PROCESSES * THREADS
    print(
        f"\n{PROCESSES}x{THREADS}: {len(own)} create/start/finish cycles and"
        f" {len(shared) * PROCESSES * THREADS} racing finish/fail in {elapsed:.2f}s:"
        f" {len(own) / elapsed:.0f} tasks/s, {writes / elapsed:.0f} write transactions/s"
    )


# -- files ------------------------------------------------------------------------


def test_results_survive_reopening(db_path: Path) -> None:
    first = SQLiteRegistry(db_path)
    try:
        snapshot = RequestSnapshot({"PATH_INFO": "/r"}, b"\x00again")
        done = first.create(new_task(fingerprint="f" * 64), idempotency_key="k")
        pending = first.create(new_task(replay=True), request=snapshot)
        first.start(done.id, "w1")
        first.finish(done.id, "w1", TaskStatus.DONE, OK)
    finally:
        first.close()
    again = SQLiteRegistry(db_path)
    try:
        got = again.get(done.id)
        assert got is not None and got.status is TaskStatus.DONE
        assert got.response == OK and got.fingerprint == "f" * 64
        assert again.create(new_task(), idempotency_key="k").id == done.id
        assert again.request(pending.id) == snapshot
        assert len(again) == 2
    finally:
        again.close()


def test_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(RegistryUnavailable, match="unable to open"):
        SQLiteRegistry(tmp_path / "missing" / "tasks.db")


def test_a_directory_is_not_a_database(tmp_path: Path) -> None:
    with pytest.raises(RegistryUnavailable, match=str(tmp_path)):
        SQLiteRegistry(tmp_path)


def test_a_file_that_is_not_a_database_is_unavailable(db_path: Path) -> None:
    db_path.write_bytes(b"not a database " * 100)
    with pytest.raises(RegistryUnavailable, match="not a database"):
        SQLiteRegistry(db_path)


def test_a_database_locked_past_the_busy_timeout_is_unavailable(db_path: Path) -> None:
    registry = SQLiteRegistry(db_path, busy_timeout=0.2)
    task = registry.create(new_task())
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        began = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="locked"):
            registry.create(new_task())
        assert time.monotonic() - began < 5
        with pytest.raises(RegistryUnavailable):
            registry.start(task.id, "w1")
        assert registry.get(task.id) is not None  # readers are not blocked in WAL mode
        holder.execute("ROLLBACK")
        assert len(registry) == 1  # nothing half-written
        assert registry.start(task.id, "w1") is not None
    finally:
        holder.close()
        registry.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": ""}, "path"),
        ({"path": ":memory:"}, "path"),
        ({"max_tasks": 0}, "max_tasks must be at least 1, got 0"),
        ({"busy_timeout": 0}, "busy_timeout must be a positive number of seconds, got 0"),
        ({"busy_timeout": float("nan")}, "busy_timeout"),
    ],
)
def test_arguments_are_validated(db_path: Path, kwargs: dict[str, Any], message: str) -> None:
    kwargs = {"path": db_path, **kwargs}
    with pytest.raises(ValueError, match=message):
        SQLiteRegistry(**kwargs)


def test_from_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    relative = SQLiteRegistry.from_url("sqlite:///rel/tasks.db?busy_timeout=2", max_tasks=7)
    absolute = open_registry(f"sqlite:///{tmp_path}/abs.db", max_tasks=3)
    try:
        assert relative.path == str(tmp_path / "rel" / "tasks.db")
        assert relative.max_tasks == 7 and relative.busy_timeout == 2.0
        assert isinstance(absolute, SQLiteRegistry)
        assert absolute.path == str(tmp_path / "abs.db") and absolute.max_tasks == 3
    finally:
        relative.close()
        absolute.close()


@pytest.mark.parametrize(
    "url",
    ["sqlite://", "sqlite:///", "sqlite://host/tasks.db", "sqlite:///t.db?bogus=1",
     "sqlite:///t.db?busy_timeout=soon", "sqlite:///t.db?busy_timeout=-1"],
)  # fmt: skip
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        SQLiteRegistry.from_url(url)


# -- expiry, limits, reaping -------------------------------------------------------


def test_an_expired_task_is_gone_before_expire_runs(reg: SQLiteRegistry) -> None:
    task = reg.create(new_task(result_ttl=0.2), idempotency_key="k")
    reg.start(task.id, "w1")
    reg.finish(task.id, "w1", TaskStatus.DONE, OK)
    assert reg.get(task.id) is not None
    time.sleep(0.3)
    assert reg.get(task.id) is None
    assert reg.wait(task.id, 0.1) is None
    assert reg.create(new_task(), idempotency_key="k").id != task.id


def test_a_full_registry_drops_expired_tasks_before_refusing(db_path: Path) -> None:
    registry = SQLiteRegistry(db_path, max_tasks=2)
    try:
        for _ in range(2):
            task = registry.create(new_task(result_ttl=0.2))
            registry.start(task.id, "w1")
            registry.finish(task.id, "w1", TaskStatus.DONE, OK)
        time.sleep(0.3)
        registry.create(new_task())  # no expire() call: create makes room itself
        registry.create(new_task())
        assert len(registry) == 2
        with pytest.raises(RegistryFull):
            registry.create(new_task())
        assert len(registry) == 2
    finally:
        registry.close()


def test_hot_paths_use_indexes(reg: SQLiteRegistry) -> None:
    db = sqlite3.connect(reg.path)
    try:
        queries = [
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE expires_at <= 1"
            " ORDER BY expires_at LIMIT 10)",
            "SELECT id FROM tasks WHERE worker = 'w' AND status IN ('queued', 'running')"
            " ORDER BY created_at LIMIT 10",
            "SELECT id FROM workers WHERE lease_expires <= 1 AND id != 'w'"
            " ORDER BY lease_expires LIMIT 10",
            "SELECT id FROM tasks WHERE idempotency_key = 'k'",
        ]
        for query in queries:
            plan = " ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + query))
            assert "SCAN" not in plan and "TEMP B-TREE" not in plan, (query, plan)
    finally:
        db.close()


def reap_in_child(path: str, worker: str, go: Any, results: Any) -> None:
    requeued: list[str] = []
    report: list[str] | None = None
    try:
        registry = SQLiteRegistry(path)
        try:
            go.wait(60)
            for _ in range(30):  # 80 tasks, 7 a reap: enough for one reaper alone
                requeued += [record.id for record in registry.reap(worker, limit=7)]
            report = requeued
        finally:
            registry.close()
    except BaseException:
        traceback.print_exc()
    finally:
        results.put(report)


def test_concurrent_reapers_settle_each_task_once(reg: SQLiteRegistry) -> None:
    reg.heartbeat("dead", 0.1)
    snapshot = RequestSnapshot({"PATH_INFO": "/r"}, b"")
    replayable = [reg.create(new_task("dead", replay=True), request=snapshot).id for _ in range(40)]
    lost = [reg.create(new_task("dead")).id for _ in range(40)]
    time.sleep(0.2)
    go = SPAWN.Event()
    results = SPAWN.Queue()
    children = [
        SPAWN.Process(target=reap_in_child, args=(reg.path, f"alive{n}", go, results))
        for n in range(3)
    ]
    try:
        for child in children:
            child.start()
        go.set()
        reports = [results.get(timeout=120) for _ in children]
        assert None not in reports, "a reaper failed (see its stderr)"
        requeued = [task_id for report in reports for task_id in report]
    finally:
        stop(*children)
        results.close()
        results.join_thread()
    assert sorted(requeued) == sorted(replayable)
    for task_id in lost:
        got = reg.get(task_id)
        assert got is not None and got.status is TaskStatus.FAILED
        assert got.response is not None and b"worker_lost" in got.response.body
    for task_id in replayable:
        got = reg.get(task_id)
        assert got is not None and got.status is TaskStatus.QUEUED
        assert got.worker is not None and got.worker.startswith("alive")
    assert reg.reap("alive0") == []


# -- notification sockets ------------------------------------------------------------


def sockets(registry: SQLiteRegistry) -> list[str]:
    directory = Path(registry.notify_directory)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_the_socket_is_removed_on_close(db_path: Path) -> None:
    # Registries of other tests may still be closing: count only the thread this one starts.
    before = {t for t in threading.enumerate() if t.name == "wsgi-async-wakeups"}
    registry = SQLiteRegistry(db_path)
    try:
        assert sockets(registry) == []  # nothing listens until something waits
        registry.wait(registry.create(new_task("idle")).id, 0.05)  # a pending task subscribes
        assert len(sockets(registry)) == 1
        assert sockets(registry)[0].startswith(f"{os.getpid():x}-")
    finally:
        registry.close()
    assert sockets(registry) == []
    assert {t for t in threading.enumerate() if t.name == "wsgi-async-wakeups"} <= before


def test_a_dead_process_socket_is_removed_by_the_next_completion(reg: SQLiteRegistry) -> None:
    reg.wait(reg.create(new_task("idle")).id, 0.05)  # a pending task subscribes
    stale = Path(reg.notify_directory) / "dead-00000000.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(stale))
    assert stale.exists()
    task = reg.create(new_task())
    reg.start(task.id, "w1")
    reg.finish(task.id, "w1", TaskStatus.DONE, OK)
    assert not stale.exists()


def test_close_wakes_waiters(db_path: Path) -> None:
    registry = SQLiteRegistry(db_path)
    task = registry.create(new_task())
    outcome: list[object] = []

    def waiter() -> None:
        try:
            outcome.append(registry.wait(task.id, 30))
        except RegistryUnavailable as exc:
            outcome.append(exc)

    subscribed = threading.Event()
    on_read(registry, task.id, SUBSCRIBED, subscribed.set)
    thread = threading.Thread(target=waiter)
    thread.start()
    assert subscribed.wait(5)
    registry.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], RegistryUnavailable)


def reap_child(pid: int, timeout: float = 10) -> int:
    """The exit code of a forked child, killed if it has not ended within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# -- fork -------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_forked_child_uses_its_own_connection_and_socket(reg: SQLiteRegistry) -> None:
    inherited = reg.connections.connection()
    reg.wait(reg.create(new_task("idle")).id, 0.05)  # the parent listens before the fork
    parent_socket = sockets(reg)
    for_child = reg.create(new_task("child"))
    for_parent = reg.create(new_task("parent"))
    reg.start(for_parent.id, "parent")
    waiting, subscribed = os.pipe()

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            assert reg.connections.connection() is not inherited
            assert reg.start(for_child.id, "child") is not None
            assert reg.finish(for_child.id, "child", TaskStatus.DONE, OK)
            on_read(reg, for_parent.id, SUBSCRIBED, lambda: os.write(subscribed, b"!"))
            got = reg.wait(for_parent.id, 10)  # woken through the child's own socket
            assert got is not None and got.status is TaskStatus.DONE
            assert got.finished_at is not None and time.time() - got.finished_at < 0.5
            reg.close()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)

    try:
        got = reg.wait(for_child.id, 10)
        assert got is not None and got.status is TaskStatus.DONE
        os.close(subscribed)
        assert os.read(waiting, 1) == b"!"  # the child waits, subscribed
        assert reg.finish(for_parent.id, "parent", TaskStatus.DONE, OK)
    finally:
        exitcode = reap_child(pid)
        os.close(waiting)
    assert exitcode == 0
    # The child's close() left the parent's connection and socket alone.
    assert reg.connections.connection() is inherited
    assert sockets(reg) == parent_socket
    assert reg.get(for_child.id) is not None


def test_each_thread_has_its_own_connection(reg: SQLiteRegistry) -> None:
    mine = reg.connections.connection()
    theirs: list[sqlite3.Connection] = []

    def use() -> None:
        theirs.append(reg.connections.connection())
        reg.get("missing")

    for _ in range(2):
        thread = threading.Thread(target=use)
        thread.start()
        thread.join()
    assert theirs[0] is not mine and theirs[1] is not theirs[0]
    with pytest.raises(sqlite3.ProgrammingError):  # closed when the next thread connected
        theirs[0].execute("SELECT 1")
    assert reg.connections.connection() is mine


def test_a_connection_from_another_pid_is_never_used(reg: SQLiteRegistry) -> None:
    inherited = reg.connections.connection()
    task = reg.create(new_task())
    reg.connections.process.pid = -1  # as if the registry had crossed a fork unnoticed
    try:
        assert reg.get(task.id) is not None
        assert reg.connections.connection() is not inherited
    finally:
        inherited.close()  # safe here: this process opened it


@pytest.mark.parametrize("returning", [True, False])
def test_start_with_and_without_update_returning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, returning: bool
) -> None:
    import wsgi_async.registry.sqlite_schema as module

    monkeypatch.setattr(module, "RETURNING", returning and module.RETURNING)
    registry = SQLiteRegistry(str(tmp_path / "tasks.db"))
    try:
        record = registry.create(new_task(timeout=3.0))
        started = registry.start(record.id, "w1")
        assert started is not None and started.status is TaskStatus.RUNNING
        assert started.attempts == 1 and started.timeout == 3.0
        assert started == registry.get(record.id)
        assert registry.start(record.id, "w1") is None
        assert registry.start("x" * 32, "w1") is None
    finally:
        registry.close()


# -- file permissions ------------------------------------------------------------------


def test_the_files_are_private_to_their_user(db_path: Path) -> None:
    """The database holds replayable requests (Authorization, Cookie): 0600 whatever the umask."""
    previous = os.umask(0o022)
    try:
        registry = SQLiteRegistry(db_path)
        try:
            snapshot = RequestSnapshot({"HTTP_AUTHORIZATION": "Bearer secret"}, b"")
            task = registry.create(new_task(replay=True), request=snapshot)
            registry.wait(task.id, 0.05)  # subscribes: the notify directory exists
            modes = {
                name: stat.S_IMODE(os.stat(f"{db_path}{name}").st_mode)
                for name in ("", "-wal", "-shm")
            }
            assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
            notify = os.lstat(registry.notify_directory)
            assert stat.S_ISDIR(notify.st_mode) and stat.S_IMODE(notify.st_mode) == 0o700
        finally:
            registry.close()
    finally:
        os.umask(previous)


def test_a_notify_directory_made_by_someone_else_is_not_used(
    db_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A path another local user created first (here a symlink to their folder) is refused."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    os.symlink(theirs, f"{db_path}.notify")
    registry = SQLiteRegistry(db_path)
    try:
        task = registry.create(new_task())
        registry.start(task.id, "w1")
        threading.Timer(0.2, registry.finish, (task.id, "w1", TaskStatus.DONE, OK)).start()
        got = registry.wait(task.id, 5)  # still answers, by the safety net's re-reads
        assert got is not None and got.status is TaskStatus.DONE
        assert list(theirs.iterdir()) == []  # no socket of ours in their folder
        assert "cannot listen for task completions" in caplog.text
    finally:
        registry.close()


# -- the file deleted under a running registry ---------------------------------------


def create_on_request(path: str, pipe: Connection) -> None:
    """Child: a registry opened before the file is deleted; creates a task when asked."""
    registry = SQLiteRegistry(path)
    try:
        registry.create(new_task("child"))  # its connection is open on the first file
        pipe.send("ready")
        while pipe.recv():
            try:
                pipe.send(registry.create(new_task("child")).id)
            except Exception as exc:  # reported to the parent, which fails the test
                pipe.send(repr(exc))
    finally:
        registry.close()
        pipe.close()


@pytest.mark.parametrize("leftovers", ["kept", "deleted"])
def test_a_deleted_database_file_is_recreated_for_every_thread_and_process(
    db_path: Path, caplog: pytest.LogCaptureFixture, leftovers: str
) -> None:
    """``rm tasks.db`` (with or without its -wal and -shm) while processes use it: every
    thread and process goes on with one new file, instead of old connections writing
    into the deleted one while new ones find an empty file without tables."""
    registry = SQLiteRegistry(db_path)
    ours, theirs = SPAWN.Pipe()
    child = SPAWN.Process(target=create_on_request, args=(str(db_path), theirs), daemon=True)
    child.start()
    try:
        assert ours.poll(60) and ours.recv() == "ready"
        before = registry.create(new_task())
        opened = threading.Event()
        go = threading.Event()
        made: list[str] = []

        def old_thread() -> None:  # a thread whose connection was opened on the old file
            registry.get(before.id)
            opened.set()
            go.wait(10)
            made.append(registry.create(new_task()).id)

        thread = threading.Thread(target=old_thread)
        thread.start()
        assert opened.wait(10)
        os.unlink(db_path)
        if leftovers == "deleted":
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{db_path}{suffix}")
        made.append(registry.create(new_task()).id)  # the thread that noticed first
        go.set()
        thread.join(10)
        ours.send(True)
        assert ours.poll(30)
        made.append(ours.recv())
        fresh: list[str] = []
        newcomer = threading.Thread(target=lambda: fresh.append(registry.create(new_task()).id))
        newcomer.start()
        newcomer.join(10)
        made += fresh
        assert len(made) == 4, made
        reader = SQLiteRegistry(db_path)  # a process started after the delete
        try:
            assert all(reader.get(task_id) is not None for task_id in made), made
            assert reader.get(before.id) is None  # lost with the deleted file
        finally:
            reader.close()
        assert "deleted or replaced" in caplog.text
        ours.send(False)
    finally:
        ours.close()
        stop(child)
        registry.close()
