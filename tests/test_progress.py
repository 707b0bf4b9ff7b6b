"""Progress reported by a running task (issue 11): validation, rate limit, the status document."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from conftest import new_task
from wsgi_async import AsyncMiddleware, MemoryRegistry, Registry, RegistryError, TaskHandle
from wsgi_async.handle import CHECK_INTERVAL, MAX_MESSAGE, PROGRESS_INTERVAL
from wsgi_helpers import Environ, client, wait_result


class CountingRegistry(MemoryRegistry):
    """A real memory registry that counts its progress writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[dict[str, object]] = []

    def progress(self, task_id: str, worker: str, document: dict[str, object]) -> bool:
        self.writes.append(document)
        return super().progress(task_id, worker, document)


def running_handle(registry: Registry) -> TaskHandle:
    record = registry.create(new_task())
    registry.start(record.id, "w1")
    return TaskHandle(record.id, 1, registry=registry, worker="w1")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("3",), "current must be a number"),
        ((None,), "current must be a number"),
        ((True,), "current must be a number"),
        ((-1,), "current must be a finite number >= 0"),
        ((math.nan,), "current must be a finite number >= 0"),
        ((math.inf,), "current must be a finite number >= 0"),
        ((1, "10"), "total must be a number"),
        ((1, math.nan), "total must be a finite number > 0"),
        ((0, 0), "total must be a finite number > 0"),
        ((0, -5), "total must be a finite number > 0"),
        ((11, 10), "current \\(11\\) exceeds total \\(10\\)"),
        ((1, 10, b"bytes"), "message must be a str"),
        ((1, math.inf), "^progress: total must be a finite number > 0, got inf$"),
        ((1, 10, 5), "^progress: message must be a str, got int$"),
    ],
)
def test_bad_values_raise_a_clear_value_error(args: tuple[Any, ...], match: str) -> None:
    handle = TaskHandle("t" * 22)
    with pytest.raises(ValueError, match=match):
        handle.progress(*args)
    assert handle.latest is None


def test_any_real_number_is_accepted_and_a_long_message_is_cut() -> None:
    handle = TaskHandle("t" * 22)
    handle.progress(Fraction(1, 2), Decimal("2"), "x" * 1000)
    assert handle.latest is not None
    current, total, message = handle.latest
    assert (current, total) == (0.5, 2.0)
    assert message is not None and len(message) == 200 and message.endswith("...")
    assert handle.cancelled is False
    handle.check()  # no registry: never cancelled


def test_a_total_below_1_is_accepted() -> None:
    registry = CountingRegistry()
    handle = running_handle(registry)
    handle.progress(0.25, 0.5)
    assert handle.latest == (0.25, 0.5, None)
    assert registry.writes == [{"current": 0.25, "total": 0.5, "percent": 50.0, "message": None}]


def test_a_message_of_max_message_characters_is_kept_and_one_more_is_cut() -> None:
    handle = TaskHandle("t" * 22)
    whole = "".join(chr(ord("a") + index % 26) for index in range(MAX_MESSAGE))
    handle.progress(1, 2, whole)
    assert handle.latest == (1, 2, whole)
    handle.progress(1, 2, whole + "z")
    assert handle.latest == (1, 2, whole[: MAX_MESSAGE - 3] + "...")


def test_writes_are_rate_limited_and_the_latest_lands_last() -> None:
    registry = CountingRegistry()
    handle = running_handle(registry)
    calls = 200_000
    began = time.perf_counter()
    for index in range(calls):
        handle.progress(index, calls, "working")
    elapsed = time.perf_counter() - began
    began = time.perf_counter()
    for _index in range(calls):
        pass
    bare = time.perf_counter() - began
    writes = len(registry.writes)
    print(f"{calls} progress calls: {elapsed:.3f} s ({elapsed / calls * 1e6:.2f} us each, "
          f"{elapsed / max(bare, 1e-9):.0f}x a bare loop), {writes} registry writes")
    assert writes <= elapsed / 0.2 + 2
    assert elapsed < 2.0
    handle.flush()
    assert registry.writes[-1] == {"current": calls - 1, "total": calls,
                                   "percent": 99.99, "message": "working"}
    assert len(registry.writes) == writes + (registry.writes[writes - 1]["current"] != calls - 1)
    got = registry.get(handle.id)
    assert got is not None and got.progress == registry.writes[-1]
    handle.flush()  # nothing new: no write
    assert len(registry.writes) <= writes + 1


def test_percent_is_null_without_a_total() -> None:
    registry = CountingRegistry()
    handle = running_handle(registry)
    handle.progress(7, message="seven")
    assert registry.writes == [{"current": 7, "total": None, "percent": None, "message": "seven"}]


def test_progress_from_many_threads_ends_with_one_of_the_last_values() -> None:
    registry = CountingRegistry()
    handle = running_handle(registry)

    def report(thread: int) -> None:
        for index in range(20_000):
            handle.progress(index, 20_000, str(thread))

    threads = [threading.Thread(target=report, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handle.flush()
    got = registry.get(handle.id)
    assert got is not None and got.progress is not None
    assert got.progress["current"] == 19_999 and got.progress["message"] in {"0", "1", "2", "3"}


class RefusingRegistry(MemoryRegistry):
    """A real memory registry whose next ``refusals`` progress writes raise RegistryError."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals

    def progress(self, task_id: str, worker: str, document: dict[str, object]) -> bool:
        if self.refusals > 0:
            self.refusals -= 1
            raise RegistryError("progress table is read-only")
        return super().progress(task_id, worker, document)


def test_a_refused_progress_write_is_logged_and_the_task_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = RefusingRegistry(refusals=1)
    handle = running_handle(registry)
    with caplog.at_level(logging.WARNING, logger="wsgi_async"):
        handle.progress(1, 3, "first")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING,
         f"wsgi_async: task {handle.id}: progress not stored: progress table is read-only"),
    ]
    assert handle.cancelled is False
    handle.check()
    handle.progress(2, 3, "second")  # within the rate limit: kept for the flush
    handle.flush()
    got = registry.get(handle.id)
    assert got is not None and got.progress == {"current": 2, "total": 3, "percent": 66.66,
                                                "message": "second"}
    assert len(caplog.records) == 1


class CheckCountingRegistry(MemoryRegistry):
    """A real memory registry that counts the cancellation checks it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    def is_running(self, task_id: str, worker: str) -> bool:
        self.checks += 1
        return super().is_running(task_id, worker)


def test_a_progress_write_counts_as_a_cancellation_check() -> None:
    registry = CheckCountingRegistry()
    handle = running_handle(registry)
    due = time.monotonic() + CHECK_INTERVAL  # the handle's first check is due by then
    while time.monotonic() < due:
        time.sleep(0.01)
    wrote = time.monotonic()
    handle.progress(1, 2)  # written at once: it said the task still runs
    assert handle.cancelled is False
    assert registry.checks == 0
    deadline = wrote + 5
    while registry.checks == 0 and time.monotonic() < deadline:
        assert handle.cancelled is False
        time.sleep(0.01)
    assert registry.checks == 1
    assert time.monotonic() - wrote >= CHECK_INTERVAL


class StallingRegistry(MemoryRegistry):
    """A real memory registry whose first progress write waits until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.writes = 0

    def progress(self, task_id: str, worker: str, document: dict[str, object]) -> bool:
        self.writes += 1
        if self.writes == 1:
            self.stalled.set()
            self.release.wait(10)
        return super().progress(task_id, worker, document)


def test_a_report_never_waits_for_another_threads_slow_write() -> None:
    registry = StallingRegistry()
    handle = running_handle(registry)
    first = threading.Thread(target=handle.progress, args=(1, 3))
    first.start()
    reported = threading.Event()

    def report() -> None:
        handle.progress(2, 3)
        reported.set()

    second = threading.Thread(target=report)
    try:
        assert registry.stalled.wait(5)
        due = time.monotonic() + PROGRESS_INTERVAL  # the next write is due by then
        while time.monotonic() < due:
            time.sleep(0.01)
        second.start()
        assert reported.wait(5)  # it left its value to a later write
        assert registry.writes == 1
    finally:
        registry.release.set()
        first.join(5)
        if second.ident is not None:
            second.join(5)
    handle.flush()
    got = registry.get(handle.id)
    assert got is not None and got.progress is not None and got.progress["current"] == 2
    assert registry.writes == 2


# -- over HTTP, on every registry ---------------------------------------------------------


class Reporter:
    """An app that reports progress, then waits for the test to let it finish."""

    def __init__(self) -> None:
        self.reported = threading.Event()
        self.release = threading.Event()

    def __call__(self, environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        task = environ["wsgi_async.task"]
        for index in range(1000):
            task.progress(index, 1000)
        task.progress(1000, 1000, "almost <done> \u2603")
        time.sleep(0.25)  # past the rate limit: the next value is written at once
        task.progress(1000, 1000, "writing the report")
        self.reported.set()
        self.release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"report"]


@pytest.fixture
def served(registry: Registry) -> Iterator[tuple[AsyncMiddleware, Any, Reporter]]:
    app = Reporter()
    middleware, test_app = client(app, registry=registry)
    yield middleware, test_app, app
    app.release.set()
    middleware.shutdown(wait=True, timeout=5)


def test_a_poll_sees_the_progress_of_a_running_task(
    served: tuple[AsyncMiddleware, Any, Reporter],
) -> None:
    _, test_app, app = served
    submitted = test_app.post("/async/report", b"", status=202)
    assert submitted.json["progress"] is None
    location = submitted.headers["Location"]
    assert app.reported.wait(10)
    pending = test_app.get(location, status=202)
    assert pending.json["status"] == "running"
    assert pending.json["progress"] == {"current": 1000, "total": 1000, "percent": 100.0,
                                        "message": "writing the report"}
    app.release.set()
    final = wait_result(test_app, location, status=200)
    assert final.body == b"report"
