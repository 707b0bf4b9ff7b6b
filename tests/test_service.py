"""The task service behind the middleware, and the ``executor`` option: where tasks run."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from wsgi_async import AsyncMiddleware, MemoryRegistry, TaskService
from wsgi_async.config import Route, build_options
from wsgi_async.errors import MaybeWritten
from wsgi_async.model import (
    RequestSnapshot,
    TaskRecord,
    TaskStatus,
    error_response,
    new_task_id,
)
from wsgi_async.observer import Observer
from wsgi_async.request import snapshot
from wsgi_async.service import Refused
from wsgi_helpers import client, echo_app


def test_inline_executor_answers_with_the_result_already_stored() -> None:
    ran_in: list[str] = []

    def app(environ: Any, start_response: Any) -> Any:
        ran_in.append(threading.current_thread().name)
        return echo_app(environ, start_response)

    middleware, test_app = client(app, routes={r"^/async": {"executor": "inline"}})
    try:
        submitted = test_app.post("/async/x", b"payload", status=202)
        # The task ran in the submitting thread, before the 202 was sent.
        assert ran_in == [threading.current_thread().name]
        assert submitted.json["status"] == "done"
        result = test_app.get(submitted.headers["Location"], status=201)
        assert result.body == b"echo:payload"
    finally:
        middleware.shutdown()


def test_inline_executor_with_prefer_wait_answers_the_result_itself() -> None:
    middleware, test_app = client(echo_app, routes=[r"^/async"], executor="inline")
    try:
        answer = test_app.post("/async", b"now", headers={"Prefer": "respond-async, wait=5"},
                               status=201)
        assert answer.body == b"echo:now"
        assert middleware.pool.free_slots == middleware.pool.capacity  # the pool was not used
    finally:
        middleware.shutdown()


def test_a_route_executor_overrides_the_global_one() -> None:
    options = build_options({r"^/a": {"executor": "inline"}, r"^/b": None}, executor="threads")
    first, second = options.routes
    assert options.executor_of(first) == "inline"
    assert options.executor_of(second) == "threads"
    assert options.executors == frozenset({"inline", "threads"})


@pytest.mark.parametrize(
    "options",
    [{"executor": "processes"}, {"routes": {r"^/a": {"executor": "celery"}}}],
)
def test_unknown_executor_is_refused_naming_the_choices(options: dict[str, Any]) -> None:
    options.setdefault("routes", [r"^/a"])
    with pytest.raises(ValueError, match="executor must be one of 'threads', 'workers', 'inline'"):
        AsyncMiddleware(echo_app, **options)


def test_workers_executor_on_the_memory_registry_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="executor='workers' needs a registry with a queue"):
        AsyncMiddleware(echo_app, routes=[r"^/a"], executor="workers")
    with pytest.raises(ValueError, match="MemoryRegistry has none"):
        AsyncMiddleware(echo_app, routes={r"^/a": {"executor": "workers"}},
                        registry=MemoryRegistry())


def test_the_service_runs_a_task_without_the_wsgi_front() -> None:
    registry = MemoryRegistry()
    options = build_options([r"^/a"])
    service = TaskService(echo_app, registry, options)
    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/a", "QUERY_STRING": "q=1"}
    try:
        record, outcome = service.submit(options.routes[0], snapshot(environ, b"body"))
        assert outcome == "new"
        done = registry.wait(record.id, 10)
        assert done is not None and done.response is not None
        assert done.response.status == "201 Created"
        assert done.response.body == b"echo:body"
        assert ("X-Query", "q=1") in done.response.headers
    finally:
        service.shutdown()


def test_the_service_tells_a_repeated_key_from_a_conflicting_one() -> None:
    registry = MemoryRegistry()
    options = build_options([r"^/a"])
    service = TaskService(echo_app, registry, options)
    route = options.routes[0]
    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/a"}
    try:
        first, outcome = service.submit(route, snapshot(environ, b"one"), key="k")
        assert outcome == "new"
        again, outcome = service.submit(route, snapshot(environ, b"one"), key="k")
        assert (again.id, outcome) == (first.id, "repeated")
        other, outcome = service.submit(route, snapshot(environ, b"two"), key="k")
        assert (other.id, outcome) == (first.id, "conflict")
    finally:
        service.shutdown()


class LostCreateReplies(MemoryRegistry):
    """A real memory registry whose replies to ``create`` are lost: it stores each task,
    then raises :class:`MaybeWritten`, as a Redis that stalls after running the script."""

    def __init__(self, lose: int) -> None:
        super().__init__()
        self.lose = lose
        self.lost: list[str] = []

    def create(self, record: TaskRecord, request: RequestSnapshot | None = None,
               key: str | None = None) -> TaskRecord:
        stored = super().create(record, request, key)
        if len(self.lost) < self.lose:
            self.lost.append(record.id)
            raise MaybeWritten("the reply to create was lost")
        return stored


def until(condition: Callable[[], object], limit: float = 10) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "not within the limit"
        time.sleep(0.02)


POST: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/a"}


def test_a_keyless_task_stored_after_its_submit_failed_is_removed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = LostCreateReplies(lose=1)
    ran: list[bytes] = []

    def app(environ: Any, start_response: Any) -> Any:
        ran.append(environ["wsgi.input"].read())
        return echo_app(environ, start_response)

    options = build_options([r"^/a"], lease_time=0.6)
    service = TaskService(app, registry, options)
    try:
        with pytest.raises(Refused) as refused:
            service.submit(options.routes[0], snapshot(POST, b"lost"))
        assert refused.value.detail == "The task registry is unavailable."
        [lost] = registry.lost
        assert registry.get(lost) is not None  # stored, though its client got a 503
        # Nobody can know its id: the supervisor removes it, and it never runs.
        until(lambda: registry.get(lost) is None)
        removed = f"wsgi_async: task {lost} was stored after its submit failed; removed"
        until(lambda: submit_failed(caplog) == [removed])
        assert ran == []
    finally:
        service.shutdown()


def submit_failed(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings about tasks stored after their submit failed."""
    return [r.getMessage() for r in caplog.records if "after its submit failed" in r.getMessage()]


def test_a_keyed_task_stored_after_its_submit_failed_runs_once_for_the_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = LostCreateReplies(lose=1)
    ran: list[bytes] = []
    multiprocess: list[object] = []

    def app(environ: Any, start_response: Any) -> Any:
        ran.append(b"ran")
        multiprocess.append(environ["wsgi.multiprocess"])
        return echo_app(environ, start_response)

    options = build_options([r"^/a"], lease_time=0.6)
    service = TaskService(app, registry, options)
    route = options.routes[0]
    try:
        with pytest.raises(Refused):
            service.submit(route, snapshot(POST, b"keyed"), key="k1", multiprocess=False)
        [lost] = registry.lost
        # The client's retry with its key finds the very task, which the supervisor runs.
        again, outcome = service.submit(route, snapshot(POST, b"keyed"), key="k1")
        assert (again.id, outcome) == (lost, "repeated")
        done = registry.wait(lost, 10)
        assert done is not None and done.status is TaskStatus.DONE
        assert done.response is not None and done.response.body == b"echo:keyed"
        time.sleep(0.5)  # a few more supervisor ticks: it is not run a second time
        assert ran == [b"ran"] and multiprocess == [False]  # as the submit said
        assert submit_failed(caplog) == [
            f"wsgi_async: task {lost} was stored after its submit failed; running it"]
    finally:
        service.shutdown()


class RecoverWhenAllowed(LostCreateReplies):
    """As :class:`LostCreateReplies`, and the supervisor's look for the lost task waits
    until the test allows it (so that the test fills the pool first)."""

    def __init__(self, lose: int) -> None:
        super().__init__(lose)
        self.allowed = threading.Event()

    def recover(self, task_id: str) -> TaskRecord | None:
        assert self.allowed.wait(10), "recovery never allowed"
        return super().recover(task_id)


class Deltas(Observer):
    """Hears how the number of tasks waiting in the pool changes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queued_deltas: list[int] = []

    def queued(self, delta: int) -> None:
        with self.lock:
            self.queued_deltas.append(delta)

    def heard(self) -> int:
        with self.lock:
            return len(self.queued_deltas)


def one_held_thread(
    registry: MemoryRegistry, *, replay: bool = False, observer: Observer | None = None,
) -> tuple[TaskService, Route, threading.Event]:
    """A service with one thread and one queued place on ``registry``, running ``^/a``
    (replayable with ``replay``) with an application that holds each task until the
    returned event is set."""
    gate = threading.Event()

    def app(environ: Any, start_response: Any) -> Any:
        gate.wait(10)
        return echo_app(environ, start_response)

    options = build_options({r"^/a": {"replay": replay}}, lease_time=0.6, max_workers=1,
                            max_queued=1)
    return TaskService(app, registry, options, observer), options.routes[0], gate


def submit_running(service: TaskService, route: Route, observer: Deltas) -> None:
    """Submit a task that takes the one thread, and wait until it has taken it."""
    service.submit(route, snapshot(POST, b"running"))
    until(lambda: observer.heard() == 2)  # queued, then taken by the thread


def stored_failure(registry: MemoryRegistry, task_id: str) -> tuple[int, Any]:
    """Wait (10 s at most) for ``task_id`` to end failed; its stored status code and JSON."""
    failed = registry.wait(task_id, 10)
    assert failed is not None and failed.status is TaskStatus.FAILED
    assert failed.response is not None
    return failed.response.status_code, json.loads(failed.response.body)


def test_a_recovered_task_with_no_free_worker_fails_with_a_stored_503() -> None:
    registry = RecoverWhenAllowed(lose=1)
    service, route, gate = one_held_thread(registry)
    try:
        with pytest.raises(Refused):
            service.submit(route, snapshot(POST, b"lost"), key="k2")
        [lost] = registry.lost
        service.submit(route, snapshot(POST, b"running"))
        service.submit(route, snapshot(POST, b"queued"))  # the pool is full now
        registry.allowed.set()
        assert stored_failure(registry, lost) == (503, {
            "error": "Service Unavailable",
            "detail": "No worker was free to run the task after the registry came back.",
            "id": lost})
    finally:
        registry.allowed.set()
        gate.set()
        service.shutdown()


def test_a_task_stored_after_its_submit_failed_and_ended_since_is_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = RecoverWhenAllowed(lose=1)
    ran: list[bytes] = []

    def app(environ: Any, start_response: Any) -> Any:
        ran.append(b"ran")
        return echo_app(environ, start_response)

    caplog.set_level(logging.INFO, logger="wsgi_async")
    options = build_options([r"^/a"], lease_time=0.6)
    service = TaskService(app, registry, options)
    try:
        with pytest.raises(Refused):
            service.submit(options.routes[0], snapshot(POST, b"lost"))
        [lost] = registry.lost
        # It ends before the supervisor looks for it (cancelled, say): no longer queued.
        assert registry.cancel(lost, error_response(409, "cancelled", id=lost))
        registry.allowed.set()
        until(lambda: f"task {lost} settled after the registry came back" in caplog.text)
        left = registry.get(lost)
        assert left is not None and left.status is TaskStatus.CANCELLED  # not removed
        assert submit_failed(caplog) == [] and ran == []
    finally:
        registry.allowed.set()
        service.shutdown()


def test_a_recovered_replayable_task_queued_at_a_drain_is_left_for_another_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = RecoverWhenAllowed(lose=1)
    observer = Deltas()
    service, route, gate = one_held_thread(registry, replay=True, observer=observer)
    try:
        with pytest.raises(Refused):
            service.submit(route, snapshot(POST, b"lost"), key="k3")
        [lost] = registry.lost
        submit_running(service, route, observer)
        registry.allowed.set()
        until(lambda: observer.heard() == 3)  # recovered: queued behind the running task
        assert observer.queued_deltas[2] == 1
        assert submit_failed(caplog) == [
            f"wsgi_async: task {lost} was stored after its submit failed; running it"]
        assert service.drain(timeout=0.1) is False
        left = registry.get(lost)
        assert left is not None and left.status is TaskStatus.QUEUED  # not failed
    finally:
        registry.allowed.set()
        gate.set()
        service.shutdown()


def lost_task(registry: MemoryRegistry, body: bytes) -> str:
    """A replayable task started by a process whose lease lapses at once."""
    registry.heartbeat("lost-process", 0.1)
    record = TaskRecord(id=new_task_id(), route="^/a", worker="lost-process", replay=True)
    registry.create(record, snapshot(POST, body))
    assert registry.start(record.id, "lost-process") is not None
    return record.id


def test_a_replayable_task_of_a_lost_process_runs_again_here() -> None:
    registry = MemoryRegistry()
    attempts: list[int] = []
    multiprocess: list[object] = []

    def app(environ: Any, start_response: Any) -> Any:
        attempts.append(environ["wsgi_async.task"].attempt)
        # Only another process can have lost it: the server runs several.
        multiprocess.append(environ["wsgi.multiprocess"])
        return echo_app(environ, start_response)

    options = build_options([r"^/a"], lease_time=0.6)
    service = TaskService(app, registry, options)
    try:
        service.ensure_started()
        task_id = lost_task(registry, b"again")
        done = registry.wait(task_id, 10)
        assert done is not None and done.status is TaskStatus.DONE
        assert done.response is not None and done.response.body == b"echo:again"
        assert attempts == [2] and done.worker == service.worker_id()
        assert multiprocess == [True]
    finally:
        service.shutdown()


def test_a_lost_task_is_taken_over_only_once_the_pool_has_room() -> None:
    registry = MemoryRegistry()
    service, route, gate = one_held_thread(registry)
    try:
        service.submit(route, snapshot(POST, b"running"))
        service.submit(route, snapshot(POST, b"queued"))
        # The supervisor reaps only as many as the pool has places for: none now.
        task_id = lost_task(registry, b"lost")
        time.sleep(1.0)
        pending = registry.get(task_id)
        assert pending is not None and pending.status is TaskStatus.RUNNING
        gate.set()  # places free up: the lost task is taken over and run here
        done = registry.wait(task_id, 10)
        assert done is not None and done.status is TaskStatus.DONE
    finally:
        gate.set()
        service.shutdown()


def test_a_taken_over_task_queued_at_a_drain_is_left_for_another_process() -> None:
    registry = MemoryRegistry()
    observer = Deltas()
    service, route, gate = one_held_thread(registry, observer=observer)
    try:
        submit_running(service, route, observer)
        task_id = lost_task(registry, b"lost")
        until(lambda: observer.heard() == 3)  # taken over: queued behind the running task
        assert observer.queued_deltas[2] == 1
        assert service.drain(timeout=0.1) is False
        left = registry.get(task_id)
        assert left is not None and left.status is TaskStatus.QUEUED  # not failed
        assert left.worker == service.worker_id()
    finally:
        gate.set()
        service.shutdown()


class RequestsNotStored(MemoryRegistry):
    """A real memory registry whose stored requests cannot be read back."""

    def request(self, task_id: str) -> RequestSnapshot | None:
        return None


def test_a_taken_over_task_whose_request_was_not_stored_fails_with_a_stored_500() -> None:
    registry = RequestsNotStored()
    service = TaskService(echo_app, registry, build_options([r"^/a"], lease_time=0.6))
    try:
        service.ensure_started()
        task_id = lost_task(registry, b"lost")
        assert stored_failure(registry, task_id) == (500, {
            "error": "Internal Server Error",
            "detail": "The task's request was not stored; it cannot be replayed.",
            "id": task_id})
    finally:
        service.shutdown()


class FillAfterReap(MemoryRegistry):
    """A real memory registry that runs ``after_reap`` once, when a reap hands a task
    over: the pool fills between the reap and the replay's submit."""

    def __init__(self) -> None:
        super().__init__()
        self.after_reap: Callable[[], object] | None = None

    def reap(self, worker: str, limit: int = 100) -> list[TaskRecord]:
        records = super().reap(worker, limit)
        hook = self.after_reap
        if records and hook is not None:
            self.after_reap = None
            hook()
        return records


def test_a_taken_over_task_with_no_free_worker_fails_with_a_stored_503() -> None:
    registry = FillAfterReap()
    service, route, gate = one_held_thread(registry)

    def fill() -> None:
        service.submit(route, snapshot(POST, b"running"))
        service.submit(route, snapshot(POST, b"queued"))

    registry.after_reap = fill
    try:
        service.ensure_started()
        task_id = lost_task(registry, b"lost")
        assert stored_failure(registry, task_id) == (503, {
            "error": "Service Unavailable",
            "detail": "No worker was free to replay the task after its worker was lost.",
            "id": task_id})
    finally:
        gate.set()
        service.shutdown()


def test_a_task_environ_is_the_snapshot_plus_the_pep_3333_keys_and_the_handle() -> None:
    seen: dict[str, Any] = {}

    def app(environ: Any, start_response: Any) -> Any:
        seen.update(environ)
        return echo_app(environ, start_response)

    registry = MemoryRegistry()
    options = build_options([r"^/a"])
    service = TaskService(app, registry, options)
    try:
        # A snapshot stored without a scheme (made by hand, or by an older version).
        bare = RequestSnapshot({"REQUEST_METHOD": "POST", "PATH_INFO": "/a",
                                "SCRIPT_NAME": "", "QUERY_STRING": "", "CONTENT_LENGTH": "2"},
                               b"hi")
        record, _ = service.submit(options.routes[0], bare)
        done = registry.wait(record.id, 10)
        assert done is not None and done.status is TaskStatus.DONE
    finally:
        service.shutdown()
    added = {"wsgi.version", "wsgi.url_scheme", "wsgi.input", "wsgi.input_terminated",
             "wsgi.errors", "wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once",
             "wsgi.file_wrapper", "wsgi_async.task"}
    assert set(seen) == set(bare.environ) | added
    assert seen["wsgi.url_scheme"] == "http" and seen["wsgi.version"] == (1, 0)
    assert seen["wsgi_async.task"].id == record.id


def test_an_inline_task_sees_whether_the_server_runs_several_processes() -> None:
    seen: list[object] = []

    def app(environ: Any, start_response: Any) -> Any:
        seen.append(environ["wsgi.multiprocess"])
        return echo_app(environ, start_response)

    options = build_options([r"^/a"], executor="inline")
    service = TaskService(app, MemoryRegistry(), options)
    try:
        service.submit(options.routes[0], snapshot(POST, b"one"), multiprocess=True)
        service.submit(options.routes[0], snapshot(POST, b"two"), multiprocess=False)
        assert seen == [True, False]
    finally:
        service.shutdown()


def test_an_inline_task_repeated_by_its_key_runs_once() -> None:
    ran: list[bytes] = []

    def app(environ: Any, start_response: Any) -> Any:
        ran.append(environ["wsgi.input"].read())
        return echo_app(environ, start_response)

    options = build_options([r"^/a"], executor="inline")
    service = TaskService(app, MemoryRegistry(), options)
    route = options.routes[0]
    try:
        first, outcome = service.submit(route, snapshot(POST, b"once"), key="k")
        assert outcome == "new" and first.status is TaskStatus.DONE
        again, outcome = service.submit(route, snapshot(POST, b"once"), key="k")
        assert (again.id, outcome) == (first.id, "repeated")
        assert ran == [b"once"]
    finally:
        service.shutdown()


def test_an_inline_task_stored_after_its_submit_failed_runs_once_for_the_retry() -> None:
    registry = LostCreateReplies(lose=1)
    seen: list[object] = []

    def app(environ: Any, start_response: Any) -> Any:
        seen.append(environ["wsgi.multiprocess"])
        return echo_app(environ, start_response)

    options = build_options([r"^/a"], executor="inline", lease_time=0.6)
    service = TaskService(app, registry, options)
    route = options.routes[0]
    try:
        with pytest.raises(Refused):
            service.submit(route, snapshot(POST, b"keyed"), key="k1", multiprocess=True)
        [lost] = registry.lost
        again, outcome = service.submit(route, snapshot(POST, b"keyed"), key="k1",
                                        multiprocess=True)
        assert (again.id, outcome) == (lost, "repeated")
        # The supervisor runs it, with the request it was submitted with.
        done = registry.wait(lost, 10)
        assert done is not None and done.status is TaskStatus.DONE
        assert done.response is not None and done.response.body == b"echo:keyed"
        assert seen == [True]
    finally:
        service.shutdown()


def test_a_refusal_carries_its_reason_as_its_message() -> None:
    gate = threading.Event()

    def app(environ: Any, start_response: Any) -> Any:
        gate.wait(10)
        return echo_app(environ, start_response)

    options = build_options([r"^/a"], max_workers=1, max_queued=1)
    service = TaskService(app, MemoryRegistry(), options)
    try:
        service.submit(options.routes[0], snapshot(POST, b"running"))
        service.submit(options.routes[0], snapshot(POST, b"queued"))
        with pytest.raises(Refused) as refused:
            service.submit(options.routes[0], snapshot(POST, b"refused"))
        reason = "all 1 workers are busy and 1 tasks wait"
        assert (str(refused.value), refused.value.reason) == (reason, reason)
        assert refused.value.detail == (
            "The server is busy: its task queue is full; try again later.")
        assert refused.value.kind == "queue_full"
    finally:
        gate.set()
        service.shutdown()


def test_a_refused_request_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()

    def app(environ: Any, start_response: Any) -> Any:
        gate.wait(10)
        return echo_app(environ, start_response)

    middleware, test_app = client(app, max_workers=1, max_queued=1)
    try:
        test_app.post("/async", b"running", status=202)
        test_app.post("/async", b"queued", status=202)
        refused = test_app.post("/async", b"refused", status=503)
        assert refused.json["detail"] == (
            "The server is busy: its task queue is full; try again later.")
        [logged] = [r for r in caplog.records if "refused" in r.getMessage()]
        assert logged.levelno == logging.WARNING
        assert logged.getMessage() == (
            "wsgi_async: refused a task for ^/async: all 1 workers are busy and 1 tasks wait")
    finally:
        gate.set()
        middleware.shutdown()


def test_a_task_s_error_stream_takes_lines(capsys: pytest.CaptureFixture[str]) -> None:
    def app(environ: Any, start_response: Any) -> Any:
        environ["wsgi.errors"].writelines(["first line\n", "second line\n"])
        return echo_app(environ, start_response)

    options = build_options([r"^/a"], executor="inline")
    service = TaskService(app, MemoryRegistry(), options)
    try:
        record, _ = service.submit(options.routes[0], snapshot(POST, b"x"))
        assert record.status is TaskStatus.DONE
        assert capsys.readouterr().err == "first line\nsecond line\n"
    finally:
        service.shutdown()


def test_a_snapshot_keeps_the_requests_strings_and_drops_what_the_server_owns() -> None:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST", "SCRIPT_NAME": "/app", "PATH_INFO": "/a",
        "QUERY_STRING": "q=1", "CONTENT_LENGTH": "99", "HTTP_X_ONE": "1",
        "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.url_scheme": "https",
        "mod_wsgi.process_group": "web", "gunicorn.socket": object(),
        "myapp.tenant": "acme", "REMOTE_PORT": 5000,
    }
    kept = snapshot(environ, b"body")
    assert kept.body == b"body"
    assert kept.environ == {
        "REQUEST_METHOD": "POST", "SCRIPT_NAME": "/app", "PATH_INFO": "/a",
        "QUERY_STRING": "q=1", "CONTENT_LENGTH": "4", "HTTP_X_ONE": "1",
        "wsgi.url_scheme": "https", "myapp.tenant": "acme",
    }
    # What PEP 3333 lets a server leave out is filled in.
    bare = snapshot({"REQUEST_METHOD": "GET"}, b"")
    assert bare.environ == {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "",
                            "QUERY_STRING": "", "CONTENT_LENGTH": "0", "wsgi.url_scheme": "http"}
