"""The application the graceful-shutdown tests serve (tests/test_shutdown.py).

Configured by environment variables: ``WSGI_ASYNC_TEST_REGISTRY`` (a registry
URL), ``WSGI_ASYNC_TEST_DRAIN`` (``drain_timeout``, seconds) and
``WSGI_ASYNC_TEST_LEASE`` (``lease_time``).  Two task threads per process, so
that a few submits leave some tasks running and the rest queued:

* ``POST /slow?seconds=S`` sleeps S seconds and answers 200 ``done:<body>``
  with the pid that ran it in ``X-Pid``;
* ``POST /replay?seconds=S``, the same on a replayable route;
* ``GET /pid`` answers the serving process's pid.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from wsgi_async import AsyncMiddleware

if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(message)s")


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    task = environ.get("wsgi_async.task")
    if not (task is not None and task.attempt > 1):  # a replay finishes at once
        time.sleep(float(query.get("seconds", ["0"])[0]))
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("X-Pid", str(os.getpid()))])
    return [b"done:", body]


application = AsyncMiddleware(
    app,
    routes={r"^/slow$": ["POST"], r"^/replay$": {"methods": ["POST"], "replay": True}},
    registry=os.environ.get("WSGI_ASYNC_TEST_REGISTRY", "memory://"),
    drain_timeout=float(os.environ.get("WSGI_ASYNC_TEST_DRAIN", "25")),
    lease_time=float(os.environ.get("WSGI_ASYNC_TEST_LEASE", "15")),
    max_workers=2,
)
