"""Cancellation and 410 Gone over HTTP (issue 11), on every registry."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from conftest import new_task
from wsgi_async import (
    AsyncMiddleware,
    MemoryRegistry,
    Registry,
    StoredResponse,
    TaskCancelled,
    TaskHandle,
)
from wsgi_helpers import Environ, Gate, client, echo_app, wait_result


@pytest.fixture
def cleanup() -> Iterator[list[AsyncMiddleware]]:
    """Middlewares to shut down; tests ask for it after ``registry``, so they stop first."""
    made: list[AsyncMiddleware] = []
    yield made
    for middleware in made:
        middleware.shutdown(wait=True, timeout=5)


def make(cleanup: list[AsyncMiddleware], app: Any, **options: Any) -> Any:
    middleware, test_app = client(app, **options)
    cleanup.append(middleware)
    return test_app


class Cancellable:
    """Runs until its handle says it was cancelled; notes when it noticed."""

    def __init__(self, raise_it: bool = False) -> None:
        self.raise_it = raise_it
        self.started = threading.Event()
        self.noticed = threading.Event()
        self.noticed_at = 0.0

    def __call__(self, environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        task = environ["wsgi_async.task"]
        self.started.set()
        deadline = time.monotonic() + 10
        step = 0
        while time.monotonic() < deadline:
            step += 1
            task.progress(step)
            if self.raise_it:
                try:
                    task.check()
                except TaskCancelled:
                    self.noticed_at = time.monotonic()
                    self.noticed.set()
                    raise
            elif task.cancelled:
                self.noticed_at = time.monotonic()
                self.noticed.set()
                break
            time.sleep(0.01)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"a late result nobody will see"]


def test_check_raises_task_cancelled_naming_the_task() -> None:
    registry = MemoryRegistry()
    record = registry.create(new_task())
    registry.start(record.id, "w1")
    handle = TaskHandle(record.id, 1, registry=registry, worker="w1")
    handle.check()
    assert registry.cancel(record.id, StoredResponse("410 Gone", (), b""))
    handle.progress(1)  # the write finds the task no longer running
    with pytest.raises(TaskCancelled) as raised:
        handle.check()
    assert str(raised.value) == f"task {record.id} was cancelled"


@pytest.mark.parametrize("raise_it", [False, True], ids=["cancelled", "check"])
def test_a_running_task_learns_it_was_cancelled_and_its_result_is_discarded(
    registry: Registry, cleanup: list[AsyncMiddleware], raise_it: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Cancellable(raise_it)
    test_app = make(cleanup, app, registry=registry)
    location = test_app.post("/async", b"").headers["Location"]
    assert app.started.wait(5)
    time.sleep(0.05)
    with caplog.at_level(logging.INFO, logger="wsgi_async"):
        cancelled_at = time.monotonic()
        res = test_app.delete(location, status=204)
        assert res.body == b""
        assert app.noticed.wait(5)
        latency = app.noticed_at - cancelled_at
        print(f"the task noticed its cancel after {latency:.3f} s")
        assert latency < 1.5
        gone = test_app.get(location, status=410)
        time.sleep(0.1)  # let the runner try (and fail) to store its late result
    assert gone.json["status"] == "cancelled" and gone.json["id"] == location.rsplit("/", 1)[1]
    assert gone.headers["Cache-Control"] == "no-store"
    assert test_app.get(location, status=410).json["status"] == "cancelled"  # never replaced
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    test_app.delete(location, status=204)  # a cancelled task can then be forgotten
    assert test_app.get(location, status=410).json["status"] == "cancelled"


def test_a_cancelled_queued_task_never_runs(
    registry: Registry, cleanup: list[AsyncMiddleware]
) -> None:
    gate = Gate()
    test_app = make(cleanup, gate, registry=registry, max_workers=1)
    first = test_app.post("/async", b"").headers["Location"]
    second = test_app.post("/async", b"").headers["Location"]
    deadline = time.monotonic() + 5
    while gate.calls < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert test_app.get(second, status=202).json["status"] == "queued"
    test_app.delete(second, status=204)
    gate.opened.set()
    wait_result(test_app, first, status=200)
    time.sleep(0.2)  # the pool reaches the cancelled job and skips it
    assert gate.calls == 1
    assert test_app.get(second, status=410).json["status"] == "cancelled"


def test_a_long_poll_is_answered_by_the_cancel(
    registry: Registry, cleanup: list[AsyncMiddleware]
) -> None:
    app = Cancellable()
    test_app = make(cleanup, app, registry=registry)
    location = test_app.post("/async", b"").headers["Location"]
    threading.Timer(0.3, lambda: test_app.delete(location, status=204)).start()
    began = time.monotonic()
    res = test_app.get(location, headers={"Prefer": "wait=10"}, status=410)
    assert time.monotonic() - began < 5
    assert res.json["status"] == "cancelled"


def test_delete_answers_404_for_what_is_not_the_callers_task(
    cleanup: list[AsyncMiddleware],
) -> None:
    gate = Gate()
    test_app = make(cleanup, gate, owner=lambda environ: environ.get("HTTP_X_USER"))
    alice = {"X-User": "alice"}
    location = test_app.post("/async", b"", headers=alice).headers["Location"]
    try:
        for path in ("/_async/tasks", "/_async/tasks/", "/_async/tasks/bad!id",
                     "/_async/tasks/" + "A" * 32):
            res = test_app.delete(path, headers=alice, status=404)
            assert res.json["error"] == "Not Found"
        test_app.delete(location, headers={"X-User": "mallory"}, status=404)
        test_app.delete(location, status=404)
        assert test_app.get(location, headers=alice, status=202).json["status"] in (
            "queued", "running")
        test_app.delete(location, headers=alice, status=204)
        test_app.get(location, headers={"X-User": "mallory"}, status=404)
        assert test_app.get(location, headers=alice, status=410).json["status"] == "cancelled"
    finally:
        gate.opened.set()


def test_a_deleted_finished_task_answers_410_deleted(
    registry: Registry, cleanup: list[AsyncMiddleware]
) -> None:
    test_app = make(cleanup, echo_app, registry=registry)
    location = test_app.post("/async", b"x").headers["Location"]
    wait_result(test_app, location, status=201)
    test_app.delete(location, status=204)
    res = test_app.get(location, status=410)
    assert res.json == {"error": "Gone", "detail": "The task was deleted.",
                        "id": location.rsplit("/", 1)[1], "status": "deleted"}
    test_app.head(location, status=410)
    test_app.delete(location, status=410)


def test_an_expired_task_answers_410_expired_then_404_once_its_tombstone_expires(
    cleanup: list[AsyncMiddleware], backend: str, tmp_path: Any,
) -> None:
    from conftest import _cleanup, make_registry

    registry = make_registry(backend, tmp_path, tombstone_ttl=0.6)
    middleware, test_app = client(echo_app, registry=registry, result_ttl=0.3)
    try:
        location = test_app.post("/async", b"x").headers["Location"]
        wait_result(test_app, location, status=201)
        time.sleep(0.45)
        assert test_app.get(location, status=410).json["status"] == "expired"
        time.sleep(0.8)  # the tombstone lasts 0.6 s from the task's expiry, swept or not
        test_app.get(location, status=404)
        registry.expire()
        test_app.get(location, status=404)
    finally:
        middleware.shutdown(wait=True, timeout=5)
        _cleanup(registry)
