"""The application the worker tests serve under gunicorn and run with ``wsgi-async worker``.

Every async route has ``executor="workers"``: the web process only stores and
queues.  Configured by environment variables: ``WSGI_ASYNC_TEST_REGISTRY``,
``WSGI_ASYNC_TEST_LEASE``, ``WSGI_ASYNC_TEST_MAX_QUEUED`` and
``WSGI_ASYNC_TEST_MARKS`` (a folder where each task run leaves a file named
``<task id>.<attempt>`` holding the pid that ran it).
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
    if environ["PATH_INFO"] == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    task = environ.get("wsgi_async.task")
    if environ["PATH_INFO"] == "/steps":
        return steps(environ, start_response, task)
    if task is not None:
        (MARKS / f"{task.id}.{task.attempt}").write_text(str(os.getpid()))
    seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("sleep", ["0"])[0])
    if task is not None and task.attempt > 1:
        seconds = 0  # a replay finishes at once; the first attempt is killed mid-way
    time.sleep(seconds)
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("X-Pid", str(os.getpid())),
                              ("X-Attempt", str(getattr(task, "attempt", 0)))])
    return [b"done:", body]


def steps(environ: dict[str, Any], start_response: Any, task: Any) -> Iterable[bytes]:
    """Report ``count`` steps of 0.1 s each; stop at a cancel and leave ``<id>.cancelled``."""
    count = int(parse_qs(environ.get("QUERY_STRING", "")).get("count", ["100"])[0])
    for step in range(1, count + 1):
        if task.cancelled:
            (MARKS / f"{task.id}.cancelled").write_text(f"{os.getpid()} {step}")
            task.check()  # raises TaskCancelled: the task ends quietly
        time.sleep(0.1)
        task.progress(step, count, f"step {step} in {os.getpid()}")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"all steps"]


application = AsyncMiddleware(
    app,
    routes={
        r"^/work$": {"methods": ["POST"], "executor": "workers"},
        r"^/replay$": {"methods": ["POST"], "replay": True, "executor": "workers"},
        r"^/steps$": {"methods": ["POST"], "executor": "workers"},
    },
    registry=os.environ.get("WSGI_ASYNC_TEST_REGISTRY", "sqlite:///tasks.db"),
    lease_time=float(os.environ.get("WSGI_ASYNC_TEST_LEASE", "15")),
    max_queued=int(os.environ.get("WSGI_ASYNC_TEST_MAX_QUEUED", "1000")),
)
