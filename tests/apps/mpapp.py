"""The application the multi-process tests serve under gunicorn.

Configured by environment variables so that one module serves every backend:
``WSGI_ASYNC_TEST_REGISTRY`` (a registry URL), ``WSGI_ASYNC_TEST_LEASE``
(seconds) and ``WSGI_ASYNC_TEST_MARKS`` (a folder where each task run leaves
a file named ``<task id>.<attempt>`` holding the pid that ran it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from wsgi_async import AsyncMiddleware

MARKS = Path(os.environ.get("WSGI_ASYNC_TEST_MARKS", "."))


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    task = environ.get("wsgi_async.task")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if task is not None:
        (MARKS / f"{task.id}.{task.attempt}").write_text(str(os.getpid()))
    if path == "/follow" and task is not None:
        return follow(task, start_response)
    seconds = float(query.get("sleep", ["0"])[0])
    if path == "/replay" and task is not None and task.attempt > 1:
        seconds = 0  # the replay finishes at once; the first attempt is killed mid-way
    time.sleep(seconds)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("X-Pid", str(os.getpid())),
                              ("X-Attempt", str(getattr(task, "attempt", 0)))])
    return [b"done:", body]


def follow(task: Any, start_response: Any) -> Iterable[bytes]:
    """Report progress until cancelled; leave ``<id>.cancelled`` saying when it noticed."""
    deadline = time.monotonic() + 60
    step = 0
    while time.monotonic() < deadline and not task.cancelled:
        step += 1
        task.progress(step, None, f"step {step} in {os.getpid()}")
        time.sleep(0.02)
    (MARKS / f"{task.id}.cancelled").write_text(f"{time.time()} {os.getpid()}")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"a late result nobody will see"]


application = AsyncMiddleware(
    app,
    routes={r"^/work$": ["POST"], r"^/replay$": {"methods": ["POST"], "replay": True},
            r"^/follow$": ["POST"]},
    registry=os.environ.get("WSGI_ASYNC_TEST_REGISTRY", "memory://"),
    lease_time=float(os.environ.get("WSGI_ASYNC_TEST_LEASE", "15")),
    max_workers=4,
)
