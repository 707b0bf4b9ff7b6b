"""The contract every registry backend fulfils, run against each of them."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

from conftest import (
    SUBSCRIBED_READ,
    _cleanup,
    make_registry,
    new_task,
    on_read,
    start_listener,
)
from wsgi_async.registry import (
    Registry,
    RegistryFull,
    RequestSnapshot,
    StoredResponse,
    TaskRecord,
    TaskStatus,
)

OK = StoredResponse(
    "200 OK",
    (("Content-Type", "application/octet-stream"), ("X-Latin", "caf\u00e9")),
    bytes(range(256)) * 4,
)
BOOM = StoredResponse("500 Internal Server Error", (("Content-Type", "text/plain"),), b"boom")


def test_create_and_get_round_trip(registry: Registry) -> None:
    record = new_task(timeout=5.0, result_ttl=60.0, owner="abc", fingerprint="f" * 64)
    created = registry.create(record)
    assert created.id == record.id
    got = registry.get(record.id)
    assert got is not None
    assert got.status is TaskStatus.QUEUED
    assert got.route == "^/r"
    assert got.owner == "abc"
    assert got.fingerprint == "f" * 64
    assert got.replay is False and got.attempts == 0 and got.worker == "w1"
    assert got.timeout == 5.0
    assert got.result_ttl == 60.0
    assert got.created_at == pytest.approx(record.created_at, abs=1e-3)
    assert got.response is None and got.started_at is None


def test_create_keeps_every_field_exactly(registry: Registry) -> None:
    # Non-ASCII text, quotes and backslashes, a stored response and an empty key.
    record = TaskRecord(id=new_task().id, route="^/caf\u00e9/\"x\"\\d+\u2603", worker="w1",
                        owner="o\u00fc", attempts=3, status=TaskStatus.DONE, started_at=1.5,
                        finished_at=time.time(), response=OK, replay=True)
    created = registry.create(record, idempotency_key="")
    assert created == record
    got = registry.get(record.id)
    assert got is not None
    assert (got.route, got.owner, got.attempts, got.status, got.replay) == (
        record.route, "o\u00fc", 3, TaskStatus.DONE, True)
    assert got.response == OK and got.started_at == 1.5
    again = registry.create(new_task(), idempotency_key="")
    assert again.id == record.id


def test_start_returns_every_field_exactly(registry: Registry) -> None:
    record = TaskRecord(id=new_task().id, route="^/caf\u00e9/\"x\"\\d+/\u2603", worker="w1",
                        owner="o\u00fc", timeout=2.5, fingerprint="f" * 64, replay=True,
                        result_ttl=60.0)
    registry.create(record, RequestSnapshot({"PATH_INFO": "/"}, b""), idempotency_key="k")
    started = registry.start(record.id, "w1")
    assert started is not None and started == registry.get(record.id)
    assert (started.route, started.owner, started.timeout, started.fingerprint) == (
        record.route, "o\u00fc", 2.5, "f" * 64)
    assert (started.status, started.attempts, started.replay, started.worker) == (
        TaskStatus.RUNNING, 1, True, "w1")
    assert started.started_at is not None and started.response is None
    assert started.created_at == pytest.approx(record.created_at, abs=1e-3)


def test_unknown_task_is_none(registry: Registry) -> None:
    assert registry.get("nope") is None
    assert registry.start("nope", "w1") is None
    assert registry.finish("nope", "w1", TaskStatus.DONE, OK) is False
    assert registry.delete("nope") is False
    assert registry.request("nope") is None


def test_recover_answers_a_stored_task_and_none_for_one_never_stored(
    registry: Registry,
) -> None:
    stored = registry.create(new_task())
    recovered = registry.recover(stored.id)
    assert recovered is not None and recovered.id == stored.id
    assert recovered.status is TaskStatus.QUEUED
    assert registry.recover("n" * 32) is None


def test_start_is_conditional(registry: Registry) -> None:
    record = registry.create(new_task())
    assert registry.start(record.id, "other") is None
    started = registry.start(record.id, "w1")
    assert started is not None
    assert started.status is TaskStatus.RUNNING
    assert started.attempts == 1
    assert started.started_at is not None
    assert registry.start(record.id, "w1") is None


def test_finish_stores_the_response_byte_for_byte(registry: Registry) -> None:
    record = registry.create(new_task())
    assert registry.finish(record.id, "w1", TaskStatus.DONE, OK) is False  # not running yet
    registry.start(record.id, "w1")
    assert registry.finish(record.id, "w2", TaskStatus.DONE, OK) is False
    assert registry.finish(record.id, "w1", TaskStatus.DONE, OK) is True
    got = registry.get(record.id)
    assert got is not None
    assert got.status is TaskStatus.DONE
    assert got.response == OK
    assert got.finished_at is not None
    assert registry.finish(record.id, "w1", TaskStatus.FAILED, BOOM) is False
    assert registry.get(record.id).response == OK  # type: ignore[union-attr]


def test_finish_takes_only_a_final_status(registry: Registry) -> None:
    record = registry.create(new_task())
    registry.start(record.id, "w1")
    with pytest.raises(ValueError, match="final"):
        registry.finish(record.id, "w1", TaskStatus.QUEUED, OK)
    assert registry.get(record.id).status is TaskStatus.RUNNING  # type: ignore[union-attr]


def test_fail_discards_a_late_result(registry: Registry) -> None:
    record = registry.create(new_task())
    registry.start(record.id, "w1")
    assert registry.fail(record.id, BOOM) is True
    assert registry.finish(record.id, "w1", TaskStatus.DONE, OK) is False
    got = registry.get(record.id)
    assert got is not None and got.status is TaskStatus.FAILED and got.response == BOOM
    assert registry.fail(record.id, BOOM) is False


def test_wait_returns_at_once_when_final(registry: Registry) -> None:
    record = registry.create(new_task())
    registry.start(record.id, "w1")
    registry.finish(record.id, "w1", TaskStatus.DONE, OK)
    began = time.monotonic()
    got = registry.wait(record.id, 5)
    assert got is not None and got.status is TaskStatus.DONE
    assert time.monotonic() - began < 1


def test_wait_times_out_on_a_pending_task(registry: Registry) -> None:
    record = registry.create(new_task())
    began = time.monotonic()
    got = registry.wait(record.id, 0.3)
    elapsed = time.monotonic() - began
    assert got is not None and got.status is TaskStatus.QUEUED
    assert 0.25 <= elapsed < 2


def test_wait_if_checks_the_first_read_and_never_blocks_when_refused(
    registry: Registry,
) -> None:
    record = registry.create(new_task(owner="alice"))
    began = time.monotonic()
    assert registry.wait_if(record.id, 5.0, lambda found: found.owner == "mallory") is None
    assert registry.wait_if("x" * 32, 5.0, lambda found: True) is None
    assert time.monotonic() - began < 1
    got = registry.wait_if(record.id, 0.3, lambda found: found.owner == "alice")
    assert got is not None and got.status is TaskStatus.QUEUED
    assert time.monotonic() - began >= 0.25
    registry.start(record.id, "w1")
    threading.Timer(0.2, registry.finish, (record.id, "w1", TaskStatus.DONE, OK)).start()
    done = registry.wait_if(record.id, 10.0, lambda found: True)
    assert done is not None and done.status is TaskStatus.DONE and done.response == OK
    assert time.monotonic() - began < 5


@pytest.mark.parametrize("how", ["finish", "fail"])
def test_wait_is_woken_by_the_completion(registry: Registry, backend: str, how: str) -> None:
    record = registry.create(new_task())
    registry.start(record.id, "w1")

    def settle() -> None:
        if how == "finish":
            registry.finish(record.id, "w1", TaskStatus.DONE, OK)
        else:
            registry.fail(record.id, BOOM)

    thread = None
    if backend == "redis":
        start_listener(registry)
    if backend in SUBSCRIBED_READ:  # settled once the wait listens: only its wake-up ends it
        on_read(registry, record.id, SUBSCRIBED_READ[backend], settle)
    else:  # the memory registry's wait blocks at once, without a read
        thread = threading.Timer(0.2, settle)
        thread.start()
    began = time.monotonic()
    got = registry.wait(record.id, 10)
    elapsed = time.monotonic() - began
    if thread is not None:
        thread.join()
    expected = TaskStatus.DONE if how == "finish" else TaskStatus.FAILED
    assert got is not None and got.status is expected
    # Well under SQLite's 1 s safety net; Redis and memory have none (they wait 10 s).
    assert elapsed < 0.6, f"woken after {elapsed:.2f}s"


def test_wait_on_unknown_task(registry: Registry) -> None:
    assert registry.wait("missing", 0.1) is None


def test_delete(registry: Registry) -> None:
    record = registry.create(new_task())
    assert registry.delete(record.id) is True
    assert registry.get(record.id) is None
    assert registry.delete(record.id) is False


def test_idempotency_key_returns_the_first_task(registry: Registry) -> None:
    first = registry.create(new_task(), idempotency_key="k1")
    second = registry.create(new_task(), idempotency_key="k1")
    assert second.id == first.id
    other = registry.create(new_task(), idempotency_key="k2")
    assert other.id != first.id
    registry.delete(first.id)
    third = registry.create(new_task(), idempotency_key="k1")
    assert third.id != first.id


def test_an_idempotent_retry_never_returns_an_expired_task(registry: Registry) -> None:
    """More tasks expire at once than a create sweeps: the key's task is still gone."""
    keyed = ""
    for index in range(150):
        task = registry.create(new_task(result_ttl=0.2), idempotency_key=f"many-{index}")
        registry.start(task.id, "w1")
        registry.finish(task.id, "w1", TaskStatus.DONE, OK)
        keyed = task.id
    time.sleep(1.1)
    retried = registry.create(new_task(), idempotency_key="many-149")
    assert retried.id != keyed and registry.get(keyed) is None
    assert registry.get(retried.id) is not None  # its Location answers


def test_request_snapshot_is_kept_for_replay(registry: Registry) -> None:
    snapshot = RequestSnapshot({"REQUEST_METHOD": "POST", "PATH_INFO": "/r"}, b"\x00body\xff")
    record = registry.create(new_task(replay=True), request=snapshot)
    assert registry.request(record.id) == snapshot
    plain = registry.create(new_task())
    assert registry.request(plain.id) is None


def test_max_tasks_is_enforced(backend: str, tmp_path: Path) -> None:
    reg = make_registry(backend, tmp_path, max_tasks=3)
    try:
        for _ in range(3):
            reg.create(new_task())
        with pytest.raises(RegistryFull):
            reg.create(new_task())
    finally:
        _cleanup(reg)


def test_finished_tasks_expire_after_their_ttl(registry: Registry) -> None:
    done = registry.create(new_task(result_ttl=0.3))
    pending = registry.create(new_task(result_ttl=0.3))
    registry.start(done.id, "w1")
    registry.finish(done.id, "w1", TaskStatus.DONE, OK)
    assert registry.get(done.id) is not None
    time.sleep(1.2)
    registry.expire()
    assert registry.get(done.id) is None
    assert registry.get(pending.id) is not None  # pending tasks never expire


def test_expired_tasks_free_their_place(backend: str, tmp_path: Path) -> None:
    reg = make_registry(backend, tmp_path, max_tasks=2)
    try:
        for _ in range(2):
            task = reg.create(new_task(result_ttl=0.2))
            reg.start(task.id, "w1")
            reg.finish(task.id, "w1", TaskStatus.DONE, OK)
        time.sleep(1.1)
        reg.expire()
        reg.create(new_task())  # does not raise RegistryFull
    finally:
        _cleanup(reg)


def test_reap_settles_the_tasks_of_a_dead_worker(registry: Registry) -> None:
    registry.heartbeat("dead", 0.3)
    registry.heartbeat("alive", 30)
    lost = registry.create(new_task("dead"))
    registry.start(lost.id, "dead")
    queued_lost = registry.create(new_task("dead"))
    snapshot = RequestSnapshot({"PATH_INFO": "/r"}, b"again")
    replayed = registry.create(new_task("dead", replay=True), request=snapshot)
    registry.start(replayed.id, "dead")
    mine = registry.create(new_task("alive"))
    assert registry.reap("alive") == []  # the lease has not lapsed yet
    time.sleep(1.2)
    requeued = registry.reap("alive")
    assert [r.id for r in requeued] == [replayed.id]
    for task_id in (lost.id, queued_lost.id):
        got = registry.get(task_id)
        assert got is not None and got.status is TaskStatus.FAILED
        assert got.response is not None and got.response.status_code == 500
        assert b"worker_lost" in got.response.body
    again = registry.get(replayed.id)
    assert again is not None and again.status is TaskStatus.QUEUED and again.worker == "alive"
    assert registry.request(replayed.id) == snapshot
    started = registry.start(replayed.id, "alive")
    assert started is not None and started.attempts == 2
    assert registry.finish(replayed.id, "dead", TaskStatus.DONE, OK) is False
    assert registry.finish(replayed.id, "alive", TaskStatus.DONE, OK) is True
    assert registry.get(mine.id).status is TaskStatus.QUEUED  # type: ignore[union-attr]
    assert registry.reap("alive") == []


def test_reap_respects_its_limit(registry: Registry) -> None:
    registry.heartbeat("dead", 0.2)
    ids = [registry.create(new_task("dead")).id for _ in range(5)]
    time.sleep(1.1)
    registry.reap("alive", limit=2)
    failed = [i for i in ids if registry.get(i).status is TaskStatus.FAILED]  # type: ignore[union-attr]
    assert len(failed) == 2
    registry.reap("alive", limit=10)
    assert all(registry.get(i).status is TaskStatus.FAILED for i in ids)  # type: ignore[union-attr]


def test_a_renewed_lease_is_not_reaped(registry: Registry) -> None:
    registry.heartbeat("w1", 0.2)
    task = registry.create(new_task("w1"))
    registry.heartbeat("w1", 30)
    time.sleep(0.4)
    assert registry.reap("w2") == []
    assert registry.get(task.id).status is TaskStatus.QUEUED  # type: ignore[union-attr]


def test_every_task_is_finished_exactly_once_under_contention(registry: Registry) -> None:
    tasks = [registry.create(new_task()) for _ in range(60)]
    for task in tasks:
        registry.start(task.id, "w1")
    wins: list[str] = []
    lock = threading.Lock()

    def race(status: TaskStatus) -> None:
        for task in tasks:
            if status is TaskStatus.DONE:
                won = registry.finish(task.id, "w1", status, OK)
            else:
                won = registry.fail(task.id, BOOM)
            if won:
                with lock:
                    wins.append(task.id)

    threads = [
        threading.Thread(target=race, args=(s,)) for s in (TaskStatus.DONE, TaskStatus.FAILED) * 2
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == sorted(t.id for t in tasks)
    assert all(registry.get(t.id).status.is_final for t in tasks)  # type: ignore[union-attr]


def test_no_lease_lapses_for_an_outage_every_worker_suffered(registry: Registry) -> None:
    """After a gap in which nobody could renew a lease (the registry was unreachable), the
    first worker back must not reap the others: each gets a lease to renew its own."""
    registry.heartbeat("a", 0.6)
    registry.heartbeat("b", 0.6)
    task = registry.create(new_task("b"))
    registry.start(task.id, "b")
    time.sleep(1.0)  # the outage: no heartbeat gets through
    registry.heartbeat("a", 0.6)  # "a" is back first
    assert registry.reap("a") == []
    assert registry.get(task.id).status is TaskStatus.RUNNING  # type: ignore[union-attr]
    for _ in range(4):  # "b" is back too, and renews its lease
        time.sleep(0.2)
        registry.heartbeat("b", 0.6)
        registry.heartbeat("a", 0.6)
        assert registry.reap("a") == []
    assert registry.get(task.id).status is TaskStatus.RUNNING  # type: ignore[union-attr]
    deadline = time.monotonic() + 5  # "b" dies: reaped once its lease lapses
    while registry.get(task.id).status is TaskStatus.RUNNING:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the lease of a dead worker never lapsed"
        time.sleep(0.2)
        registry.heartbeat("a", 0.6)
        registry.reap("a")
    lost = registry.get(task.id)
    assert lost is not None and lost.response is not None and b"worker_lost" in lost.response.body


# -- progress (issue 11) ---------------------------------------------------------------


def test_progress_is_stored_only_while_the_task_runs_under_its_worker(registry: Registry) -> None:
    document: dict[str, object] = {"current": 3, "total": 10, "percent": 30.0,
                                   "message": "caf\u00e9 \"3\""}
    record = registry.create(new_task())
    assert registry.progress(record.id, "w1", document) is False  # queued: not yet
    assert registry.is_running(record.id, "w1") is False
    registry.start(record.id, "w1")
    assert registry.is_running(record.id, "w1") is True
    assert registry.is_running(record.id, "w2") is False
    assert registry.progress(record.id, "w2", document) is False
    assert registry.get(record.id).progress is None  # type: ignore[union-attr]
    assert registry.progress(record.id, "w1", document) is True
    got = registry.get(record.id)
    assert got is not None and got.progress == document
    assert got.summary()["progress"] == document
    assert registry.progress(record.id, "w1", {**document, "current": 4}) is True
    assert registry.get(record.id).progress["current"] == 4  # type: ignore[union-attr,index]
    registry.finish(record.id, "w1", TaskStatus.DONE, OK)
    assert registry.progress(record.id, "w1", document) is False
    assert registry.is_running(record.id, "w1") is False
    assert registry.progress("nope", "w1", document) is False
    assert registry.is_running("nope", "w1") is False


def test_a_requeued_task_starts_without_its_old_progress(registry: Registry) -> None:
    registry.heartbeat("dead", 0.05)
    record = registry.create(new_task("dead", replay=True),
                             RequestSnapshot({"PATH_INFO": "/"}, b""))
    registry.start(record.id, "dead")
    registry.progress(record.id, "dead", {"current": 1, "total": None, "percent": None,
                                          "message": None})
    time.sleep(0.1)
    requeued = registry.reap("alive")
    assert [r.id for r in requeued] == [record.id]
    assert requeued[0].progress is None
    assert registry.get(record.id).progress is None  # type: ignore[union-attr]


def test_concurrent_progress_writes_and_a_finish_never_tear(registry: Registry) -> None:
    record = registry.create(new_task())
    registry.start(record.id, "w1")
    stop = threading.Event()
    after_finish: list[bool] = []
    finished = threading.Event()

    def write(thread: int) -> None:
        count = 0
        while not stop.is_set():
            count += 1
            done = finished.is_set()
            stored = registry.progress(record.id, "w1", {"current": count, "total": None,
                                                         "percent": None, "message": str(thread)})
            if done:
                after_finish.append(stored)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    seen = registry.get(record.id)
    assert seen is not None and seen.progress is not None
    assert seen.progress["message"] in {"0", "1", "2", "3"}  # one writer's whole document
    assert registry.finish(record.id, "w1", TaskStatus.DONE, OK) is True
    finished.set()
    time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join()
    assert after_finish and not any(after_finish)  # no write lands once it is final
    got = registry.get(record.id)
    assert got is not None and got.status is TaskStatus.DONE and got.response == OK


# -- cancellation and tombstones (issue 11) ----------------------------------------------

GONE = StoredResponse("410 Gone", (("Content-Type", "application/json"),), b'{"status":"x"}')


def test_a_cancelled_queued_task_never_starts(registry: Registry) -> None:
    record = registry.create(new_task(owner="o1"))
    assert registry.cancel(record.id, GONE) is True
    assert registry.start(record.id, "w1") is None
    got = registry.get(record.id)
    assert got is not None and got.status is TaskStatus.CANCELLED and got.response == GONE
    assert got.status.is_final and got.finished_at is not None
    assert registry.cancel(record.id, GONE) is False
    assert registry.fail(record.id, BOOM) is False
    assert registry.cancel("nope", GONE) is False


def test_a_cancelled_running_task_loses_its_late_result(registry: Registry) -> None:
    record = registry.create(new_task())
    registry.start(record.id, "w1")
    assert registry.cancel(record.id, GONE) is True
    assert registry.is_running(record.id, "w1") is False
    assert registry.progress(record.id, "w1", {"current": 1}) is False
    assert registry.finish(record.id, "w1", TaskStatus.DONE, OK) is False
    got = registry.get(record.id)
    assert got is not None and got.status is TaskStatus.CANCELLED and got.response == GONE


def test_a_cancel_wakes_a_long_poll(registry: Registry) -> None:
    record = registry.create(new_task())
    registry.start(record.id, "w1")
    threading.Timer(0.2, registry.cancel, (record.id, GONE)).start()
    began = time.monotonic()
    got = registry.wait(record.id, 5)
    assert time.monotonic() - began < 3
    assert got is not None and got.status is TaskStatus.CANCELLED


def test_cancel_racing_finish_ends_in_exactly_one_outcome(registry: Registry) -> None:
    tasks = [registry.create(new_task()) for _ in range(60)]
    for task in tasks:
        registry.start(task.id, "w1")
    wins: dict[str, list[str]] = {task.id: [] for task in tasks}
    lock = threading.Lock()
    go = threading.Barrier(4)

    def race(kind: str) -> None:
        go.wait()
        # Finishers go forwards and cancellers backwards: they meet in the middle.
        for task in tasks if kind == "finish" else reversed(tasks):
            if kind == "finish":
                won = registry.finish(task.id, "w1", TaskStatus.DONE, OK)
            else:
                won = registry.cancel(task.id, GONE)
            if won:
                with lock:
                    wins[task.id].append(kind)

    threads = [threading.Thread(target=race, args=(k,)) for k in ("finish", "cancel") * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for task in tasks:
        assert len(wins[task.id]) == 1, wins[task.id]
        got = registry.get(task.id)
        assert got is not None
        expected = TaskStatus.DONE if wins[task.id] == ["finish"] else TaskStatus.CANCELLED
        assert got.status is expected
        assert got.response == (OK if expected is TaskStatus.DONE else GONE)
    outcomes = {kind for won in wins.values() for kind in won}
    print(f"outcomes seen: {sorted(outcomes)}")


def test_a_forgotten_task_leaves_a_tombstone_saying_why(registry: Registry) -> None:
    assert registry.gone("never-existed-" + "x" * 10) is None
    done = registry.create(new_task(owner="o1"))
    registry.start(done.id, "w1")
    registry.finish(done.id, "w1", TaskStatus.DONE, OK)
    assert registry.delete(done.id) is True
    tomb = registry.gone(done.id)
    assert tomb is not None and (tomb.id, tomb.status, tomb.owner) == (done.id, "deleted", "o1")
    cancelled = registry.create(new_task())
    registry.cancel(cancelled.id, GONE)
    registry.delete(cancelled.id)
    tomb = registry.gone(cancelled.id)
    assert tomb is not None and (tomb.status, tomb.owner) == ("cancelled", None)
    pending = registry.create(new_task())
    assert registry.gone(pending.id) is None  # still held: no tombstone to read


@pytest.mark.parametrize("final", [TaskStatus.DONE, TaskStatus.CANCELLED])
def test_an_expired_task_is_gone_as_expired_or_cancelled(
    registry: Registry, final: TaskStatus
) -> None:
    record = registry.create(new_task(result_ttl=0.2, owner="o1"))
    registry.start(record.id, "w1")
    if final is TaskStatus.DONE:
        registry.finish(record.id, "w1", TaskStatus.DONE, OK)
    else:
        registry.cancel(record.id, GONE)
    time.sleep(0.4)
    assert registry.get(record.id) is None
    expected = "expired" if final is TaskStatus.DONE else "cancelled"
    tomb = registry.gone(record.id)  # before any sweep
    assert tomb is not None and (tomb.status, tomb.owner) == (expected, "o1")
    registry.expire()
    tomb = registry.gone(record.id)  # after the sweep
    assert tomb is not None and (tomb.status, tomb.owner) == (expected, "o1")


def test_tombstones_expire_after_their_ttl(backend: str, tmp_path: Path) -> None:
    registry = make_registry(backend, tmp_path, tombstone_ttl=0.3)
    try:
        record = registry.create(new_task())
        registry.cancel(record.id, GONE)
        registry.delete(record.id)
        assert registry.gone(record.id) is not None
        time.sleep(0.5)
        registry.expire()
        assert registry.gone(record.id) is None
    finally:
        _cleanup(registry)


def test_tombstones_are_bounded_by_max_tasks_oldest_dropped_first(
    backend: str, tmp_path: Path
) -> None:
    registry = make_registry(backend, tmp_path, max_tasks=5)
    try:
        ids = []
        for _ in range(40):
            record = registry.create(new_task())
            registry.cancel(record.id, GONE)
            registry.delete(record.id)
            ids.append(record.id)
        kept = [task_id for task_id in ids if registry.gone(task_id) is not None]
        assert kept == ids[-5:]
        prefix = getattr(registry, "prefix", None)
        client = getattr(registry, "client", None)
        if prefix and client is not None:  # Redis: the stored keys themselves are bounded
            keys = list(client.scan_iter(match=prefix + "gone*", count=1000))
            assert len(keys) <= 6  # five tombstones and their index
        path = getattr(registry, "path", None)
        if path is not None:  # SQLite: so are the rows
            import sqlite3

            with contextlib.closing(sqlite3.connect(path)) as db:
                (rows,) = db.execute("SELECT count(*) FROM tombstones").fetchone()
            assert rows == 5
    finally:
        _cleanup(registry)


def test_gone_names_an_expired_task_that_nothing_read_or_swept_yet(registry: Registry) -> None:
    record = registry.create(new_task(result_ttl=0.2, owner="o1"))
    registry.start(record.id, "w1")
    registry.finish(record.id, "w1", TaskStatus.DONE, OK)
    time.sleep(0.4)
    tomb = registry.gone(record.id)  # the first call after its expiry: no get, no expire
    assert tomb is not None and (tomb.id, tomb.status, tomb.owner) == (record.id, "expired", "o1")


def test_a_tombstone_lasts_its_ttl_from_the_tasks_expiry_not_from_its_sweep(
    backend: str, tmp_path: Path
) -> None:
    registry = make_registry(backend, tmp_path, tombstone_ttl=0.3)
    try:
        read, swept = (registry.create(new_task(result_ttl=0.1)) for _ in range(2))
        for record in (read, swept):
            registry.start(record.id, "w1")
            registry.finish(record.id, "w1", TaskStatus.DONE, OK)
        time.sleep(0.6)  # past the expiry (0.1 s) and the tombstone after it (0.3 s)
        assert registry.get(read.id) is None
        assert registry.gone(read.id) is None
        registry.expire()
        assert registry.gone(swept.id) is None
    finally:
        _cleanup(registry)


def test_an_expired_tombstone_is_swept_without_the_younger_ones(
    backend: str, tmp_path: Path
) -> None:
    registry = make_registry(backend, tmp_path, tombstone_ttl=0.5)

    def forget() -> str:
        record = registry.create(new_task())
        registry.delete(record.id)
        return record.id

    try:
        first = forget()
        time.sleep(0.3)
        second = forget()  # outlives the first by 0.3 s
        deadline = time.monotonic() + 2
        while registry.gone(first) is not None:
            assert time.monotonic() < deadline, "the first tombstone outlived its TTL"
            time.sleep(0.01)
        third = forget()  # burying it sweeps the expired tombstone, and only that one
        assert registry.gone(second) is not None and registry.gone(third) is not None
    finally:
        _cleanup(registry)


def test_an_expired_task_frees_its_place_after_many_deleted_ones(
    backend: str, tmp_path: Path
) -> None:
    registry = make_registry(backend, tmp_path, max_tasks=2)
    try:
        kept = registry.create(new_task(result_ttl=0.3))
        registry.start(kept.id, "w1")
        registry.finish(kept.id, "w1", TaskStatus.DONE, OK)
        for _ in range(100):  # finished then deleted: what the registry still indexes is stale
            record = registry.create(new_task())
            registry.start(record.id, "w1")
            registry.finish(record.id, "w1", TaskStatus.DONE, OK)
            registry.delete(record.id)
        time.sleep(0.5)
        registry.create(new_task())
        registry.create(new_task())  # the expired task's place: no RegistryFull
    finally:
        _cleanup(registry)
