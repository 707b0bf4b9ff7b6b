"""``drain``: what a process does when its server stops it, in one process.

Running tasks finish and are stored, queued ones are failed with a stored
``503`` (replayable ones stay queued under a lease left to lapse), and the
wait is bounded by ``drain_timeout``.  tests/test_shutdown.py proves the same
through SIGTERM on real servers.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from wsgi_async import AsyncMiddleware, MemoryRegistry, TaskService, TaskStatus
from wsgi_async.config import Route, build_options
from wsgi_async.errors import RegistryUnavailable
from wsgi_async.model import StoredResponse
from wsgi_async.observer import Observer
from wsgi_async.registry.sqlite import SQLiteRegistry
from wsgi_async.request import snapshot
from wsgi_helpers import Gate, client, echo_app, sleeping


def submit(test_app: object, path: str, count: int) -> list[str]:
    return [test_app.post(path, f"job-{i}".encode(), status=202)  # type: ignore[attr-defined]
            .headers["Location"].rsplit("/", 1)[1] for i in range(count)]


def test_running_tasks_finish_queued_ones_get_a_503_and_replayable_ones_stay_queued() -> None:
    registry = MemoryRegistry()
    gate = Gate()
    middleware, test_app = client(
        gate, registry=registry, max_workers=2, lease_time=1,
        routes={r"^/async": ["POST"], r"^/again": {"methods": ["POST"], "replay": True}})
    plain = submit(test_app, "/async", 2)  # the two running ones
    deadline = time.monotonic() + 5
    while gate.running < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    queued = submit(test_app, "/async", 2)
    replayable = submit(test_app, "/again", 2)
    gate.opened.set()
    assert middleware.drain(timeout=10) is True
    for task_id in plain:
        record = registry.get(task_id)
        assert record is not None and record.status is TaskStatus.DONE
    for task_id in queued:
        record = registry.get(task_id)
        assert record is not None and record.status is TaskStatus.FAILED
        assert record.response is not None and record.response.status_code == 503
        assert json.loads(record.response.body)["detail"] == (
            "the server shut down before the task started")
    for task_id in replayable:
        record = registry.get(task_id)
        assert record is not None and record.status is TaskStatus.QUEUED
    # The lease was kept, so it lapses and another process takes the replayable tasks.
    time.sleep(1.2)
    taken = registry.reap("another-process")
    assert sorted(r.id for r in taken) == sorted(replayable)
    # After a drain nothing new is accepted.
    refused = test_app.post("/async", b"late", status=503)
    assert refused.headers["Retry-After"] == "1"


def test_the_drain_is_bounded_and_a_task_past_it_keeps_its_lease() -> None:
    registry = MemoryRegistry()
    middleware, test_app = client(sleeping(3), registry=registry, lease_time=1)
    [task_id] = submit(test_app, "/async", 1)
    time.sleep(0.2)
    began = time.monotonic()
    assert middleware.drain(timeout=0.5) is False
    assert 0.4 < time.monotonic() - began < 1.5
    record = registry.get(task_id)
    assert record is not None and record.status is TaskStatus.RUNNING
    time.sleep(1.2)  # not retired: its lease lapses, another process settles the task
    registry.reap("another-process")
    record = registry.get(task_id)
    assert record is not None and record.status is TaskStatus.FAILED


def test_drain_timeout_option() -> None:
    assert AsyncMiddleware(echo_app, routes=["^/"]).options.drain_timeout == 25
    with pytest.raises(ValueError, match="drain_timeout must be a finite number above 0, got 0"):
        AsyncMiddleware(echo_app, routes=["^/"], drain_timeout=0)
    with pytest.raises(TypeError, match="drain_timeout must be a number"):
        AsyncMiddleware(echo_app, routes=["^/"], drain_timeout="30")  # type: ignore[arg-type]


def test_a_drain_after_shutdown_touches_nothing(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """At exit every middleware drains; one shut down (and its registry closed) stays quiet."""
    registry = SQLiteRegistry(tmp_path / "tasks.db")
    middleware, test_app = client(echo_app, registry=registry)
    location = test_app.post("/async", b"x", status=202).headers["Location"]
    middleware.shutdown()
    registry.close()
    assert middleware.drain() is True
    assert middleware.drain() is True
    assert location
    assert not [r for r in caplog.records if r.levelno >= 30], caplog.records


# -- the service's drain, step by step ------------------------------------------------------

POST: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/a"}
SHUT_DOWN = "the server shut down before the task started"


class DrainRegistry(MemoryRegistry):
    """A real memory registry that notes what a drain does to it: each lease retired, each
    task failed (``all_failed`` is set once ``expect`` were); with ``refuse_first`` it is
    unavailable for the first ``fail`` of each task, as a registry down for a moment."""

    def __init__(self, expect: int, refuse_first: bool = False) -> None:
        super().__init__()
        self.expect = expect
        self.refuse_first = refuse_first
        self.refused: list[str] = []
        self.failed: list[str] = []
        self.all_failed = threading.Event()
        self.retired: list[str] = []

    def fail(self, task_id: str, response: StoredResponse) -> bool:
        if self.refuse_first and task_id not in self.refused:
            self.refused.append(task_id)
            raise RegistryUnavailable("the registry is down for a moment")
        stored = super().fail(task_id, response)
        if stored:
            self.failed.append(task_id)
            if len(self.failed) >= self.expect:
                self.all_failed.set()
        return stored

    def retire(self, worker: str) -> None:
        self.retired.append(worker)
        super().retire(worker)


class Counting(Observer):
    """Hears how many tasks wait in the pool, and how many were cancelled."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queued_deltas: list[int] = []
        self.cancelled_count = 0

    def queued(self, delta: int) -> None:
        with self.lock:
            self.queued_deltas.append(delta)

    def cancelled(self) -> None:
        with self.lock:
            self.cancelled_count += 1


class Busy:
    """A service with one worker, running one held task, and more queued behind it."""

    def __init__(
        self, registry: MemoryRegistry, release: threading.Event, *, queued: int = 0,
        replayable: int = 0, observer: Observer | None = None, **options: Any,
    ) -> None:
        started = threading.Event()

        def app(environ: Any, start_response: Any) -> Any:
            started.set()
            release.wait(10)
            return echo_app(environ, start_response)

        options = {"lease_time": 3, "max_workers": 1, **options}
        self.options = build_options(
            {r"^/a": None, r"^/again": {"replay": True}}, **options)
        self.service = TaskService(app, registry, self.options, observer)
        plain, again = self.options.routes
        self.running = self.submit(plain, b"running")
        assert started.wait(5)
        self.queued = [self.submit(plain, f"queued-{i}".encode()) for i in range(queued)]
        self.replayable = [self.submit(again, f"again-{i}".encode()) for i in range(replayable)]

    def submit(self, route: Route, body: bytes) -> str:
        record, outcome = self.service.submit(route, snapshot(POST, body))
        assert outcome == "new"
        return record.id


def test_a_queued_task_a_drain_fails_stores_a_503_naming_it() -> None:
    registry = DrainRegistry(expect=2)
    busy = Busy(registry, registry.all_failed, queued=2)
    assert busy.service.drain(timeout=10) is True
    for task_id in busy.queued:
        record = registry.get(task_id)
        assert record is not None and record.status is TaskStatus.FAILED
        assert record.response is not None and record.response.status == "503 Service Unavailable"
        assert json.loads(record.response.body) == {
            "error": "Service Unavailable", "detail": SHUT_DOWN, "id": task_id}


def test_a_drain_logs_what_it_waits_for_and_how_long_it_took(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="wsgi_async")
    registry = DrainRegistry(expect=2)
    busy = Busy(registry, registry.all_failed, queued=2)
    began = time.monotonic()
    assert busy.service.drain(timeout=10) is True
    took = time.monotonic() - began
    messages = [r.getMessage() for r in caplog.records if "drain" in r.getMessage()]
    assert messages[0] == "wsgi_async: draining: up to 10.0 s for 3 pending task(s)"
    [drained] = messages[1:]
    match = re.fullmatch(r"wsgi_async: drained in (\d+\.\d\d) s", drained)
    assert match is not None, drained
    assert 0 <= float(match[1]) <= took + 0.01


def test_a_drain_with_nothing_pending_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsgi_async")
    registry = DrainRegistry(expect=0)
    options = build_options([r"^/a"])
    service = TaskService(echo_app, registry, options)
    service.ensure_started()
    assert service.drain(timeout=10) is True
    assert not [r for r in caplog.records if "drain" in r.getMessage()], caplog.records
    assert registry.retired == [service.worker_id()]


def test_a_drain_leaves_each_replayable_task_queued_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="wsgi_async")
    registry = DrainRegistry(expect=0)
    release = threading.Event()
    busy = Busy(registry, release, replayable=2)
    release.set()
    assert busy.service.drain(timeout=10) is True
    assert busy.service.left_for_replay == 2
    left = [r.getMessage() for r in caplog.records if "left queued" in r.getMessage()]
    assert left == [f"wsgi_async: task {task_id} left queued for another process to replay"
                    for task_id in busy.replayable]
    for task_id in busy.replayable:
        record = registry.get(task_id)
        assert record is not None and record.status is TaskStatus.QUEUED
    assert registry.retired == []  # the lease lapses, and another process replays them


def test_a_drain_takes_its_tasks_off_the_queue_count_and_counts_the_cancelled() -> None:
    registry = DrainRegistry(expect=2)
    observer = Counting()
    busy = Busy(registry, registry.all_failed, queued=2, replayable=2, observer=observer)
    assert busy.service.drain(timeout=10) is True
    # Five were queued; one ran, two were failed and two left for replay: none waits now.
    assert sorted(observer.queued_deltas) == [-1] * 5 + [1] * 5
    assert observer.cancelled_count == 2  # the replayable ones were not cancelled


def test_a_clean_drain_retires_the_lease() -> None:
    registry = DrainRegistry(expect=1)
    busy = Busy(registry, registry.all_failed, queued=1)
    assert busy.service.drain(timeout=10) is True
    assert registry.retired == [busy.service.worker_id()]


def test_a_drain_bounded_by_drain_timeout_says_it_timed_out_and_keeps_the_lease(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="wsgi_async")
    registry = DrainRegistry(expect=0)
    release = threading.Event()
    busy = Busy(registry, release, drain_timeout=0.3)
    try:
        began = time.monotonic()
        assert busy.service.drain() is False
        took = time.monotonic() - began
        assert 0.25 < took < 2
        records = [r for r in caplog.records if "drain" in r.getMessage()]
        assert records[0].getMessage() == (
            "wsgi_async: draining: up to 0.3 s for 1 pending task(s)")
        [timed_out] = records[1:]
        assert timed_out.levelno == logging.WARNING
        match = re.fullmatch(
            r"wsgi_async: drain timed out after (\d+\.\d\d) s with 1 task\(s\) still running; "
            r"another process settles them when this one's lease lapses", timed_out.getMessage())
        assert match is not None, timed_out.getMessage()
        assert 0.25 < float(match[1]) <= took + 0.01
        assert registry.retired == []
    finally:
        release.set()


def test_a_second_drain_neither_waits_nor_logs_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsgi_async")
    registry = DrainRegistry(expect=0)
    release = threading.Event()
    busy = Busy(registry, release)
    try:
        assert busy.service.drain(timeout=0.2) is False
        logged = len(caplog.records)
        began = time.monotonic()
        assert busy.service.drain(timeout=5) is False  # still running: said at once
        assert time.monotonic() - began < 1
        assert len(caplog.records) == logged
    finally:
        release.set()
    assert registry.wait(busy.running, 10) is not None
    deadline = time.monotonic() + 5
    while not busy.service.drain():  # the task ended: nothing is pending any more
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_failure_the_registry_refused_at_drain_is_stored_by_the_supervisor() -> None:
    # The running task is held until both queued ones are failed: the supervisor, still
    # renewing the lease during the drain, retries each refused write until it is stored.
    registry = DrainRegistry(expect=2, refuse_first=True)
    busy = Busy(registry, registry.all_failed, queued=2, lease_time=0.3)
    assert busy.service.drain(timeout=10) is True
    assert sorted(registry.refused) == sorted(busy.queued)
    for task_id in busy.queued:
        record = registry.get(task_id)
        assert record is not None and record.status is TaskStatus.FAILED
        assert record.response is not None
        assert json.loads(record.response.body) == {
            "error": "Service Unavailable", "detail": SHUT_DOWN, "id": task_id}
    assert registry.retired == [busy.service.worker_id()]  # nothing left unsettled
