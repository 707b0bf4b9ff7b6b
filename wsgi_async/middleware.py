"""The WSGI entry point: match a route, submit a task, or pass straight through.

``AsyncMiddleware(app, routes=[...])`` is all a user writes.  Requests whose
path and method match a route are read completely, stored as a task and
answered ``202 Accepted`` at once; the status path is served from the
registry; everything else goes to the application untouched.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from . import graceful
from .config import (
    DEFAULTS,
    Executor,
    Mode,
    Options,
    OwnerFunc,
    Route,
    RouteSpec,
    build_options,
)
from .executor import WorkerPool, check_uwsgi_threads, uwsgi_processes
from .idempotency import caller_scope, parse_idempotency_key, scoped_key
from .logfields import task_fields
from .logsafe import printable
from .model import TaskRecord
from .observer import Observer
from .prefer import Preferences, parse_prefer
from .registry import Registry, open_registry
from .request import BodyError, read_body, snapshot
from .responses import replay, send_error, task_state
from .runner import TaskRunner
from .service import Refused, TaskService
from .status import StatusEndpoint
from .supervisor import Supervisor
from .types import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("wsgi_async")

VARY_PREFER = ("Vary", "Prefer")
# The label of a refused request body in the metrics, by its status.
BODY_REFUSALS = {400: "bad_request", 411: "length_required", 413: "body_too_large"}


class AsyncMiddleware:
    """Run the matching routes of a WSGI application as asynchronous tasks.

    A request whose path and method match a route is read completely, stored
    as a task and answered ``202 Accepted`` with the ``Location`` of its status
    URL; the application's own response is served there once it is done.
    Every option is validated here, and a bad value raises ``ValueError`` or
    ``TypeError`` naming it.

    :param app: the WSGI application to wrap.
    :param routes: regexes matched with ``re.match`` on ``PATH_INFO``: a list,
        or a mapping of regex to a list of methods or to per-route options
        (``methods``, ``timeout``, ``result_ttl``, ``replay``, ``executor``, ``mode``).
    :param registry: where tasks live: a :class:`Registry` or a URL
        (``memory://``, ``sqlite:///path/tasks.db``, ``redis://host:port/db``).
    :param status_path: the path under ``SCRIPT_NAME`` where task URLs live.
    :param executor: where tasks run: ``"threads"`` (this process's pool),
        ``"workers"`` (separate worker processes, through the registry's
        queue) or ``"inline"`` (before the ``202`` is sent; tests only).
    :param max_workers: task threads per process.
    :param max_queued: tasks waiting for a thread; past it ``503``.
    :param max_body_size: bytes of one request body; past it ``413``.
    :param max_result_size: bytes of one buffered response body; past it a stored ``500``.
    :param max_pending_bytes: requests (bodies and headers) held by pending
        tasks of a process; past it ``503``.  At least ``max_body_size``.
    :param max_stored_bytes: result bodies kept by the ``memory://``
        registry; a result that does not fit is stored as a ``507``.
    :param max_tasks: tasks held by a registry opened from a URL; past it ``503``.
    :param result_ttl: seconds a finished task is kept.
    :param task_timeout: seconds a task may run (``None``: no limit); past it a stored ``504``.
    :param retry_after: the ``Retry-After`` seconds sent with ``202`` and ``503``.
    :param max_wait: cap, in seconds, on ``Prefer: wait``.
    :param max_waiters: long-polls held at once per process; past it a poll answers at once.
    :param lease_time: seconds a process's lease lasts without a heartbeat;
        a dead process's tasks are settled within about this time.
    :param drain_timeout: seconds a process stopping (SIGTERM, exit) waits for
        its running tasks to finish and be stored; its queued tasks are failed
        with a stored ``503`` (replayable ones are left for another process).
        Keep it below the server's graceful timeout (gunicorn's default is 30 s).
    :param owner: ``owner(environ) -> str | None`` binds each task to its
        caller; another caller gets ``404``.
    :param metrics: record Prometheus metrics (the ``metrics`` extra); a path
        such as ``"/metrics"`` also serves them there.
    :param tombstone_ttl: seconds a forgotten task's id (expired, cancelled or
        deleted) answers ``410 Gone`` rather than ``404``, for a registry
        opened from a URL; at most ``max_tasks`` such ids are kept.
    :param absolute_location: ``Location`` (and the status document's
        ``location``) as a full URL on the request's scheme and host, as
        werkzeug builds it (right behind ``ProxyFix``); ``False``: a path.
    :param mode: which requests of a route become tasks, globally or per route
        (``{"mode": ...}``): ``"always"``, or ``"prefer"``, only those that ask
        with ``Prefer: respond-async`` (RFC 7240); the others reach the
        application as if the middleware were absent.
    """

    def __init__(
        self,
        app: WSGIApplication,
        routes: RouteSpec,
        *,
        registry: Registry | str = "memory://",
        status_path: str = DEFAULTS.status_path,
        executor: Executor = DEFAULTS.executor,
        max_workers: int = DEFAULTS.max_workers,
        max_queued: int = DEFAULTS.max_queued,
        max_body_size: int = DEFAULTS.max_body_size,
        max_result_size: int = DEFAULTS.max_result_size,
        max_pending_bytes: int = DEFAULTS.max_pending_bytes,
        max_stored_bytes: int = DEFAULTS.max_stored_bytes,
        max_tasks: int = DEFAULTS.max_tasks,
        result_ttl: float = DEFAULTS.result_ttl,
        task_timeout: float | None = DEFAULTS.task_timeout,
        retry_after: int = DEFAULTS.retry_after,
        max_wait: float = DEFAULTS.max_wait,
        max_waiters: int = DEFAULTS.max_waiters,
        lease_time: float = DEFAULTS.lease_time,
        drain_timeout: float = DEFAULTS.drain_timeout,
        owner: OwnerFunc | None = None,
        metrics: bool | str = False,
        tombstone_ttl: float = DEFAULTS.tombstone_ttl,
        absolute_location: bool = DEFAULTS.absolute_location,
        mode: Mode = DEFAULTS.mode,
    ) -> None:
        options = {
            name: value for name, value in locals().items()
            if name not in ("self", "app", "routes", "registry")
        }
        if not callable(app):
            raise TypeError(f"app must be a WSGI callable, got {app!r}")
        check_uwsgi_threads()
        self.app = app
        self.options: Options = build_options(routes, **options)
        self.registry = self._open(registry)
        if "workers" in self.options.executors and not self.registry.capabilities.queue:
            raise ValueError(
                "executor='workers' needs a registry with a queue, which separate worker "
                f"processes share; {type(self.registry).__name__} has none: use "
                "registry='sqlite:///path/tasks.db' or 'redis://host:port/db'"
            )
        observer = Observer()
        self._metrics: tuple[str, WSGIApplication] | None = None  # (path, app) serving them
        if self.options.metrics:
            from .metrics import PrometheusMetrics, make_metrics_app

            observer = PrometheusMetrics()
            if isinstance(self.options.metrics, str):
                self._metrics = (self.options.metrics, make_metrics_app(self.registry))
        self.service = TaskService(app, self.registry, self.options, observer)
        self._status_path = self.options.status_path
        self._status_length = len(self._status_path)
        self._retry_after = [("Retry-After", str(self.options.retry_after))]
        self._owner_func = self.options.owner
        self.status = StatusEndpoint(self.registry, self.options)
        self.status.observer = observer
        # Drained on SIGTERM and at exit, so that a stopping server loses no running task.
        graceful.register(self.service)

    @property
    def pool(self) -> WorkerPool:
        """This process's task threads (the service's executor)."""
        return self.service.pool

    @property
    def supervisor(self) -> Supervisor:
        return self.service.supervisor

    @property
    def runner(self) -> TaskRunner:
        return self.service.runner

    def _open(self, registry: Registry | str) -> Registry:
        if isinstance(registry, str):
            return open_registry(registry, max_tasks=self.options.max_tasks,
                                 max_stored_bytes=self.options.max_stored_bytes,
                                 tombstone_ttl=self.options.tombstone_ttl)
        if isinstance(registry, Registry):
            return registry
        raise TypeError(f"registry must be a Registry or a URL string, got {registry!r}")

    def worker_id(self) -> str:
        """This process's id in the registry."""
        return self.service.worker_id()

    # -- WSGI ------------------------------------------------------------------

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        if not self.service.server_checked:
            self.status.not_found_hint = self.service.check_server(
                bool(environ.get("wsgi.multiprocess", False)) or uwsgi_processes() > 1
            )
        path = environ.get("PATH_INFO", "")
        if self._metrics is not None and path == self._metrics[0]:
            return self._metrics[1](environ, start_response)
        # The status path itself, or anything under it ("<status_path>/...").
        if path.startswith(self._status_path) and (
            len(path) == self._status_length or path[self._status_length] == "/"
        ):
            self.service.ensure_started()
            graceful.watch()
            return self.status(environ, start_response, self._owner(environ))
        route = self.options.route_for(path, environ.get("REQUEST_METHOD", "GET"))
        # A task's own request (this middleware reached again, or another one stacked
        # below it) runs the application: submitting it again would store a 202 as its result.
        if route is None or "wsgi_async.task" in environ:
            return self.app(environ, start_response)
        # Opt-in routes (RFC 7240): only a request that asks becomes a task.
        if self.options.mode_of(route) == "prefer" and not parse_prefer(environ).respond_async:
            return self.app(environ, start_response)
        return self._submit(environ, start_response, route)

    def _submit(
        self, environ: WSGIEnvironment, start_response: StartResponse, route: Route
    ) -> Iterable[bytes]:
        graceful.watch()
        try:
            body = read_body(environ, self.options.max_body_size)
            key = parse_idempotency_key(environ)
        except BodyError as exc:
            log.warning("wsgi_async: refused %s %s: %s", printable(environ.get("REQUEST_METHOD")),
                        printable(environ.get("PATH_INFO")), printable(exc.detail),
                        extra=task_fields(None, route.pattern.pattern, outcome="refused",
                                          status=exc.code))
            self.service.observer.refused(route.pattern.pattern, BODY_REFUSALS.get(
                exc.code, "bad_request"))
            return send_error(environ, start_response, exc.code, exc.detail)
        except ValueError as exc:
            self.service.observer.refused(route.pattern.pattern, "bad_idempotency_key")
            return send_error(environ, start_response, 400, str(exc))
        owner = self._owner(environ)
        prefer = parse_prefer(environ)
        try:
            stored, outcome = self.service.submit(
                route, snapshot(environ, body), owner=owner,
                key=None if key is None else scoped_key(caller_scope(environ, owner), key),
                multiprocess=bool(environ.get("wsgi.multiprocess", False)),
            )
        except Refused as refusal:
            log.log(refusal.level, "wsgi_async: refused a task for %s: %s",
                    route.pattern.pattern, refusal.reason,
                    extra=task_fields(None, route.pattern.pattern, outcome="refused", status=503))
            self.service.observer.refused(route.pattern.pattern, refusal.kind)
            return send_error(environ, start_response, 503, refusal.detail, self._retry_after)
        if outcome == "conflict":
            self.service.observer.refused(route.pattern.pattern, "idempotency_conflict")
            return send_error(environ, start_response, 422,
                              "This Idempotency-Key was already used for a different request.")
        if outcome == "repeated":
            log.info("wsgi_async: task %s repeated by its Idempotency-Key", stored.id,
                     extra=task_fields(stored.id, stored.route, outcome="repeated"))
        else:
            log.info("wsgi_async: task %s accepted route=%s", stored.id, stored.route,
                     extra=task_fields(stored.id, stored.route, outcome="accepted"))
        return self._accepted(environ, start_response, stored, prefer)

    def _accepted(
        self, environ: WSGIEnvironment, start_response: StartResponse, record: TaskRecord,
        prefer: Preferences,
    ) -> Iterable[bytes]:
        # Whether the answer is a 202 or the result itself depends on Prefer: say so.
        if prefer.wait:
            wait = min(prefer.wait, self.options.max_wait)
            waited = self.status.wait_for(record, wait)
            if waited is not None and waited.status.is_final and waited.response is not None:
                applied = f"wait={wait:g}"
                if prefer.respond_async:
                    applied = f"respond-async, {applied}"
                return replay(environ, start_response, waited.response, self.status.private,
                              [("Preference-Applied", applied), VARY_PREFER,
                               task_state(waited.status.value, waited.id)])
            record = waited or record
        extra = [VARY_PREFER]
        if prefer.respond_async:
            extra.append(("Preference-Applied", "respond-async"))
        return self.status.pending(environ, start_response, record, extra)

    def _owner(self, environ: WSGIEnvironment) -> str | None:
        if self._owner_func is None:
            return None
        identity = self._owner_func(environ)
        if identity is None:
            return None
        return hashlib.sha256(identity.encode("utf-8")).hexdigest()

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the pool (finishing queued tasks when ``wait``) and the supervisor.

        Tasks still running afterwards (``wait=False``, or past ``timeout``)
        are settled by another process once this one's lease lapses.
        """
        self.service.shutdown(wait=wait, timeout=timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Stop as a server stops a process; what SIGTERM and exit do (see ``drain_timeout``).

        No new task is accepted; queued tasks are failed with a stored ``503``
        (replayable ones are left for another process); running tasks get up
        to ``timeout`` seconds (default ``drain_timeout``) to finish and be
        stored.  Returns whether every task ended.
        """
        return self.service.drain(timeout)

