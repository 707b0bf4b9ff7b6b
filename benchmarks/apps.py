"""The WSGI application of every contender: one tiny Flask app, served six ways.

gunicorn loads ``benchmarks.apps:make_app()``, which reads ``BENCH_APP``:

``bare``         the Flask app, every endpoint synchronous (the ceiling);
``passthrough``  the same wrapped by :class:`AsyncMiddleware` whose route never matches;
``wsgi_async``   wrapped with ``POST /noop``, ``/sleep`` and ``/cpu`` as async routes, run
                 on the pool's threads or (``BENCH_EXECUTOR=workers``) by a
                 ``wsgi-async worker benchmarks.apps:middleware`` process;
``recipe``       the same endpoints under the thread-per-request ``@async_api`` recipe;
``celery``, ``rq`` a front whose ``POST`` enqueues the work and whose
                 ``GET /status/<id>`` answers 202, then the result.

``GET /noop`` is synchronous everywhere: it is the pass-through request.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request

from .work import WORK

ASYNC_ROUTES = {r"^/(noop|sleep|cpu)$": ["POST"]}
NEVER = [r"^/never-matches/"]


def _n() -> int:
    return int(request.args.get("n", "0"))


def _args(name: str) -> tuple[Any, ...]:
    """The work's arguments from the query: ``n``, and ``seconds`` for ``sleep``."""
    if name == "sleep" and "seconds" in request.args:
        return _n(), float(request.args["seconds"])
    return (_n(),)


def _endpoint(name: str) -> Callable[[], Any]:
    work = WORK[name]

    def view() -> Any:
        return jsonify(work(*_args(name)))

    view.__name__ = name
    return view


def flask_app(decorate: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
              *, posts: bool = True) -> Flask:
    """``GET /noop`` synchronous; ``POST /noop`` and ``POST /sleep`` plain or decorated.

    A front for a task queue (``posts=False``) adds its own ``POST`` routes.
    """
    app = Flask("bench")
    app.add_url_rule("/noop", "noop_get", _endpoint("noop"), methods=["GET"])
    for name in WORK if posts else ():
        view = _endpoint(name)
        app.add_url_rule(f"/{name}", name, decorate(view) if decorate else view, methods=["POST"])
    return app


def recipe_app() -> Flask:
    from .recipe import async_api, tasks_bp

    app = flask_app(async_api)
    app.register_blueprint(tasks_bp)
    return app


def _accepted(task_id: str, status: str = "queued") -> Response:
    """The front's 202: the task id, its state and its status URL."""
    response = jsonify({"id": task_id, "status": status})
    response.status_code = 202
    response.headers["Location"] = f"/status/{task_id}"
    return response


def celery_front() -> Flask:
    """Submit with ``task.delay()``; the status route reads ``AsyncResult``."""
    from .celery_app import app as celery
    from .celery_app import tasks

    app = flask_app(posts=False)
    for name, task in tasks.items():
        def submit(task: Any = task, name: str = name) -> Response:
            return _accepted(task.delay(*_args(name)).id)

        app.add_url_rule(f"/{name}", name, submit, methods=["POST"])

    @app.get("/status/<task_id>")
    def status(task_id: str) -> Response:
        result = celery.AsyncResult(task_id)
        if not result.ready():
            return _accepted(task_id, "pending")
        if not result.successful():
            return Response("task failed", 500)
        return jsonify(result.result)

    return app


def rq_front() -> Flask:
    """Submit with ``queue.enqueue()``; the status route reads the job and its result."""
    from redis import Redis
    from rq import Queue
    from rq.job import Job, JobStatus

    connection = Redis.from_url(os.environ["BENCH_REDIS_URL"])
    queue = Queue(os.environ.get("BENCH_QUEUE", "bench"), connection=connection)
    app = flask_app(posts=False)
    for name, work in WORK.items():
        def submit(work: Any = work, name: str = name) -> Response:
            return _accepted(queue.enqueue(work, *_args(name), result_ttl=600).id)

        app.add_url_rule(f"/{name}", name, submit, methods=["POST"])

    @app.get("/status/<task_id>")
    def status(task_id: str) -> Response:
        job = Job.fetch(task_id, connection=connection)
        state = job.get_status(refresh=False)
        if state == JobStatus.FINISHED:
            return jsonify(job.return_value())
        if state in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            return Response("task failed", 500)
        return _accepted(task_id, "pending")

    return app


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def wsgi_async_app(routes: Any) -> Any:
    from wsgi_async import AsyncMiddleware

    return AsyncMiddleware(
        flask_app(),
        routes=routes,
        registry=os.environ.get("BENCH_REGISTRY", "memory://"),
        max_workers=_int("BENCH_MAX_WORKERS", 8),
        max_queued=_int("BENCH_MAX_QUEUED", 1000),
        max_tasks=_int("BENCH_MAX_TASKS", 100_000),
        result_ttl=float(os.environ.get("BENCH_RESULT_TTL", "600")),
        lease_time=float(os.environ.get("BENCH_LEASE_TIME", "15")),
        executor="workers" if os.environ.get("BENCH_EXECUTOR") == "workers" else "threads",
    )


def __getattr__(name: str) -> Any:
    """``benchmarks.apps:middleware``: the object the web server serves, for the worker."""
    if name == "middleware":
        return _make_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def with_heap_probe(app: Any) -> Any:
    """``GET /_bench/heap``: the serving process's live Python memory blocks.

    Resident memory rarely shrinks (the allocator keeps freed arenas for reuse),
    so the memory scenario also reads ``sys.getallocatedblocks()``, which falls
    back when the objects are really freed.
    """
    def probe(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != "/_bench/heap":
            return app(environ, start_response)
        gc.collect()
        body = json.dumps({"blocks": sys.getallocatedblocks(), "pid": os.getpid()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    return probe


def make_app() -> Any:
    return with_heap_probe(_make_app())


def _make_app() -> Any:
    kind = os.environ.get("BENCH_APP", "bare")
    if kind == "bare":
        return flask_app()
    if kind == "passthrough":
        return wsgi_async_app(NEVER)
    if kind == "wsgi_async":
        return wsgi_async_app(ASYNC_ROUTES)
    if kind == "recipe":
        return recipe_app()
    if kind == "celery":
        return celery_front()
    if kind == "rq":
        return rq_front()
    raise ValueError(f"BENCH_APP: unknown application {kind!r}")
