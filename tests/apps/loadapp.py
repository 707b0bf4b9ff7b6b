"""The application the load tests serve under gunicorn (tests/test_load.py).

``POST /job`` (asynchronous) answers ``done:<body>`` at once; ``GET /pid``
answers the serving process's pid.  Configured by environment variables:
``WSGI_ASYNC_TEST_REGISTRY`` (a registry URL) and ``WSGI_ASYNC_TEST_TTL``
(``result_ttl``, short, so that every result expires within the test).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from wsgi_async import AsyncMiddleware


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [b"done:", body]


application = AsyncMiddleware(
    app,
    routes={r"^/job$": ["POST"]},
    registry=os.environ.get("WSGI_ASYNC_TEST_REGISTRY", "memory://"),
    result_ttl=float(os.environ.get("WSGI_ASYNC_TEST_TTL", "300")),
    lease_time=3,  # a supervisor tick (and an expiry sweep) every second
    max_tasks=50_000,
)
