"""The worker loop (``wsgi_async.worker``) in this process: claim, run, store, stop.

The real :class:`~wsgi_async.worker.Worker` runs in a thread of the test
process (every join bounded) against a real registry file in ``tmp_path``; the
web side is a real :class:`~wsgi_async.AsyncMiddleware` with
``executor="workers"`` (or a bare :class:`~wsgi_async.service.TaskService`) on
the same file.  The registry is SQLite by necessity: it is the registry with a
queue that lives in one process (the memory registry has none, Redis is a
server).  The same loop over real ``wsgi-async worker`` processes, on both
registries, is in ``tests/test_workers.py``; the queue's own contract (claim
once, only its routes, the bound, take-over) in ``tests/test_queue.py``.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from prometheus_client.parser import text_string_to_metric_families
from webtest import TestApp

import wsgi_async.worker as worker_module
from wsgi_async import AsyncMiddleware, RegistryError, TaskCancelled
from wsgi_async.config import build_options
from wsgi_async.model import RequestSnapshot, StoredResponse, TaskRecord, TaskStatus, new_task_id
from wsgi_async.registry import MemoryRegistry, Registry
from wsgi_async.registry.sqlite import SQLiteRegistry
from wsgi_async.request import snapshot
from wsgi_async.service import TaskService
from wsgi_async.worker import Worker, build_worker
from wsgi_helpers import Environ, client, echo_app, read_body

WORK = r"^/work$"
OTHER = r"^/other$"
HERE = r"^/here$"  # executor "threads": the web process runs it, never a worker
ROUTES: dict[str, Any] = {
    WORK: {"methods": ["POST"], "executor": "workers"},
    OTHER: {"methods": ["POST"], "executor": "workers"},
    HERE: {"methods": ["POST"]},
}
LOGGER = "wsgi_async"
#: How long one claim blocks in this module's tests, unless a test asks for the real
#: wait (a second): it bounds how long a worker takes to stop.
SHORT_CLAIM_WAIT = 0.2
CLAIM_WAIT = worker_module.CLAIM_WAIT


def wait_for(condition: Callable[[], bool], what: str, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {limit} s"
        time.sleep(0.005)


def headers(task_id: str, body: bytes) -> list[tuple[str, str]]:
    """What :class:`App` answers for a task (its body is ``done:`` and the request's)."""
    return [("Content-Type", "application/octet-stream"), ("X-Task", task_id),
            ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
            ("Content-Length", str(len(body) + 5))]


class App:
    """The application the worker runs: counts each task's runs, keeps what it saw.

    ``?hold`` holds the task until :attr:`release` is set; ``?progress=N`` first
    reports N of 10 steps.  It answers 201 with ``done:`` and the body.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.runs: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.environs: dict[str, Environ] = {}
        self.bodies: dict[str, bytes] = {}
        self.running = 0
        self.peak = 0

    def __call__(self, environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        task = environ["wsgi_async.task"]
        body = read_body(environ)
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        with self.lock:
            self.runs[task.id] = self.runs.get(task.id, 0) + 1
            self.started[task.id] = time.monotonic()
            self.environs[task.id] = dict(environ)
            self.bodies[task.id] = body
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            if "progress" in query:
                task.progress(int(query["progress"][0]), 10, "steps")
            if "hold" in query:
                self.release.wait(10)
        finally:
            with self.lock:
                self.running -= 1
        start_response("201 Created", headers(task.id, body))
        return [b"done:", body]

    def wait_running(self, count: int) -> None:
        wait_for(lambda: self.running >= count, f"{count} task(s) running")


class Running:
    """``worker.run()`` in a thread; :meth:`stop` stops it and returns what run returned."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.returned: list[bool] = []
        self.raised: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="test-worker-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.returned.append(self.worker.run())
        except BaseException as exc:  # handed to the test, which fails on it
            self.raised.append(exc)

    def join(self, limit: float) -> bool:
        self.thread.join(limit)
        assert not self.thread.is_alive(), f"run() did not return within {limit} s"
        assert not self.raised, self.raised
        return self.returned[0]

    def stop(self, limit: float = 5.0) -> bool:
        self.worker.stop()
        return self.join(limit)


class Harness:
    """One registry file; a web middleware on it; workers running in threads."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(worker_module, "CLAIM_WAIT", SHORT_CLAIM_WAIT)
        self.url = f"sqlite:///{tmp_path / 'tasks.db'}"
        self.app = App()
        self.middlewares: list[AsyncMiddleware] = []
        self.registries: list[Registry] = []
        self.running: list[Running] = []

    def web(self, app: Any = None, **options: Any) -> tuple[AsyncMiddleware, TestApp]:
        options.setdefault("routes", ROUTES)
        options.setdefault("registry", self.url)
        middleware, test_app = client(self.app if app is None else app, **options)
        self.middlewares.append(middleware)
        self.registries.append(middleware.registry)
        return middleware, test_app

    def real_claim_wait(self) -> None:
        """Claims block as long as they do outside the tests."""
        self.monkeypatch.setattr(worker_module, "CLAIM_WAIT", CLAIM_WAIT)

    def open(self, url: str | None = None) -> SQLiteRegistry:
        """Another connection to a registry file, as another process has."""
        registry = SQLiteRegistry.from_url(url or self.url)
        self.registries.append(registry)
        return registry

    def start(self, worker: Worker) -> Running:
        if worker.service.registry not in self.registries:
            self.registries.append(worker.service.registry)
        running = Running(worker)
        self.running.append(running)
        return running

    def close(self) -> None:
        self.app.release.set()
        for running in self.running:
            running.worker.stop()
        for running in self.running:
            running.thread.join(10)
        for middleware in self.middlewares:
            middleware.shutdown(wait=True, timeout=5)
        for registry in self.registries:
            registry.close()


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    made = Harness(tmp_path, monkeypatch)
    try:
        yield made
    finally:
        made.close()


def submit(test_app: TestApp, path: str, body: bytes = b"") -> str:
    """POST a task; its id."""
    location: str = test_app.post(path, body, status=202).headers["Location"]
    return location.rsplit("/", 1)[1]


def status_of(test_app: TestApp, task_id: str, wait: float = 0) -> Any:
    headers = {"Prefer": f"wait={wait:g}"} if wait else {}
    return test_app.get(f"/_async/tasks/{task_id}", headers=headers, status="*")


def record_of(registry: Registry, task_id: str) -> Any:
    record = registry.get(task_id)
    assert record is not None, task_id
    return record


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if r.levelno == level]


def logged(caplog: pytest.LogCaptureFixture, text: str) -> Callable[[], bool]:
    return lambda: any(text in message for message in messages(caplog))


# -- building a worker -------------------------------------------------------------------


def test_a_middlewares_worker_takes_its_worker_routes_and_the_defaults(
    harness: Harness,
) -> None:
    middleware, _ = harness.web()
    worker = build_worker(middleware)
    assert worker.routes == (WORK, OTHER)  # never the route the web process runs itself
    assert (worker.threads, worker.grace) == (8, 30.0)
    narrowed = build_worker(middleware, routes=[OTHER], threads=1, grace=0)
    assert (narrowed.routes, narrowed.threads, narrowed.grace) == ((OTHER,), 1, 0)
    by_hand = Worker(TaskService(plain_app, harness.open(), build_options([WORK])), [WORK])
    assert by_hand.grace == 30.0


def plain_app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
    return echo_app(environ, start_response)


PLAIN = ("a plain WSGI application needs --registry and --routes (the route patterns as the "
         "web processes name them); or point the worker at the AsyncMiddleware object the "
         "web server serves")
NO_QUEUE = ("MemoryRegistry has no queue: workers need registry='sqlite:///path/tasks.db' or "
            "'redis://host:port/db'")
Build = Callable[[Harness], object]


def _web(harness: Harness, **options: Any) -> AsyncMiddleware:
    return harness.web(**options)[0]


REFUSALS: list[tuple[str, Build, type[Exception], str]] = [
    ("unknown-route", lambda h: build_worker(_web(h), routes=[WORK, "^/nope$"]), ValueError,
     "routes ['^/nope$'] are not routes of the application with executor='workers'; "
     "those are ['^/work$', '^/other$']"),
    ("threads-route", lambda h: build_worker(_web(h), routes=[HERE]), ValueError,
     "routes ['^/here$'] are not routes of the application with executor='workers'; "
     "those are ['^/work$', '^/other$']"),
    ("no-worker-route", lambda h: build_worker(_web(h, routes=[HERE])), ValueError,
     "no route of the application has executor='workers': nothing would ever reach this "
     "worker"),
    ("plain-bare", lambda h: build_worker(plain_app), ValueError, PLAIN),
    ("plain-no-routes", lambda h: build_worker(plain_app, registry=h.url), ValueError, PLAIN),
    ("plain-empty-routes", lambda h: build_worker(plain_app, registry=h.url, routes=[]),
     ValueError, PLAIN),
    ("plain-no-registry", lambda h: build_worker(plain_app, routes=[WORK]), ValueError, PLAIN),
    ("plain-memory", lambda h: build_worker(plain_app, registry="memory://", routes=[WORK]),
     ValueError, NO_QUEUE),
    ("not-callable", lambda h: build_worker(42, registry=h.url, routes=[WORK]), TypeError,
     "app must be a WSGI callable, got 42"),
    ("threads-0", lambda h: build_worker(plain_app, threads=0), ValueError,
     "threads must be at least 1, got 0"),
    ("threads-bool", lambda h: build_worker(plain_app, threads=True), ValueError,
     "threads must be at least 1, got True"),
    ("threads-str", lambda h: build_worker(plain_app, threads="2"),  # type: ignore[arg-type]
     ValueError, "threads must be at least 1, got '2'"),
    ("threads-float", lambda h: build_worker(plain_app, threads=2.0),  # type: ignore[arg-type]
     ValueError, "threads must be at least 1, got 2.0"),
    ("grace-negative", lambda h: build_worker(plain_app, grace=-0.5), ValueError,
     "grace must be a number of seconds, at least 0, got -0.5"),
    ("grace-nan", lambda h: build_worker(plain_app, grace=math.nan), ValueError,
     "grace must be a number of seconds, at least 0, got nan"),
    ("no-routes", lambda h: Worker(TaskService(plain_app, h.open(), build_options([WORK])), []),
     ValueError, "a worker needs at least one route to claim tasks of"),
    ("memory-service", lambda h: Worker(
        TaskService(plain_app, MemoryRegistry(), build_options([WORK])), [WORK]),
     ValueError, NO_QUEUE),
]


@pytest.mark.parametrize(("build", "kind", "message"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_a_worker_that_could_never_run_a_task_is_refused_with_a_message(
    harness: Harness, build: Build, kind: type[Exception], message: str
) -> None:
    with pytest.raises(kind) as raised:
        build(harness)
    assert str(raised.value) == message


def test_a_middlewares_worker_on_another_registry_url_keeps_its_tombstone_bounds(
    harness: Harness,
) -> None:
    # The web side here is a bare registry, whose supervisor never runs: only the
    # worker's sweeps expire the tasks, as the middleware's options bound them.
    middleware, _ = harness.web(lease_time=0.6, max_tasks=1, tombstone_ttl=2.0)
    web = harness.open()  # its own tombstone_ttl, a day, for an expired task not swept yet
    ids = [new_task_id() for _ in range(2)]
    for task_id in ids:
        web.enqueue(TaskRecord(id=task_id, route=WORK, result_ttl=0.1),
                    snapshot({"REQUEST_METHOD": "POST", "PATH_INFO": "/work",
                              "SERVER_NAME": "example.org", "SERVER_PORT": "80",
                              "SERVER_PROTOCOL": "HTTP/1.1"}, b""),
                    max_queued=10)
    harness.start(build_worker(middleware, registry=harness.url, threads=2))
    for task_id in ids:
        done = web.wait(task_id, 10)
        assert done is not None and done.status is TaskStatus.DONE

    def tombstones() -> list[str]:
        return [task_id for task_id in ids if web.gone(task_id) is not None]

    # Once the worker swept both: at most max_tasks tombstones, each lasting tombstone_ttl.
    wait_for(lambda: len(tombstones()) == 1, "the worker sweeps both, keeping one tombstone")
    [kept] = tombstones()
    wait_for(lambda: web.gone(kept) is None, "the tombstone lapses")


# -- claiming and running ----------------------------------------------------------------


def test_each_task_runs_once_and_the_apps_response_is_stored_for_the_long_poll(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    middleware, web = harness.web()
    held = submit(web, "/work?hold", b"first")
    ids = [held, *(submit(web, "/work", f"task {n}".encode()) for n in range(4))]
    worker = build_worker(middleware, threads=2)
    harness.start(worker)
    harness.app.wait_running(1)
    # A long-poll of the web side, waiting when the task is still running.
    polled: list[Any] = []
    poll = threading.Thread(target=lambda: polled.append(status_of(web, held, wait=10)))
    poll.start()
    wait_for(lambda: len(harness.app.runs) == 5, "the other four run beside the held one")
    assert poll.is_alive() and not polled
    harness.app.release.set()
    poll.join(10)
    assert polled and polled[0].status_int == 201 and polled[0].body == b"done:first"
    for n, task_id in enumerate(ids):
        body = b"first" if n == 0 else f"task {n - 1}".encode()
        answer = status_of(web, task_id, wait=10)
        assert (answer.status_int, answer.body, answer.headers["X-Task"]) == (
            201, b"done:" + body, task_id)
        record = record_of(middleware.registry, task_id)
        assert (record.status, record.attempts) == (TaskStatus.DONE, 1)
        assert record.response == StoredResponse(
            "201 Created", tuple(headers(task_id, body)), b"done:" + body)
    assert harness.app.runs == dict.fromkeys(ids, 1)
    assert harness.app.peak == 2
    assert (f"wsgi_async: worker {worker.service.worker_id()} claims routes ^/work$, ^/other$ "
            "on 2 threads") in messages(caplog)


def test_the_request_reaches_the_application_as_stored(harness: Harness) -> None:
    """The web side here is a bare TaskService; the worker runs a plain WSGI app."""
    options = build_options({WORK: {"executor": "workers"}})
    web = TaskService(echo_app, harness.open(), options)
    try:
        body = bytes(range(256)) * 3
        request = RequestSnapshot({
            "REQUEST_METHOD": "PUT", "SCRIPT_NAME": "/mount", "PATH_INFO": "/work",
            "QUERY_STRING": "a=1&b=%C3%A9", "CONTENT_TYPE": "application/x-thing",
            "CONTENT_LENGTH": str(len(body)), "HTTP_X_NAME": "caf\u00e9",
            "HTTP_COOKIE": "k=v; other=1", "SERVER_NAME": "example.org", "SERVER_PORT": "8443",
            "wsgi.url_scheme": "https", "REMOTE_ADDR": "192.0.2.7",
        }, body)
        record, outcome = web.submit(options.routes[0], request)
        assert outcome == "new"
        worker = build_worker(harness.app, registry=harness.url, routes=[WORK], threads=1)
        harness.start(worker)
        done = web.registry.wait(record.id, 10)
        assert done is not None and done.status is TaskStatus.DONE
        seen = harness.app.environs[record.id]
        assert {k: v for k, v in seen.items() if isinstance(v, str)} == request.environ
        assert harness.app.bodies[record.id] == body
        task = seen["wsgi_async.task"]
        assert (task.id, task.attempt) == (record.id, 1)
        assert seen["wsgi.multiprocess"] is True  # a worker is another process than the web's
        assert seen["wsgi.multithread"] is True and seen["wsgi.run_once"] is False
    finally:
        web.shutdown(wait=True, timeout=5)


def test_a_worker_claims_only_its_routes_and_leaves_the_others_queued(harness: Harness) -> None:
    middleware, web = harness.web()
    other = submit(web, "/other", b"not mine")  # the oldest: claimed first by any worker
    mine = submit(web, "/work", b"mine")
    harness.start(build_worker(middleware, routes=[WORK], threads=2))
    assert status_of(web, mine, wait=10).body == b"done:mine"
    left = record_of(middleware.registry, other)
    assert (left.status, left.worker) == (TaskStatus.QUEUED, None)
    assert status_of(web, other).json["status"] == "queued"
    assert middleware.registry.queued() == 1
    harness.start(build_worker(middleware, threads=1))  # all the routes
    assert status_of(web, other, wait=10).body == b"done:not mine"
    assert harness.app.runs == {mine: 1, other: 1}


def test_a_worker_claims_at_most_its_free_threads_and_waits_without_spinning(
    harness: Harness,
) -> None:
    middleware, web = harness.web()
    harness.start(build_worker(middleware, threads=2))
    first = submit(web, "/work?hold", b"1")
    harness.app.wait_running(1)
    second = submit(web, "/work?hold", b"2")  # claimed alone, while one thread is busy
    harness.app.wait_running(2)
    waiting = [submit(web, "/work", f"{n}".encode()) for n in (3, 4)]
    # Three claims' waits: both threads busy, nothing more is taken, and the loop sleeps
    # meanwhile instead of spinning.
    cpu = time.process_time()
    watch_until = time.monotonic() + 3 * SHORT_CLAIM_WAIT
    while time.monotonic() < watch_until:
        for task_id in waiting:
            record = record_of(middleware.registry, task_id)
            assert (record.status, record.worker) == (TaskStatus.QUEUED, None), record
        time.sleep(0.05)
    assert time.process_time() - cpu < 1.5 * SHORT_CLAIM_WAIT
    assert harness.app.running == 2 and len(harness.app.runs) == 2
    harness.app.release.set()
    for task_id in (first, second, *waiting):
        assert status_of(web, task_id, wait=10).status_int == 201
    assert harness.app.runs == dict.fromkeys((first, second, *waiting), 1)
    assert harness.app.peak == 2


def test_a_thread_freed_by_an_ended_task_is_counted_once(harness: Harness) -> None:
    middleware, web = harness.web()
    harness.start(build_worker(middleware, threads=1))
    ended = submit(web, "/work", b"ended")
    assert status_of(web, ended, wait=10).status_int == 201
    held = submit(web, "/work?hold", b"held")
    harness.app.wait_running(1)
    waiting = submit(web, "/work", b"waiting")
    # The one thread is busy again: for three claims' waits the next task is not taken.
    watch_until = time.monotonic() + 3 * SHORT_CLAIM_WAIT
    while time.monotonic() < watch_until:
        record = record_of(middleware.registry, waiting)
        assert (record.status, record.worker) == (TaskStatus.QUEUED, None), record
        time.sleep(0.05)
    harness.app.release.set()
    assert status_of(web, waiting, wait=10).status_int == 201
    assert harness.app.runs == dict.fromkeys((ended, held, waiting), 1)


def test_a_thread_freed_by_a_task_claims_the_next_at_once(harness: Harness) -> None:
    harness.real_claim_wait()
    middleware, web = harness.web()
    held = submit(web, "/work?hold", b"held")
    following = submit(web, "/work", b"next")
    harness.start(build_worker(middleware, threads=1))
    harness.app.wait_running(1)
    assert record_of(middleware.registry, following).worker is None  # one thread: one claim
    released = time.monotonic()
    harness.app.release.set()
    assert status_of(web, following, wait=10).body == b"done:next"
    # Woken by the task's end, not at the end of the wait for a thread (a second).
    assert harness.app.started[following] - released < 0.5
    assert harness.app.runs == {held: 1, following: 1}


def test_the_registry_option_points_a_middlewares_worker_at_another_registry(
    harness: Harness,
) -> None:
    middleware, web = harness.web()
    elsewhere_url = f"sqlite:///{harness.tmp_path / 'elsewhere.db'}"
    _, elsewhere = harness.web(registry=elsewhere_url)
    here = submit(web, "/work", b"here")
    there = submit(elsewhere, "/work", b"there")
    harness.start(build_worker(middleware, registry=elsewhere_url, threads=1))
    assert status_of(elsewhere, there, wait=10).body == b"done:there"
    assert status_of(web, here).json["status"] == "queued"
    assert harness.app.runs == {there: 1}


# -- stopping ----------------------------------------------------------------------------


def test_stop_lets_the_running_task_finish_and_leaves_the_queued_one_for_another_worker(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    middleware, web = harness.web()
    running = submit(web, "/work?hold", b"running")
    queued = submit(web, "/work", b"queued")
    worker = build_worker(middleware, threads=1)
    loop = harness.start(worker)
    harness.app.wait_running(1)
    stopped = time.monotonic()
    worker.stop()
    name = worker.service.worker_id()
    wait_for(logged(caplog, f"worker {name} stops claiming"), "the loop stops claiming")
    assert (f"wsgi_async: worker {name} stops claiming; waiting up to 30s for running tasks"
            in messages(caplog))
    loop.thread.join(0.3)
    assert loop.thread.is_alive()  # waits for the running task
    harness.app.release.set()
    assert loop.join(10) is True
    since_stop = time.monotonic() - stopped
    # Stored before run() returned.
    assert record_of(middleware.registry, running).response.body == b"done:running"
    [finished] = [m for m in messages(caplog)
                  if m.startswith(f"wsgi_async: worker {name} finished its tasks in ")]
    took = re.fullmatch(r".* finished its tasks in (\d+\.\d)s", finished)
    assert took is not None, finished
    # At most the time from stop() to run()'s return (give or take the rounding).
    assert 0 <= float(took[1]) <= since_stop + 0.05
    assert not messages(caplog, logging.WARNING)
    left = record_of(middleware.registry, queued)
    assert (left.status, left.worker) == (TaskStatus.QUEUED, None)
    assert middleware.registry.queued() == 1
    harness.start(build_worker(middleware, threads=1))
    assert status_of(web, queued, wait=10).body == b"done:queued"
    assert harness.app.runs == {running: 1, queued: 1}


class RecordsRetire(SQLiteRegistry):
    """A real SQLite registry that notes each lease it retires."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.retired: list[str] = []

    def retire(self, worker: str) -> None:
        self.retired.append(worker)
        super().retire(worker)


def test_a_worker_whose_tasks_all_finished_retires_its_lease_as_it_stops(
    harness: Harness,
) -> None:
    _, web = harness.web()
    registry = RecordsRetire(harness.tmp_path / "tasks.db")
    options = build_options({WORK: {"executor": "workers"}}, max_workers=1)
    worker = Worker(TaskService(harness.app, registry, options), [WORK])
    loop = harness.start(worker)
    task_id = submit(web, "/work", b"one")
    assert status_of(web, task_id, wait=10).body == b"done:one"
    assert registry.retired == []
    assert loop.stop() is True
    # Nothing is left to settle: nobody need wait for the lease to lapse.
    assert registry.retired == [worker.service.worker_id()]


def test_stop_while_every_thread_is_busy_returns_once_they_end(harness: Harness) -> None:
    harness.real_claim_wait()
    middleware, web = harness.web()
    held = submit(web, "/work?hold", b"held")
    worker = build_worker(middleware, threads=1)
    loop = harness.start(worker)
    harness.app.wait_running(1)
    worker.stop()
    released = time.monotonic()
    harness.app.release.set()
    assert loop.join(5) is True
    # No claim that blocks for a second after stop().
    assert time.monotonic() - released < 0.6
    assert record_of(middleware.registry, held).status is TaskStatus.DONE


def test_a_worker_stopped_while_every_thread_is_busy_claims_nothing_more(
    harness: Harness,
) -> None:
    # The stop comes while the worker waits for a free thread; the thread frees up
    # within that wait: the worker must not claim the queued task on its way out.
    harness.real_claim_wait()
    middleware, web = harness.web()
    held = submit(web, "/work?hold", b"held")
    worker = build_worker(middleware, threads=1)
    loop = harness.start(worker)
    harness.app.wait_running(1)
    queued = submit(web, "/work", b"left for another worker")
    time.sleep(0.2)  # the loop is in its wait for a free thread by now
    worker.stop()
    harness.app.release.set()
    assert loop.join(5) is True
    assert record_of(middleware.registry, held).status is TaskStatus.DONE
    assert record_of(middleware.registry, queued).status is TaskStatus.QUEUED


def test_stop_while_idle_returns_within_one_claims_wait(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.real_claim_wait()
    caplog.set_level(logging.INFO, logger=LOGGER)
    middleware, _ = harness.web()
    worker = build_worker(middleware, threads=2, grace=0)
    loop = harness.start(worker)
    wait_for(logged(caplog, "claims routes"), "the worker starts claiming")
    began = time.monotonic()
    assert loop.stop() is True
    assert time.monotonic() - began < 1.6  # CLAIM_WAIT, 1 s


def test_past_its_grace_run_returns_false_and_the_task_is_lost_with_the_lease(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    middleware, web = harness.web(lease_time=1.0)
    held = submit(web, "/work?hold", b"too slow")
    worker = build_worker(middleware, threads=1, grace=0.2)
    loop = harness.start(worker)
    harness.app.wait_running(1)
    began = time.monotonic()
    assert loop.stop(limit=5) is False
    assert time.monotonic() - began < 0.2 + SHORT_CLAIM_WAIT + 0.8  # grace, a claim, margin
    assert harness.app.running == 1
    name = worker.service.worker_id()
    assert (f"wsgi_async: worker {name} stopped with tasks still running; they are taken over "
            "once its lease lapses") in messages(caplog, logging.WARNING)
    # The lease was kept, not retired: once it lapses the web process settles the task.
    answer = status_of(web, held, wait=5)
    assert answer.status_int == 500 and answer.json["reason"] == "worker_lost"
    harness.app.release.set()
    wait_for(lambda: harness.app.running == 0, "the late task ends")
    time.sleep(0.2)  # its late result is refused by the registry
    assert status_of(web, held).json["reason"] == "worker_lost"


# -- what the pool cannot hold, outages ------------------------------------------------


def test_a_claimed_task_the_pool_cannot_hold_is_failed_and_its_thread_given_back(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    middleware, web = harness.web(max_body_size=25_000, max_pending_bytes=30_000)
    first = submit(web, "/work?hold", b"a" * 20_000)
    refused = submit(web, "/work", b"b" * 20_000)  # the two do not fit in 30 000 bytes
    harness.start(build_worker(middleware, threads=2))
    answer = status_of(web, refused, wait=10)
    assert answer.status_int == 503
    assert answer.json["detail"] == "No worker could be started."
    assert refused not in harness.app.runs
    (error,) = messages(caplog, logging.ERROR)
    assert error.startswith(f"wsgi_async: cannot run claimed task {refused}: queued and running "
                            "tasks hold ")
    # Its thread was given back: a small task runs beside the held one.
    small = submit(web, "/work?hold", b"small")
    harness.app.wait_running(2)
    harness.app.release.set()
    for task_id in (first, small):
        assert status_of(web, task_id, wait=10).status_int == 201


class FlakyClaims(SQLiteRegistry):
    """A real SQLite registry whose ``claim`` fails as long as ``failing`` says so."""

    def __init__(self, path: Path, failing: Callable[[int], bool]) -> None:
        super().__init__(path)
        self.failing = failing
        self.claims = 0

    def claim(self, worker: str, routes: Any, limit: int, wait: float, lease: float) -> Any:
        self.claims += 1
        if self.failing(self.claims):
            raise RegistryError("the registry is down for the test")
        return super().claim(worker, routes, limit, wait, lease)


def backoffs(caplog: pytest.LogCaptureFixture) -> list[str]:
    pattern = re.compile(r"^wsgi_async: cannot claim tasks, retrying in (\S+)s: "
                         r"the registry is down for the test$")
    found = [pattern.match(m) for m in messages(caplog, logging.WARNING)]
    return [match.group(1) for match in found if match]


def test_claims_that_fail_are_retried_with_a_doubling_backoff_reset_by_a_success(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    registry = FlakyClaims(harness.tmp_path / "tasks.db", lambda n: n in (1, 2, 3, 5))
    middleware, web = harness.web(registry=registry)
    first = submit(web, "/work", b"after the outage")
    harness.start(build_worker(middleware, threads=1))
    assert status_of(web, first, wait=10).body == b"done:after the outage"  # the 4th claim
    wait_for(lambda: registry.claims >= 6, "claims go on after the next failure")
    assert backoffs(caplog) == ["0.1", "0.2", "0.4", "0.1"]


def test_the_claim_backoff_stops_doubling_at_two_seconds_and_stop_cuts_it_short(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    registry = FlakyClaims(harness.tmp_path / "tasks.db", lambda n: True)
    middleware, _ = harness.web(registry=registry)
    loop = harness.start(build_worker(middleware, threads=1))
    wait_for(lambda: len(backoffs(caplog)) >= 6, "six failed claims", limit=8)
    assert backoffs(caplog) == ["0.1", "0.2", "0.4", "0.8", "1.6", "2.0"]
    began = time.monotonic()
    assert loop.stop() is True
    assert time.monotonic() - began < 0.5  # no waiting out the 2 s backoff


# -- progress, cancellation, timeout inside the worker ------------------------------------


def test_progress_reported_in_the_worker_is_read_by_the_web_side(harness: Harness) -> None:
    middleware, web = harness.web()
    task_id = submit(web, "/work?hold&progress=3", b"")
    harness.start(build_worker(middleware, threads=1))
    harness.app.wait_running(1)
    wait_for(lambda: status_of(web, task_id).json["progress"] is not None, "progress stored")
    document = status_of(web, task_id)
    assert document.status_int == 202 and document.json["status"] == "running"
    assert document.json["progress"] == {"current": 3, "total": 10, "percent": 30.0,
                                         "message": "steps"}
    harness.app.release.set()
    assert status_of(web, task_id, wait=10).status_int == 201


class Cancellable:
    """Steps until its handle says the task was cancelled (raising on ``check``, or not)."""

    def __init__(self, use_check: bool) -> None:
        self.use_check = use_check
        self.noticed = threading.Event()
        self.ended: list[str] = []

    def __call__(self, environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        task = environ["wsgi_async.task"]
        if environ["QUERY_STRING"] != "loop":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"next"]
        deadline = time.monotonic() + 10
        step = 0
        try:
            while time.monotonic() < deadline:
                step += 1
                task.progress(step)
                if self.use_check:
                    task.check()
                elif task.cancelled:
                    break
                time.sleep(0.01)
        except TaskCancelled:
            self.ended.append("raised")
            self.noticed.set()
            raise
        self.ended.append("returned")
        self.noticed.set()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"a late result nobody sees"]


@pytest.mark.parametrize("use_check", [False, True], ids=["cancelled", "check"])
def test_a_cancel_on_the_web_side_stops_the_task_in_the_worker(
    harness: Harness, caplog: pytest.LogCaptureFixture, use_check: bool
) -> None:
    app = Cancellable(use_check)
    middleware, web = harness.web(app)
    task_id = submit(web, "/work?loop")
    harness.start(build_worker(middleware, threads=1))
    wait_for(lambda: status_of(web, task_id).json["status"] == "running", "the task runs")
    web.delete(f"/_async/tasks/{task_id}", status=204)
    assert app.noticed.wait(3)  # within about CHECK_INTERVAL
    assert app.ended == ["raised" if use_check else "returned"]
    # Its thread is free again: the next task runs.
    following = submit(web, "/work", b"")
    assert status_of(web, following, wait=10).body == b"next"
    gone = status_of(web, task_id)
    assert gone.status_int == 410 and gone.json["status"] == "cancelled"
    assert not messages(caplog, logging.ERROR)


def test_a_task_past_its_timeout_in_the_worker_gets_504_and_is_told(harness: Harness) -> None:
    app = Cancellable(use_check=False)
    routes = {WORK: {"methods": ["POST"], "executor": "workers", "timeout": 0.4}}
    middleware, web = harness.web(app, routes=routes)
    task_id = submit(web, "/work?loop")
    harness.start(build_worker(middleware, threads=1))
    answer = status_of(web, task_id, wait=5)
    assert answer.status_int == 504 and answer.json["reason"] == "timeout"
    assert app.noticed.wait(3) and app.ended == ["returned"]
    assert status_of(web, task_id).status_int == 504  # the late result is not stored


# -- metrics -------------------------------------------------------------------------------


def finished_done(test_app: TestApp) -> float:
    for family in text_string_to_metric_families(test_app.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "wsgi_async_tasks_finished_total" and sample.labels == {
                    "route": WORK, "outcome": "done", "status_class": "2xx"}:
                return float(sample.value)
    return 0.0


def test_a_middlewares_worker_counts_its_tasks_in_the_middlewares_metrics(
    harness: Harness,
) -> None:
    middleware, web = harness.web(metrics="/metrics")
    before = finished_done(web)
    task_id = submit(web, "/work", b"counted")
    harness.start(build_worker(middleware, threads=1))
    assert status_of(web, task_id, wait=10).status_int == 201
    wait_for(lambda: finished_done(web) == before + 1, "the finished task counted")

