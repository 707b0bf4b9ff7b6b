"""``drain``: what a process does when its server stops it, in one process.

Running tasks finish and are stored, queued ones are failed with a stored
``503`` (replayable ones stay queued under a lease left to lapse), and the
wait is bounded by ``drain_timeout``.  tests/test_shutdown.py proves the same
through SIGTERM on real servers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from wsgi_async import AsyncMiddleware, MemoryRegistry, TaskStatus
from wsgi_async.registry.sqlite import SQLiteRegistry
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
