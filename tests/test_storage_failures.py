"""When the registry's storage goes away: clean 503s, and work resumes when it is back."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from conftest import RedisServer
from wsgi_async import MemoryRegistry, TaskService, runner
from wsgi_async.config import build_options
from wsgi_async.errors import RegistryUnavailable
from wsgi_async.executor import WorkerPool
from wsgi_async.model import RequestSnapshot, TaskRecord, TaskStatus
from wsgi_async.request import snapshot
from wsgi_async.service import BUSY, Refused
from wsgi_helpers import Environ, client, echo_app, read_body, wait_result


def slow_echo(environ: Environ, start_response: Any) -> Iterable[bytes]:
    body = read_body(environ)
    time.sleep(float(body or b"0"))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slept " + body]


def final_result(app: Any, location: str, polls: int = 5) -> Any:
    """Long-poll until the task is final, at most ``polls`` times."""
    for _ in range(polls):
        res = wait_result(app, location, status="*")
        if res.status_int != 202:
            return res
    raise AssertionError(f"{location} is still pending")


def test_redis_restart_mid_run(durable_redis: RedisServer) -> None:
    middleware, app = client(slow_echo, registry=durable_redis.url + "?prefix=restart:",
                             retry_after=3)
    try:
        before = app.post("/async", b"0").headers["Location"]
        assert wait_result(app, before, status=200).body == b"slept 0"
        in_flight = app.post("/async", b"0.5").headers["Location"]

        durable_redis.kill()
        refused = app.post("/async", b"0", status=503)
        assert refused.headers["Retry-After"] == "3"
        assert refused.headers["Cache-Control"] == "no-store"
        assert refused.json["detail"] == "The task registry is unavailable."
        assert "Traceback" not in refused.text
        poll = app.get(before, status=503)
        assert poll.headers["Retry-After"] == "3"
        assert poll.headers["Async-Task"] == f'unavailable;id="{before.rsplit("/", 1)[1]}"'
        assert poll.json["error"] == "Service Unavailable"
        time.sleep(1.0)  # the in-flight task finishes while Redis is down

        durable_redis.start()
        assert app.get(before, status=200).body == b"slept 0"
        # its worker kept retrying, so the result is stored once Redis is back
        assert wait_result(app, in_flight, status=200).body == b"slept 0.5"
        after = app.post("/async", b"0", status=202).headers["Location"]
        assert wait_result(app, after, status=200).body == b"slept 0"
    finally:
        middleware.shutdown(wait=True, timeout=10)
        middleware.registry.close()


def test_sqlite_locked_by_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    middleware, app = client(slow_echo, registry=f"sqlite:///{path}?busy_timeout=0.3")
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        before = app.post("/async", b"0").headers["Location"]
        assert wait_result(app, before, status=200).body == b"slept 0"
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        refused = app.post("/async", b"0", status=503)
        assert refused.headers["Retry-After"] == "1"
        assert refused.json["detail"] == "The task registry is unavailable."
        assert app.get(before, status=200).body == b"slept 0"  # WAL readers still read
        blocker.execute("ROLLBACK")
        after = app.post("/async", b"0", status=202).headers["Location"]
        assert wait_result(app, after, status=200).body == b"slept 0"
    finally:
        blocker.close()
        middleware.shutdown(wait=True, timeout=10)
        middleware.registry.close()


def test_outcomes_are_settled_after_a_long_outage(
    durable_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker gives up retrying; the supervisor stores the outcome once Redis is back."""
    monkeypatch.setattr(runner, "STORE_RETRIES", (0.05, 0.05))
    middleware, app = client(slow_echo, registry=durable_redis.url + "?prefix=outage:",
                             max_workers=1, lease_time=0.6)
    try:
        running = app.post("/async", b"0.6").headers["Location"]
        queued = app.post("/async", b"0").headers["Location"]
        time.sleep(0.2)  # the first has started; the second waits for the only worker
        durable_redis.kill()
        time.sleep(1.5)  # both give up: the finish of the first, the start of the second
        durable_redis.start()
        finished = final_result(app, running)
        assert (finished.status_int, finished.body) == (200, b"slept 0.6")
        never_started = final_result(app, queued)
        assert never_started.status_int == 503
        assert "unavailable when the task was due to start" in never_started.json["detail"]
    finally:
        middleware.shutdown(wait=True, timeout=10)
        middleware.registry.close()


def test_a_create_redis_runs_after_the_submit_failed_still_ends(
    private_redis: RedisServer,
) -> None:
    """Redis stalls (SIGSTOP) during a submit: the client gets a 503, Redis then runs the
    create it had already read; the retry with the same Idempotency-Key must get a task
    that runs, not one queued for ever under a live process that never queued it."""
    assert private_redis.process is not None
    pid = private_redis.process.pid
    url = private_redis.url + "?prefix=stall:&socket_timeout=1"
    middleware, app = client(slow_echo, registry=url, lease_time=1.5)
    key = {"Idempotency-Key": '"pay-once"'}
    try:
        warm = app.post("/async", b"0").headers["Location"]  # scripts loaded, supervisor up
        assert wait_result(app, warm, status=200).body == b"slept 0"
        os.kill(pid, signal.SIGSTOP)
        try:
            refused = app.post("/async", b"0", headers=key, status=503)
            assert refused.json["detail"] == "The task registry is unavailable."
        finally:
            os.kill(pid, signal.SIGCONT)
        retried = app.post("/async", b"0", headers=key, status="*")
        deadline = time.monotonic() + 10
        while retried.status_int == 503 and time.monotonic() < deadline:
            time.sleep(0.2)
            retried = app.post("/async", b"0", headers=key, status="*")
        assert retried.status_int == 202
        finished = final_result(app, retried.headers["Location"], polls=2)
        assert (finished.status_int, finished.body) == (200, b"slept 0")
    finally:
        middleware.shutdown(wait=True, timeout=10)
        middleware.registry.close()


def test_a_create_redis_runs_after_a_keyless_submit_failed_is_removed(
    private_redis: RedisServer,
) -> None:
    """Without a key nobody can find that task (its client got a 503 and no id): it is
    removed, not run and not left queued."""
    import redis

    assert private_redis.process is not None
    pid = private_redis.process.pid
    url = private_redis.url + "?prefix=stall:&socket_timeout=1"
    middleware, app = client(slow_echo, registry=url, lease_time=1.5)
    keys = redis.Redis.from_url(private_redis.url)
    try:
        warm = app.post("/async", b"0").headers["Location"]
        assert wait_result(app, warm, status=200).body == b"slept 0"
        os.kill(pid, signal.SIGSTOP)
        try:
            app.post("/async", b"0", status=503)
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while True:  # only the warm-up task is left, once the supervisor has settled it
            tasks = list(keys.scan_iter(match="stall:task:*"))
            if len(tasks) == 1:
                break
            assert time.monotonic() < deadline, f"a task nobody knows about is left: {tasks}"
            time.sleep(0.2)
    finally:
        keys.close()
        middleware.shutdown(wait=True, timeout=10)
        middleware.registry.close()


# -- in one process, on the memory registry ------------------------------------------------


class NoHeartbeat(MemoryRegistry):
    """A memory registry that refuses lease renewals, as one that went away does."""

    def heartbeat(self, worker: str, lease: float) -> None:
        raise RegistryUnavailable("no route to the registry")


def test_a_supervisor_that_cannot_start_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = NoHeartbeat()
    options = build_options([r"^/a"])
    service = TaskService(echo_app, registry, options)
    try:
        with caplog.at_level(logging.WARNING, logger="wsgi_async"):
            service.ensure_started()
        assert [record.getMessage() for record in caplog.records] == [
            "wsgi_async: registry unavailable, supervisor not started: no route to the registry"]
    finally:
        service.shutdown()


class ShutDownWhileStoring(MemoryRegistry):
    """A memory registry during whose creates the pool shuts down (the process stopping
    while a task is being stored); it keeps the ids it stored."""

    def __init__(self) -> None:
        super().__init__()
        self.pool: WorkerPool | None = None
        self.stored: list[str] = []

    def create(self, record: TaskRecord, request: RequestSnapshot | None = None,
               key: str | None = None) -> TaskRecord:
        assert self.pool is not None
        self.pool.shutdown(wait=False)
        self.stored.append(record.id)
        return super().create(record, request, key)


def test_a_task_stored_as_the_pool_shuts_down_is_failed_and_its_submit_refused() -> None:
    registry = ShutDownWhileStoring()
    options = build_options([r"^/a"])
    service = TaskService(echo_app, registry, options)
    registry.pool = service.pool
    try:
        with pytest.raises(Refused) as refused:
            service.submit(options.routes[0], snapshot({"REQUEST_METHOD": "POST"}, b"x"))
        assert refused.value.detail == BUSY
        [task_id] = registry.stored
        failed = registry.get(task_id)
        assert failed is not None and failed.status is TaskStatus.FAILED
        assert failed.response is not None and failed.response.status_code == 503
        assert json.loads(failed.response.body)["detail"] == BUSY
    finally:
        service.shutdown()
