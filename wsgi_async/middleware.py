"""The WSGI entry point: match a route, submit a task, or pass straight through.

``AsyncMiddleware(app, routes=[...])`` is all a user writes.  Requests whose
path and method match a route are read completely, stored as a task and
answered ``202 Accepted`` at once; the status path is served from the
registry; everything else goes to the application untouched.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import secrets
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from .config import Options, Route, RouteSpec, build_options
from .errors import QueueFull, RegistryError, RegistryFull
from .executor import WorkerPool, check_uwsgi_threads
from .prefer import Preferences, parse_idempotency_key, parse_prefer
from .registry import MemoryRegistry, Registry, open_registry
from .registry.base import RequestSnapshot, TaskRecord, error_response
from .request import BodyError, read_body, snapshot
from .responses import replay, send_error
from .runner import TaskRunner
from .status import StatusEndpoint
from .supervisor import Supervisor
from .types import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("wsgi_async")

BUSY = "The server is busy: its task queue is full; try again later."
FULL = "The server holds too many tasks; try again later."
UNAVAILABLE = "The task registry is unavailable."
NO_THREAD = "No worker could be started."


class Refused(Exception):
    """A task cannot be accepted now; the client should retry (503)."""

    def __init__(self, detail: str, reason: str, level: int) -> None:
        super().__init__(reason)
        self.detail = detail
        self.reason = reason
        self.level = level


def new_task_id() -> str:
    """A URL-safe id with 192 bits from :mod:`secrets`."""
    return secrets.token_urlsafe(24)


class _Job:
    """A task queued in this process's pool."""

    __slots__ = ("middleware", "multiprocess", "request", "task_id")

    def __init__(
        self, middleware: AsyncMiddleware, task_id: str, request: RequestSnapshot,
        multiprocess: bool,
    ) -> None:
        self.middleware = middleware
        self.task_id = task_id
        self.request = request
        self.multiprocess = multiprocess

    @property
    def size(self) -> int:
        return len(self.request.body)

    def run(self) -> None:
        self.middleware.runner.run(self.task_id, self.request, multiprocess=self.multiprocess)

    def cancel(self, reason: str) -> None:
        self.middleware._fail_unqueued(self.task_id, reason)


class AsyncMiddleware:
    """Run the matching routes of a WSGI application as asynchronous tasks.

    ``routes`` is a list of regexes, or a mapping of regex to a list of
    methods or to per-route options (``methods``, ``timeout``,
    ``result_ttl``, ``replay``).  See the README for every keyword option.
    """

    def __init__(
        self,
        app: WSGIApplication,
        routes: RouteSpec,
        *,
        registry: Registry | str = "memory://",
        **options: Any,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be a WSGI callable, got {app!r}")
        check_uwsgi_threads()
        self.app = app
        self.options: Options = build_options(routes, **options)
        self.registry = self._open(registry)
        self._status_path = self.options.status_path
        self._status_length = len(self._status_path)
        self._retry_after = [("Retry-After", str(self.options.retry_after))]
        self._owner_func = self.options.owner
        self._worker: tuple[int, str] = (0, "")
        self._worker_lock = threading.Lock()
        self._warned_multiprocess = False
        self.pool = WorkerPool(
            self.options.max_workers, self.options.max_queued, self.options.max_pending_bytes
        )
        self.supervisor = Supervisor(
            self.registry, self.worker_id, self.options.lease_time, self._requeued,
            free_slots=lambda: self.pool.free_slots,
        )
        self.runner = TaskRunner(
            app, self.registry, self.supervisor, self.worker_id, self.options.max_result_size
        )
        self.status = StatusEndpoint(self.registry, self.options)
        ref = weakref.ref(self)
        atexit.register(_shutdown_ref, ref)

    def _open(self, registry: Registry | str) -> Registry:
        if isinstance(registry, str):
            return open_registry(registry, max_tasks=self.options.max_tasks,
                                 max_stored_bytes=self.options.max_stored_bytes)
        if isinstance(registry, Registry):
            return registry
        raise TypeError(f"registry must be a Registry or a URL string, got {registry!r}")

    def worker_id(self) -> str:
        """This process's id in the registry; a forked child gets its own."""
        pid = os.getpid()
        worker = self._worker
        if worker[0] != pid:
            # Two first requests at once must not each make up an id.
            with self._worker_lock:
                if self._worker[0] != pid:
                    self._worker = (pid, f"{pid}-{secrets.token_hex(8)}")
                worker = self._worker
        return worker[1]

    # -- WSGI ------------------------------------------------------------------

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        # The status path itself, or anything under it ("<status_path>/...").
        if path.startswith(self._status_path) and (
            len(path) == self._status_length or path[self._status_length] == "/"
        ):
            self._start_supervisor()
            return self.status(environ, start_response, self._owner(environ))
        route = self.options.route_for(path, environ.get("REQUEST_METHOD", "GET"))
        if route is None:
            return self.app(environ, start_response)
        return self._submit(environ, start_response, route)

    def _submit(
        self, environ: WSGIEnvironment, start_response: StartResponse, route: Route
    ) -> Iterable[bytes]:
        try:
            body = read_body(environ, self.options.max_body_size)
            key = parse_idempotency_key(environ)
        except BodyError as exc:
            log.warning("wsgi_async: refused %s %s: %s", environ.get("REQUEST_METHOD"),
                        environ.get("PATH_INFO"), exc.detail)
            return send_error(environ, start_response, exc.code, exc.detail)
        except ValueError as exc:
            return send_error(environ, start_response, 400, str(exc))
        owner = self._owner(environ)
        request = snapshot(environ, body)
        record = TaskRecord(
            id=new_task_id(),
            route=route.pattern.pattern,
            worker=self.worker_id(),
            owner=owner,
            fingerprint=fingerprint(request),
            replay=route.replay,
            timeout=self.options.timeout_of(route),
            result_ttl=self.options.result_ttl_of(route),
        )
        scoped = None if key is None else scoped_key(owner, key)
        prefer = parse_prefer(environ)
        try:
            stored = self._enqueue(record, request, scoped, environ)
        except Refused as refusal:
            log.log(refusal.level, "wsgi_async: refused a task for %s: %s",
                    route.pattern.pattern, refusal.reason)
            return send_error(environ, start_response, 503, refusal.detail, self._retry_after)
        if stored.id != record.id:
            if stored.fingerprint != record.fingerprint:
                return send_error(environ, start_response, 422,
                                  "This Idempotency-Key was already used for a different request.")
            log.info("wsgi_async: task %s repeated by its Idempotency-Key", stored.id)
            return self._accepted(environ, start_response, stored, prefer)
        log.info("wsgi_async: task %s accepted route=%s", stored.id, stored.route)
        return self._accepted(environ, start_response, stored, prefer)

    def _enqueue(
        self,
        record: TaskRecord,
        request: RequestSnapshot,
        key: str | None,
        environ: WSGIEnvironment,
    ) -> TaskRecord:
        """Store ``record`` and queue it, or return the task already under ``key``.

        A place in the pool is reserved first, so that a refusal (:class:`Refused`)
        leaves nothing stored and nothing queued.
        """
        size = len(request.body)
        try:
            self.pool.reserve(size)
        except QueueFull as exc:
            raise Refused(BUSY, str(exc), logging.WARNING) from None
        queued = False
        try:
            self.supervisor.ensure_started()
            stored = self.registry.create(record, request if record.replay else None, key)
            if stored.id != record.id:
                return stored
            multiprocess = bool(environ.get("wsgi.multiprocess", False))
            self._warn_if_private(multiprocess)
            try:
                self.pool.put(_Job(self, stored.id, request, multiprocess))
            except (RuntimeError, QueueFull) as exc:
                self._fail_unqueued(stored.id, NO_THREAD if isinstance(exc, RuntimeError)
                                    else BUSY)
                raise
            queued = True
            return stored
        except RegistryFull as exc:
            raise Refused(FULL, str(exc), logging.WARNING) from None
        except RegistryError as exc:
            raise Refused(UNAVAILABLE, str(exc), logging.ERROR) from None
        except QueueFull as exc:  # shut down while the task was being stored
            raise Refused(BUSY, str(exc), logging.WARNING) from None
        except RuntimeError as exc:  # no thread could be started
            raise Refused(NO_THREAD, str(exc), logging.ERROR) from None
        finally:
            if not queued:
                self.pool.release(size)

    def _fail_unqueued(self, task_id: str, detail: str) -> None:
        """A stored task that will not run here must still end: fail it."""
        response = error_response(503, detail, id=task_id)
        try:
            self.registry.fail(task_id, response)
        except RegistryError:
            self.supervisor.retry_later(task_id, lambda: self.registry.fail(task_id, response))

    def _warn_if_private(self, multiprocess: bool) -> None:
        if multiprocess and not self._warned_multiprocess and isinstance(
            self.registry, MemoryRegistry
        ):
            self._warned_multiprocess = True
            log.warning(
                "wsgi_async: the memory:// registry is private to each process, and this "
                "server runs several: polls may reach another process and get 404. "
                "Use registry='sqlite:///path/tasks.db' or 'redis://host:port/db'."
            )

    def _accepted(
        self, environ: WSGIEnvironment, start_response: StartResponse, record: TaskRecord,
        prefer: Preferences,
    ) -> Iterable[bytes]:
        if prefer.wait:
            waited = self.status.wait_for(record, min(prefer.wait, self.options.max_wait))
            if waited is not None and waited.status.is_final and waited.response is not None:
                return replay(environ, start_response, waited.response)
            record = waited or record
        applied = [("Preference-Applied", "respond-async")] if prefer.respond_async else []
        return self.status.pending(environ, start_response, record, applied)

    # -- background work ---------------------------------------------------------

    def _requeued(self, record: TaskRecord) -> None:
        """Run a task that a lost process held, now handed to this one."""
        request = self.registry.request(record.id)
        if request is None:
            self.registry.fail(record.id, error_response(
                500, "The task's request was not stored; it cannot be replayed.", id=record.id))
            return
        try:
            self.pool.submit(_Job(self, record.id, request, True))
        except (QueueFull, RuntimeError):
            self.registry.fail(record.id, error_response(
                503, "No worker was free to replay the task after its worker was lost.",
                id=record.id))

    def _start_supervisor(self) -> None:
        """Any process that serves polls also settles the tasks of dead processes."""
        try:
            self.supervisor.ensure_started()
        except RegistryError as exc:
            log.warning("wsgi_async: registry unavailable, supervisor not started: %s", exc)

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
        drained = self.pool.shutdown(wait=wait, timeout=timeout)
        self.supervisor.stop(retire=drained)


def fingerprint(request: RequestSnapshot) -> str:
    """A hash of what makes a request the same request: method, target and body."""
    env = request.environ
    target = f"{env.get('REQUEST_METHOD', '')}\0{env.get('PATH_INFO', '')}\0" \
        f"{env.get('QUERY_STRING', '')}\0"
    digest = hashlib.sha256(target.encode("utf-8", "surrogateescape"))
    digest.update(request.body)
    return digest.hexdigest()


def scoped_key(owner: str | None, key: str) -> str:
    """An idempotency key is only shared by requests of the same owner."""
    return hashlib.sha256(f"{owner or ''}\0{key}".encode()).hexdigest()


def _shutdown_ref(ref: weakref.ref[AsyncMiddleware]) -> None:
    middleware = ref()
    if middleware is not None:
        middleware.shutdown(wait=False)
