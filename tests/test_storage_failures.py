"""When the registry's storage goes away: clean 503s, and work resumes when it is back."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from conftest import RedisServer
from wsgi_helpers import Environ, client, read_body, wait_result


def slow_echo(environ: Environ, start_response: Any) -> Iterable[bytes]:
    body = read_body(environ)
    time.sleep(float(body or b"0"))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slept " + body]


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
