"""The registry's queue (``capabilities.queue``): enqueue, claim, the bound, take-over.

Runs on every backend with a queue (SQLite, Redis); the memory registry has
none and says so.  Real storage, real clocks: leases are short, loops bounded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import _cleanup, make_registry, new_task
from wsgi_async import QueueFull, RegistryError
from wsgi_async.registry import MemoryRegistry, Registry, TaskStatus
from wsgi_async.registry.base import RequestSnapshot, StoredResponse
from wsgi_async.registry.redis import RedisRegistry

ROUTE = "^/r"
REQUEST = RequestSnapshot({"REQUEST_METHOD": "POST", "PATH_INFO": "/r"}, b"\x00body\xff")
OK = StoredResponse("200 OK", (("Content-Type", "text/plain"),), b"ok")


@pytest.fixture(params=["sqlite", "redis"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    registry = make_registry(str(request.param), tmp_path)
    assert registry.capabilities.queue
    yield registry
    _cleanup(registry)


def test_memory_registry_has_no_queue() -> None:
    registry = MemoryRegistry()
    assert not registry.capabilities.queue
    with pytest.raises(RegistryError, match="no queue"):
        registry.enqueue(new_task(), REQUEST, max_queued=10)
    with pytest.raises(RegistryError, match="no queue"):
        registry.claim("w1", ["^/r"], 1, 0.0, 15.0)
    registry.create(new_task())
    assert registry.queued() == 0  # a task in its own process's pool is not on a queue


def test_a_claimed_task_carries_its_request_and_runs_once(queue: Registry) -> None:
    stored = queue.enqueue(new_task(worker="web"), REQUEST, max_queued=10)
    assert stored.worker is None and stored.status is TaskStatus.QUEUED
    assert queue.queued() == 1
    assert len(queue.claim("w1", [ROUTE], 10, 0, 5)) == 1
    assert queue.claim("w2", [ROUTE], 10, 0.2, 5) == []  # claimed once only
    record = queue.get(stored.id)
    assert record is not None and record.worker == "w1"
    started = queue.start(stored.id, "w1")
    assert started is not None and started.status is TaskStatus.RUNNING
    assert queue.queued() == 0
    assert queue.finish(stored.id, "w1", TaskStatus.DONE, OK)
    done = queue.get(stored.id)
    assert done is not None and done.response == OK
    assert queue.claim("w2", [ROUTE], 10, 0, 5) == []


def test_claim_returns_the_request_as_stored(queue: Registry) -> None:
    stored = queue.enqueue(new_task(), REQUEST, max_queued=10)
    (claimed,) = queue.claim("w1", [ROUTE], 1, 0, 5)
    assert claimed.record.id == stored.id
    assert claimed.record.worker == "w1"
    assert claimed.request == REQUEST


def test_claim_takes_only_its_routes_and_at_most_limit(queue: Registry) -> None:
    elsewhere = new_task()
    elsewhere.route = "^/other"
    other = queue.enqueue(elsewhere, REQUEST, max_queued=10)
    mine = [queue.enqueue(new_task(), REQUEST, max_queued=10).id for _ in range(3)]
    first = queue.claim("w1", [ROUTE], 2, 0, 5)
    second = queue.claim("w1", [ROUTE], 2, 0, 5)
    assert len(first) == 2 and len(second) == 1
    assert sorted(c.record.id for c in first + second) == sorted(mine)
    (theirs,) = queue.claim("w2", ["^/other"], 5, 0, 5)
    assert theirs.record.id == other.id


def test_a_blocking_claim_wakes_when_a_task_is_queued(queue: Registry) -> None:
    import threading

    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.extend(queue.claim("w1", [ROUTE], 1, 5, 5)))
    waiter.start()
    time.sleep(0.3)
    began = time.monotonic()
    queue.enqueue(new_task(), REQUEST, max_queued=10)
    waiter.join(10)
    assert len(got) == 1
    assert time.monotonic() - began < 2.0


def test_past_max_queued_nothing_is_stored(queue: Registry) -> None:
    for _ in range(3):
        queue.enqueue(new_task(), REQUEST, max_queued=3)
    refused = new_task()
    with pytest.raises(QueueFull):
        queue.enqueue(refused, REQUEST, max_queued=3)
    assert queue.get(refused.id) is None
    assert queue.queued() == 3
    # A task that left the queue (claimed and started) frees a place.
    (claimed,) = queue.claim("w1", [ROUTE], 1, 0, 5)
    queue.start(claimed.record.id, "w1")
    queue.enqueue(new_task(), REQUEST, max_queued=3)
    # Failed or deleted queued tasks leave the count too.
    waiting = queue.enqueue(new_task(), REQUEST, max_queued=4)
    assert queue.fail(waiting.id, OK)
    assert queue.queued() == 3


def test_an_idempotency_key_returns_the_queued_task(queue: Registry) -> None:
    first = queue.enqueue(new_task(), REQUEST, "key", max_queued=10)
    again = queue.enqueue(new_task(), REQUEST, "key", max_queued=10)
    assert again.id == first.id
    assert queue.queued() == 1


@pytest.mark.parametrize("replay", [True, False])
def test_a_dead_workers_running_task_is_requeued_or_lost(queue: Registry, replay: bool) -> None:
    stored = queue.enqueue(new_task(replay=replay), REQUEST, max_queued=10)
    queue.heartbeat("dead", 0.2)
    queue.claim("dead", [ROUTE], 1, 0, 0.2)
    queue.start(stored.id, "dead")
    time.sleep(0.3)
    queue.heartbeat("web", 10)
    assert queue.reap("web") == []  # never handed to the reaper: it may be a web process
    record = queue.get(stored.id)
    assert record is not None
    if replay:
        assert (record.status, record.worker) == (TaskStatus.QUEUED, None)
        assert queue.queued() == 1
        (claimed,) = queue.claim("w2", [ROUTE], 1, 2, 5)
        assert claimed.record.id == stored.id and claimed.request == REQUEST
        started = queue.start(stored.id, "w2")
        assert started is not None and started.attempts == 2
    else:
        assert record.status is TaskStatus.FAILED and record.response is not None
        assert b"worker_lost" in record.response.body
        assert queue.queued() == 0


def test_a_dead_workers_unstarted_claim_goes_back_on_the_queue(queue: Registry) -> None:
    stored = queue.enqueue(new_task(), REQUEST, max_queued=10)  # no replay: it never ran
    queue.heartbeat("dead", 0.2)
    queue.claim("dead", [ROUTE], 1, 0, 0.2)
    time.sleep(0.3)
    queue.heartbeat("web", 10)
    assert queue.reap("web") == []
    (claimed,) = queue.claim("w2", [ROUTE], 1, 2, 5)
    assert claimed.record.id == stored.id


@pytest.fixture
def redis_queue(tmp_path: Path) -> Iterator[RedisRegistry]:
    registry = make_registry("redis", tmp_path)
    assert isinstance(registry, RedisRegistry)
    yield registry
    _cleanup(registry)


def test_redis_stream_keeps_only_unacknowledged_entries(redis_queue: RedisRegistry) -> None:
    stream = redis_queue.prefix + "stream:" + ROUTE
    ids = [redis_queue.enqueue(new_task(), REQUEST, max_queued=10).id for _ in range(4)]
    assert redis_queue.client.xlen(stream) == 4
    claimed = redis_queue.claim("w1", [ROUTE], 3, 0, 5)
    for task in claimed:
        redis_queue.start(task.record.id, "w1")
        redis_queue.finish(task.record.id, "w1", TaskStatus.DONE, OK)
    assert redis_queue.client.xlen(stream) == 1  # acknowledged entries are deleted
    redis_queue.delete(ids[-1] if ids[-1] not in {c.record.id for c in claimed} else ids[0])
    assert redis_queue.client.xlen(stream) == 0
    assert redis_queue.queued() == 0
    assert redis_queue.client.xpending(stream, "workers")["pending"] == 0


def test_redis_entry_read_by_a_lost_consumer_is_autoclaimed(redis_queue: RedisRegistry) -> None:
    stored = redis_queue.enqueue(new_task(), REQUEST, max_queued=10)
    stream = redis_queue.prefix + "stream:" + ROUTE
    # A worker read the entry and died before it claimed the task.
    redis_queue.client.xreadgroup("workers", "ghost", {stream: ">"}, count=1)
    assert redis_queue.claim("w2", [ROUTE], 1, 0, 0.3) == []
    time.sleep(0.4)
    (claimed,) = make_registry_like(redis_queue).claim("w2", [ROUTE], 1, 0, 0.3)
    assert claimed.record.id == stored.id and claimed.request == REQUEST


def make_registry_like(registry: RedisRegistry) -> RedisRegistry:
    """Another process's view of the same Redis registry (its own XAUTOCLAIM clock)."""
    return RedisRegistry(registry.client, prefix=registry.prefix)


def test_a_version_1_sqlite_file_gets_the_queue(tmp_path: Path) -> None:
    """A file made before the queue existed is migrated in place, its tasks kept."""
    import sqlite3

    from wsgi_async.registry.sqlite import SQLiteRegistry

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("""CREATE TABLE tasks (
            id TEXT PRIMARY KEY, route TEXT NOT NULL, status TEXT NOT NULL,
            created_at REAL NOT NULL, started_at REAL, finished_at REAL, expires_at REAL,
            worker TEXT, owner TEXT, fingerprint TEXT, attempts INTEGER NOT NULL DEFAULT 0,
            replay INTEGER NOT NULL DEFAULT 0, timeout REAL, result_ttl REAL NOT NULL,
            response_head TEXT, response_body BLOB, request_environ TEXT, request_body BLOB,
            idempotency_key TEXT UNIQUE)""")
        db.execute("CREATE TABLE counters (id INTEGER PRIMARY KEY CHECK (id = 1),"
                   " tasks INTEGER NOT NULL)")
        db.execute("INSERT INTO counters VALUES (1, 1)")
        db.execute("INSERT INTO tasks (id, route, status, created_at, worker, result_ttl)"
                   " VALUES ('old-task-id-0123456789ab', '^/r', 'queued', 1.0, 'w0', 300)")
        db.execute("PRAGMA user_version = 1")
    db.close()
    registry = SQLiteRegistry(path)
    try:
        old = registry.get("old-task-id-0123456789ab")
        assert old is not None and old.worker == "w0"
        stored = registry.enqueue(new_task(), REQUEST, max_queued=10)
        assert registry.queued() == 1
        (claimed,) = registry.claim("w1", [ROUTE], 5, 0, 5)
        assert claimed.record.id == stored.id
    finally:
        registry.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 2
    db.close()


def test_redis_idle_consumers_of_lost_workers_are_dropped(
    redis_queue: RedisRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsgi_async.registry.redis as redis_module

    monkeypatch.setattr(redis_module, "PRUNE_AFTER", 0.2)
    stream = redis_queue.prefix + "stream:" + ROUTE
    redis_queue.claim("ghost", [ROUTE], 1, 0, 5)  # a worker that read, then went away
    busy = redis_queue.enqueue(new_task(), REQUEST, max_queued=10)
    (held,) = make_registry_like(redis_queue).claim("holder", [ROUTE], 1, 0, 5)
    assert held.record.id == busy.id
    time.sleep(0.3)
    make_registry_like(redis_queue).claim("w2", [ROUTE], 1, 0, 5)
    names = {c["name"].decode() for c in redis_queue.client.xinfo_consumers(stream, "workers")}
    assert "ghost" not in names  # held nothing: forgotten
    assert "holder" in names  # holds an unacknowledged entry: kept
