"""Prometheus metrics: recorded per event in one process, and summed over a live ``gunicorn -w 2``.

The multi-process test runs gunicorn for real with ``PROMETHEUS_MULTIPROC_DIR``
and scrapes ``/metrics`` over HTTP until both workers have answered: every
scrape must report the totals of both processes.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from wsgi_async import AsyncMiddleware
from wsgi_helpers import Environ, Gate, client, echo_app, raw_call, sleeping, wait_result

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def failing_app(environ: Environ, start_response: Any) -> Any:
    if environ["PATH_INFO"] == "/async/fail":
        raise RuntimeError("this task fails")
    return echo_app(environ, start_response)


# -- one process ------------------------------------------------------------------------


@pytest.fixture
def made() -> Iterator[list[AsyncMiddleware]]:
    middlewares: list[AsyncMiddleware] = []
    yield middlewares
    for middleware in middlewares:
        middleware.shutdown(wait=True, timeout=5)


def test_each_event_is_counted_and_served_on_the_metrics_path(
    made: list[AsyncMiddleware],
) -> None:
    middleware, app = client(failing_app, metrics="/metrics", max_body_size=64)
    made.append(middleware)
    route = "^/async"
    before = parse(app.get("/metrics").text)

    done = wait_result(app, app.post("/async/ok", b"x", status=202).headers["Location"])
    assert done.status_int == 201
    failed = wait_result(app, app.post("/async/fail", b"x", status=202).headers["Location"])
    assert failed.status_int == 500
    app.post("/async/ok", b"x" * 65, status=413)
    app.post("/async/ok", b"x", headers={"Idempotency-Key": "not quoted"}, status=400)
    # A result is visible as soon as it is stored; its metrics follow a moment later.
    middleware.shutdown(wait=True, timeout=5)

    after = parse(app.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("wsgi_async_tasks_accepted_total", route=route) == 2
    assert delta("wsgi_async_tasks_finished_total", route=route, outcome="done",
                 status_class="2xx") == 1
    assert delta("wsgi_async_tasks_finished_total", route=route, outcome="failed",
                 status_class="5xx") == 1
    assert delta("wsgi_async_tasks_refused_total", route=route, reason="body_too_large") == 1
    assert delta("wsgi_async_tasks_refused_total", route=route,
                 reason="bad_idempotency_key") == 1
    assert delta("wsgi_async_task_run_seconds_count", route=route) == 2
    assert delta("wsgi_async_task_queue_wait_seconds_count", route=route) == 2
    assert value(after, "wsgi_async_tasks_running", route=route) == 0
    # The metrics path is served by the middleware, not the application.
    assert app.get("/metrics").headers["Content-Type"].startswith("text/plain")


def test_queue_full_refusals_running_queued_and_long_polls(made: list[AsyncMiddleware]) -> None:
    gate = Gate()
    middleware, app = client(gate, metrics="/metrics", max_workers=1, max_queued=1)
    made.append(middleware)
    before = parse(app.get("/metrics").text)
    running = app.post("/async/1", b"", status=202).headers["Location"]
    deadline = time.monotonic() + 5
    while gate.running < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    app.post("/async/2", b"", status=202)
    app.post("/async/3", b"", status=503)
    polled = threading.Thread(target=wait_result, args=(app, running))
    polled.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            now = parse(app.get("/metrics").text)
            if value(now, "wsgi_async_long_polls") - value(before, "wsgi_async_long_polls"):
                break
            time.sleep(0.02)
        assert value(now, "wsgi_async_long_polls") - value(before, "wsgi_async_long_polls") == 1
        assert value(now, "wsgi_async_tasks_running", route="^/async") == 1
        assert value(now, "wsgi_async_tasks_queued") - value(before,
                                                             "wsgi_async_tasks_queued") == 1
        assert value(now, "wsgi_async_tasks_refused_total", route="^/async",
                     reason="queue_full") - value(before, "wsgi_async_tasks_refused_total",
                                                  route="^/async", reason="queue_full") == 1
    finally:
        gate.opened.set()
        polled.join(10)
    middleware.shutdown(wait=True, timeout=5)
    after = parse(app.get("/metrics").text)
    assert value(after, "wsgi_async_tasks_running", route="^/async") == 0
    assert value(after, "wsgi_async_long_polls") == value(before, "wsgi_async_long_polls")
    assert value(after, "wsgi_async_tasks_queued") == value(before, "wsgi_async_tasks_queued")


def test_each_refusal_is_counted_under_its_route_and_reason(made: list[AsyncMiddleware]) -> None:
    middleware, app = client(echo_app, metrics="/metrics", max_body_size=4)
    made.append(middleware)
    labels = {"route": "^/async"}

    def refusals() -> dict[str, float]:
        samples = parse(app.get("/metrics").text)
        return {reason: value(samples, "wsgi_async_tasks_refused_total", reason=reason, **labels)
                for reason in ("body_too_large", "length_required", "bad_request",
                               "bad_idempotency_key", "idempotency_conflict")}

    before = refusals()
    app.post("/async", b"too large", status=413)
    status, _, _ = raw_call(middleware, {"HTTP_TRANSFER_ENCODING": "chunked"})
    assert status.startswith("411")
    status, _, _ = raw_call(middleware, {"CONTENT_LENGTH": "x"})
    assert status.startswith("400")
    app.post("/async", b"a", headers={"Idempotency-Key": "\x01"}, status=400)
    app.post("/async", b"a", headers={"Idempotency-Key": "k"}, status=202)
    app.post("/async", b"b", headers={"Idempotency-Key": "k"}, status=422)
    after = refusals()
    assert {reason: after[reason] - before[reason] for reason in after} == dict.fromkeys(after, 1)


def test_a_cancelled_task_is_counted_once_and_its_late_result_as_cancelled(
    made: list[AsyncMiddleware],
) -> None:
    gate = Gate()
    middleware, app = client(gate, metrics="/metrics")
    made.append(middleware)
    first = parse(app.get("/metrics").text)
    location = app.post("/async", b"", status=202).headers["Location"]
    deadline = time.monotonic() + 5
    while gate.running < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    app.delete(location, status=204)
    gate.opened.set()  # the application returns: its result is discarded
    middleware.shutdown(wait=True, timeout=5)
    after = parse(app.get("/metrics").text)
    cancelled = {"route": "^/async", "outcome": "cancelled", "status_class": "4xx"}
    assert value(after, "wsgi_async_tasks_cancelled_total") - value(
        first, "wsgi_async_tasks_cancelled_total") == 1
    stored = app.get(location, status="*")
    assert stored.status_int == 410
    finished = value(after, "wsgi_async_tasks_finished_total", **cancelled) - value(
        first, "wsgi_async_tasks_finished_total", **cancelled)
    assert finished == 1, sorted(k for k in after if k[0] == "wsgi_async_tasks_finished_total")


def test_a_timed_out_task_is_counted_with_its_stored_504(made: list[AsyncMiddleware]) -> None:
    middleware, app = client(sleeping(0.5), metrics="/metrics", task_timeout=0.1)
    made.append(middleware)
    labels = {"route": "^/async", "outcome": "failed", "status_class": "5xx"}
    done = {"route": "^/async", "outcome": "done", "status_class": "2xx"}
    first = parse(app.get("/metrics").text)
    before = value(first, "wsgi_async_tasks_finished_total", **labels)
    location = app.post("/async", b"", status=202).headers["Location"]
    assert wait_result(app, location).status_int == 504
    middleware.shutdown(wait=True, timeout=5)  # the thread returns after the 504 was stored
    after = parse(app.get("/metrics").text)
    assert value(after, "wsgi_async_tasks_finished_total", **labels) - before == 1
    assert value(after, "wsgi_async_tasks_finished_total", **done) == value(
        first, "wsgi_async_tasks_finished_total", **done)


def test_metrics_are_off_by_default_and_the_path_is_validated(
    made: list[AsyncMiddleware],
) -> None:
    middleware, app = client(echo_app, routes=["^/async"])
    made.append(middleware)
    assert app.get("/metrics", expect_errors=True).status_int == 201  # the app's own route
    with pytest.raises(ValueError, match="under status_path"):
        AsyncMiddleware(echo_app, routes=["^/a"], metrics="/_async/tasks/metrics")
    with pytest.raises(ValueError, match="absolute URL path"):
        AsyncMiddleware(echo_app, routes=["^/a"], metrics="metrics")
    with pytest.raises(TypeError, match="metrics must be"):
        AsyncMiddleware(echo_app, routes=["^/a"], metrics=1)  # type: ignore[arg-type]


# -- a live gunicorn -w 2 ---------------------------------------------------------------

APP = '''\
import os
from wsgi_async import AsyncMiddleware


def app(environ, start_response):
    if environ["PATH_INFO"] == "/fail":
        raise RuntimeError("this task fails")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


middleware = AsyncMiddleware(
    app,
    routes={"^/slow": ["POST"], "^/fail": ["POST"], "^/queued": {"executor": "workers"}},
    registry="sqlite:///" + os.environ["TASKS_DB"],
    metrics="/metrics",
    max_body_size=1024,
)


def application(environ, start_response):
    """Tags every response with the process that made it."""

    def tagged(status, headers, exc_info=None):
        return start_response(status, [*headers, ("X-Pid", str(os.getpid()))], exc_info)

    return middleware(environ, tagged)
'''

GUNICORN_CONFIG = '''\
from prometheus_client import multiprocess


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
'''


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def scrape_until(port: int, done: Callable[[Samples], bool], within: float = 10.0) -> Samples:
    deadline = time.monotonic() + within
    while True:
        samples = parse(request(port, "GET", "/metrics")[2].decode())
        if done(samples):
            return samples
        assert time.monotonic() < deadline, f"the metrics did not settle in {within} s"
        time.sleep(0.05)


@dataclass
class Deployment:
    port: int
    folder: Path
    env: dict[str, str]


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Deployment]:
    (tmp_path / "metricsapp.py").write_text(APP)
    (tmp_path / "gunicorn_conf.py").write_text(GUNICORN_CONFIG)
    (tmp_path / "prom").mkdir()
    port = free_port()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
               TASKS_DB=str(tmp_path / "tasks.db"))
    command = [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "4",
               "-b", f"127.0.0.1:{port}", "-c", "gunicorn_conf.py", "--graceful-timeout", "2"]
    if "--no-control-socket" in subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True,
        timeout=30).stdout:
        command.append("--no-control-socket")
    log = (tmp_path / "gunicorn.log").open("wb")
    process = subprocess.Popen([*command, "metricsapp:application"], cwd=tmp_path, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (tmp_path / "gunicorn.log").read_text()
            try:
                request(port, "GET", "/metrics")
                break
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not start in 20 s"
                time.sleep(0.1)
        yield Deployment(port, tmp_path, env)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # our child leads its group: master and workers
        process.wait(10)
        log.close()


@pytest.mark.server
def test_a_live_gunicorn_with_two_workers_reports_the_sum_of_both(gunicorn: Deployment) -> None:
    port = gunicorn.port
    locations = []
    for path in ["/slow"] * 6 + ["/fail"] * 2:
        status, headers, _ = request(port, "POST", path, b"x")
        assert status == 202
        locations.append(headers["Location"])
    queued = []
    for _ in range(3):
        status, headers, _ = request(port, "POST", "/queued", b"x")
        assert status == 202
        queued.append(headers["Location"])
    assert request(port, "POST", "/slow", b"x" * 1025)[0] == 413
    outcomes = []
    for location in locations:
        for _ in range(20):  # a poll may land on the other process: the registry is shared
            status, _, _ = request(port, "GET", location, headers={"Prefer": "wait=5"})
            if status != 202:
                break
        outcomes.append(status)
    assert sorted(outcomes) == [200] * 6 + [500] * 2

    # A result is visible as soon as it is stored; its metrics follow a moment later.
    scrape_until(port, lambda samples: value(
        samples, "wsgi_async_task_run_seconds_count", route="^/slow") == 6 and value(
        samples, "wsgi_async_task_run_seconds_count", route="^/fail") == 2)

    # A long-poll on a task no worker will take, held while the scrapes run.
    held = threading.Thread(target=request, args=(port, "GET", queued[0]),
                            kwargs={"headers": {"Prefer": "wait=8"}})
    held.start()
    try:
        answered: set[str] = set()
        deadline = time.monotonic() + 6
        while len(answered) < 2 or time.monotonic() < deadline - 5:
            assert time.monotonic() < deadline, f"only {answered} answered the scrapes"
            status, headers, body = request(port, "GET", "/metrics")
            assert status == 200
            answered.add(headers["X-Pid"])
            samples = parse(body.decode())
            assert value(samples, "wsgi_async_tasks_accepted_total", route="^/slow") == 6
            assert value(samples, "wsgi_async_tasks_accepted_total", route="^/fail") == 2
            assert value(samples, "wsgi_async_tasks_accepted_total", route="^/queued") == 3
            assert value(samples, "wsgi_async_tasks_finished_total", route="^/slow",
                         outcome="done", status_class="2xx") == 6
            assert value(samples, "wsgi_async_tasks_finished_total", route="^/fail",
                         outcome="failed", status_class="5xx") == 2
            assert value(samples, "wsgi_async_tasks_refused_total", route="^/slow",
                         reason="body_too_large") == 1
            assert value(samples, "wsgi_async_task_run_seconds_count", route="^/slow") == 6
            assert value(samples, "wsgi_async_task_queue_wait_seconds_count",
                         route="^/fail") == 2
            assert value(samples, "wsgi_async_tasks_running", route="^/slow") == 0
            assert value(samples, "wsgi_async_tasks_queued") == 0
            # Read from the shared registry: the same whichever process answers.
            assert value(samples, "wsgi_async_queue_depth") == 3
            long_polls = value(samples, "wsgi_async_long_polls")
            assert long_polls in (0, 1)
            time.sleep(0.05)
        assert len(answered) == 2
        assert long_polls == 1, "the held long-poll is counted by whichever process scrapes"
    finally:
        held.join(15)

    # A worker process built from the same middleware records into the same folder.
    command = Path(sys.executable).parent / "wsgi-async"
    with (gunicorn.folder / "worker.log").open("wb") as log:
        worker = subprocess.Popen([str(command), "worker", "metricsapp:middleware", "--threads",
                                   "2", "--grace", "1"], cwd=gunicorn.folder, env=gunicorn.env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for location in queued:
            for _ in range(10):
                status, _, _ = request(port, "GET", location, headers={"Prefer": "wait=3"})
                if status != 202:
                    break
            assert status == 200, (gunicorn.folder / "worker.log").read_text()
        samples = scrape_until(port, lambda samples: value(
            samples, "wsgi_async_task_run_seconds_count", route="^/queued") == 3)
        assert value(samples, "wsgi_async_queue_depth") == 0
        assert value(samples, "wsgi_async_tasks_finished_total", route="^/queued",
                     outcome="done", status_class="2xx") == 3
        assert value(samples, "wsgi_async_task_queue_wait_seconds_count", route="^/queued") == 3
        assert value(samples, "wsgi_async_tasks_accepted_total", route="^/queued") == 3
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
