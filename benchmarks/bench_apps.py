"""The WSGI applications under test, shared by the in-process runs and the servers.

The benchmark's gunicorn loads ``bench_apps:make_app()``, which picks the
application from environment variables set by ``run.py``:

``BENCH_APP``
    ``passthrough`` (a trivial app at ``/hello`` and the same app wrapped by
    the middleware at ``/w/hello``, a non-matching path), ``wsgi_async`` (the
    Flask app wrapped by :class:`AsyncMiddleware`) or ``recipe`` (the same
    views decorated with the thread-per-request ``@async_api`` recipe).
``BENCH_REGISTRY``, ``BENCH_PREFIX``
    The wsgi_async registry URL, and the Redis key prefix when it is Redis.
``BENCH_MAX_WORKERS``, ``BENCH_MAX_QUEUED``
    The middleware's bounds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from bench_tasks import slow, work
from flask import Flask, request
from recipe import async_api, tasks_bp

from wsgi_async import AsyncMiddleware, Registry
from wsgi_async.types import StartResponse, WSGIApplication, WSGIEnvironment

ROUTES = [r"^/reports/"]
HELLO = b"hello\n"


def hello_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The trivial application of the pass-through figures."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [HELLO]


def wrap(app: WSGIApplication, **options: Any) -> AsyncMiddleware:
    return AsyncMiddleware(app, routes=ROUTES, **options)


def passthrough_app() -> WSGIApplication:
    """``/w/...`` goes through the middleware (no route matches), the rest straight on."""
    wrapped = wrap(hello_app)

    def dispatch(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        app = wrapped if environ.get("PATH_INFO", "").startswith("/w/") else hello_app
        return app(environ, start_response)

    return dispatch


def report(n: int) -> dict[str, int]:
    """``POST /reports/<n>``: the short task."""
    return work(n)


def slow_report() -> dict[str, float]:
    """``POST /reports/slow?seconds=S``: the sleeping task of the bound check."""
    return slow(min(float(request.args.get("seconds", "1")), 30.0))


def hello() -> str:
    return "hello\n"


def nap() -> str:
    """``GET /sleep?seconds=S``, synchronous everywhere: fills the server's threads."""
    time.sleep(min(float(request.args.get("seconds", "0.1")), 5.0))
    return "slept\n"


def flask_app(*, use_recipe: bool = False) -> Flask:
    """The same three views, plain (for the middleware) or with ``@async_api``."""
    app = Flask("bench_apps")
    decorate: Callable[[Callable[..., Any]], Callable[..., Any]] = (
        async_api if use_recipe else (lambda view: view)
    )
    if use_recipe:
        app.register_blueprint(tasks_bp)
    app.add_url_rule("/reports/slow", "slow_report", decorate(slow_report), methods=["POST"])
    app.add_url_rule("/reports/<int:n>", "report", decorate(report), methods=["POST"])
    app.add_url_rule("/hello", "hello", hello)
    app.add_url_rule("/sleep", "nap", nap)
    return app


def registry_from_env() -> Registry | str:
    url = os.environ.get("BENCH_REGISTRY", "memory://")
    if url.startswith("redis://"):
        from wsgi_async.registry.redis import RedisRegistry

        prefix = os.environ["BENCH_PREFIX"]
        registry: Registry = RedisRegistry.from_url(url, prefix=prefix)
        return registry
    return url


def make_app() -> WSGIApplication:
    kind = os.environ.get("BENCH_APP", "passthrough")
    if kind == "passthrough":
        return passthrough_app()
    if kind == "recipe":
        return flask_app(use_recipe=True)
    if kind == "wsgi_async":
        return wrap(
            flask_app(),
            registry=registry_from_env(),
            max_workers=int(os.environ.get("BENCH_MAX_WORKERS", "8")),
            max_queued=int(os.environ.get("BENCH_MAX_QUEUED", "1000")),
        )
    raise ValueError(f"BENCH_APP: unknown application {kind!r}")
