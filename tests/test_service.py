"""The task service behind the middleware, and the ``executor`` option: where tasks run."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from wsgi_async import AsyncMiddleware, MemoryRegistry, TaskService
from wsgi_async.config import build_options
from wsgi_async.request import snapshot
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
