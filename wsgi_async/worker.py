"""The worker loop: claim tasks from the registry's queue and run them on this process.

A :class:`Worker` takes tasks of its routes from the queue (Redis Streams or
the SQLite table), at most one per thread, and hands each to the task
service's runner: the same capture, limits and timeout as a task run in the
web process.  :meth:`Worker.stop` (SIGTERM, SIGINT) stops claiming; the tasks
already running finish within the grace period.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from .errors import QueueFull, RegistryError
from .model import RequestSnapshot
from .service import NO_THREAD, TaskService

log = logging.getLogger("wsgi_async")

#: How long one claim blocks while the queue is empty: the stop signal's latency.
CLAIM_WAIT = 1.0
#: Backoff bounds, in seconds, while the registry is unavailable.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0


class _Claimed:
    """One claimed task in the pool; gives its thread back to the worker when it ends."""

    __slots__ = ("request", "task_id", "worker")

    def __init__(self, worker: Worker, task_id: str, request: RequestSnapshot) -> None:
        self.worker = worker
        self.task_id = task_id
        self.request = request

    @property
    def size(self) -> int:
        return self.request.size

    def run(self) -> None:
        try:
            self.worker.service.runner.run(self.task_id, self.request, multiprocess=True)
        finally:
            self.worker.done()

    def cancel(self, reason: str) -> None:
        # Left claimed: the claim lapses with this process's lease and another worker
        # takes it over (it never started, so it goes back on the queue).
        self.worker.done()


class Worker:
    """Run the tasks of ``routes`` that web processes put on the registry's queue.

    ``service`` is this process's task service (its pool has ``threads``
    threads); ``routes`` are route patterns as the web processes name them.
    """

    def __init__(
        self, service: TaskService, routes: Sequence[str], *, grace: float = 30.0
    ) -> None:
        if not service.registry.capabilities.queue:
            raise ValueError(
                f"{type(service.registry).__name__} has no queue: workers need "
                "registry='sqlite:///path/tasks.db' or 'redis://host:port/db'"
            )
        if not routes:
            raise ValueError("a worker needs at least one route to claim tasks of")
        self.service = service
        self.routes = tuple(routes)
        self.grace = grace
        self.threads = service.options.max_workers
        self._busy = 0  # claimed tasks not yet ended
        self._idle = threading.Condition()
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Stop claiming (safe from a signal handler); :meth:`run` then drains and returns."""
        self._stopping.set()

    def done(self) -> None:
        """A claimed task ended: its thread may claim another."""
        with self._idle:
            self._busy -= 1
            self._idle.notify()

    def _room(self) -> int:
        """Free threads, waiting up to :data:`CLAIM_WAIT` for one."""
        with self._idle:
            if self._busy >= self.threads:
                self._idle.wait(CLAIM_WAIT)
            return max(0, self.threads - self._busy)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> bool:
        """Claim and run tasks until :meth:`stop`; return whether every task finished.

        Tasks still running after ``grace`` seconds are left to the lease: once
        it lapses, another worker replays them or fails them as ``worker_lost``.
        """
        service = self.service
        service.ensure_started()
        log.info("wsgi_async: worker %s claims routes %s on %d threads",
                 service.worker_id(), ", ".join(self.routes), self.threads)
        delay = BACKOFF_MIN
        while not self._stopping.is_set():
            room = self._room()
            # A stop may have come while waiting for a free thread: claim nothing more.
            if room < 1 or self._stopping.is_set():
                continue
            try:
                claimed = service.registry.claim(
                    service.worker_id(), self.routes, room, CLAIM_WAIT,
                    service.options.lease_time,
                )
            except RegistryError as exc:
                log.warning("wsgi_async: cannot claim tasks, retrying in %.1fs: %s", delay, exc)
                self._stopping.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_MIN
            # A read of several streams may bring a few more than ``room``: they wait
            # in this process's pool for a busy thread.
            with self._idle:
                self._busy += len(claimed)
            for task in claimed:
                try:
                    service.pool.submit(_Claimed(self, task.record.id, task.request))
                except (QueueFull, RuntimeError) as exc:
                    # This live process holds the claim: end the task rather than strand it.
                    self.done()
                    log.error("wsgi_async: cannot run claimed task %s: %s", task.record.id, exc)
                    service.fail_unqueued(task.record.id, NO_THREAD)
        log.info("wsgi_async: worker %s stops claiming; waiting up to %.0fs for running tasks",
                 service.worker_id(), self.grace)
        began = time.monotonic()
        drained = service.pool.shutdown(wait=True, timeout=self.grace)
        service.supervisor.stop(retire=drained)
        if drained:
            log.info("wsgi_async: worker %s finished its tasks in %.1fs",
                     service.worker_id(), time.monotonic() - began)
        else:
            log.warning("wsgi_async: worker %s stopped with tasks still running; they are "
                        "taken over once its lease lapses", service.worker_id())
        return drained


def build_worker(
    app: object,
    *,
    threads: int = 8,
    registry: str | None = None,
    routes: Sequence[str] | None = None,
    grace: float = 30.0,
) -> Worker:
    """The worker for ``app``: an :class:`AsyncMiddleware` (one source of truth) or a plain app.

    From a middleware it takes the application, the registry, the routes whose
    executor is ``"workers"`` and every limit; ``registry`` and ``routes``
    may narrow them.  A plain WSGI application needs both.  Raises
    ``ValueError`` or ``TypeError`` with a message for the user.
    """
    from dataclasses import replace

    from .config import build_options
    from .middleware import AsyncMiddleware
    from .registry import open_registry

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads!r}")
    if not grace >= 0:
        raise ValueError(f"grace must be a number of seconds, at least 0, got {grace!r}")
    if isinstance(app, AsyncMiddleware):
        options = app.options
        queued = [route.pattern.pattern for route in options.routes
                  if options.executor_of(route) == "workers"]
        if routes:
            unknown = [route for route in routes if route not in queued]
            if unknown:
                raise ValueError(f"routes {unknown} are not routes of the application with "
                                 f"executor='workers'; those are {queued}")
            queued = list(routes)
        if not queued:
            raise ValueError("no route of the application has executor='workers': "
                             "nothing would ever reach this worker")
        store = app.registry if registry is None else open_registry(
            registry, max_tasks=options.max_tasks, max_stored_bytes=options.max_stored_bytes,
            tombstone_ttl=options.tombstone_ttl)
        wsgi_app = app.app
    else:
        if not callable(app):
            raise TypeError(f"app must be a WSGI callable, got {app!r}")
        if registry is None or not routes:
            raise ValueError("a plain WSGI application needs --registry and --routes (the "
                             "route patterns as the web processes name them); or point the "
                             "worker at the AsyncMiddleware object the web server serves")
        options = build_options(list(routes), executor="workers")
        store = open_registry(registry, max_tasks=options.max_tasks)
        queued = list(routes)
        wsgi_app = app
    # A middleware's metrics go on here (into PROMETHEUS_MULTIPROC_DIR, beside the web's).
    observer = app.service.observer if isinstance(app, AsyncMiddleware) else None
    service = TaskService(wsgi_app, store, replace(options, max_workers=threads), observer)
    return Worker(service, queued, grace=grace)
