"""The task service: accept, run and settle tasks in one process.

One :class:`TaskService` owns the registry, the executor (the bounded pool of
this process), the runner that drives the application for one task, and the
supervisor that keeps leases, timeouts and expiry.  The WSGI front
(:class:`~wsgi_async.middleware.AsyncMiddleware`) hands it requests; a worker
process (:mod:`wsgi_async.worker`) hands it tasks claimed from the registry's
queue: both share this object.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import Literal

from .config import Options, Route
from .errors import MaybeWritten, QueueFull, RegistryError, RegistryFull
from .executor import WorkerPool
from .idempotency import fingerprint
from .model import RequestSnapshot, TaskRecord, TaskStatus, error_response, new_task_id
from .observer import Observer
from .registry import Registry
from .runner import TaskRunner
from .supervisor import Supervisor
from .types import WSGIApplication

log = logging.getLogger("wsgi_async")

BUSY = "The server is busy: its task queue is full; try again later."
FULL = "The server holds too many tasks; try again later."
UNAVAILABLE = "The task registry is unavailable."
NO_THREAD = "No worker could be started."
# The label of each refusal in the metrics.
REFUSAL_KINDS = {BUSY: "queue_full", FULL: "registry_full", UNAVAILABLE: "registry_unavailable",
                 NO_THREAD: "no_thread"}
# What a submit did: stored a new task, found the one its Idempotency-Key made, or
# found that key used by a different request.
Outcome = Literal["new", "repeated", "conflict"]
PRIVATE_REGISTRY = (
    "the memory:// registry is private to each process, and this server runs several: "
    "polls may reach another process and get 404. "
    "Use registry='sqlite:///path/tasks.db' or 'redis://host:port/db'."
)


class Refused(Exception):
    """A task cannot be accepted now; the client should retry (503)."""

    def __init__(self, detail: str, reason: str, level: int) -> None:
        super().__init__(reason)
        self.detail = detail
        self.reason = reason
        self.level = level

    @property
    def kind(self) -> str:
        """A short label for the metrics: queue_full, registry_full, ..."""
        return REFUSAL_KINDS.get(self.detail, "other")


class _Job:
    """A task queued in this process's pool."""

    __slots__ = ("multiprocess", "replay", "request", "service", "size", "task_id")

    def __init__(
        self, service: TaskService, task_id: str, request: RequestSnapshot, multiprocess: bool,
        replay: bool = False, size: int | None = None,
    ) -> None:
        self.service = service
        self.task_id = task_id
        self.request = request
        self.multiprocess = multiprocess
        self.replay = replay
        # Counted once: the pool reserves and releases the same number.
        self.size = request.size if size is None else size

    def run(self) -> None:
        self.service.observer.queued(-1)
        self.service.runner.run(self.task_id, self.request, multiprocess=self.multiprocess)

    def cancel(self, reason: str) -> None:
        self.service.observer.queued(-1)
        if self.replay:  # stays queued under this process's lease, which lapses: replayed
            self.service.left_for_replay += 1
            log.info("wsgi_async: task %s left queued for another process to replay",
                     self.task_id)
            return
        self.service.observer.cancelled()
        self.service.fail_unqueued(self.task_id, reason)


class TaskService:
    """Everything that makes a task happen in this process, behind one object."""

    def __init__(
        self, app: WSGIApplication, registry: Registry, options: Options,
        observer: Observer | None = None,
    ) -> None:
        self.app = app
        self.registry = registry
        self.options = options
        self.observer = observer or Observer()
        self._worker: tuple[int, str] = (0, "")
        self._worker_lock = threading.Lock()
        self._checked_server = False
        # Replayable tasks that a drain left queued: this process must not retire its lease.
        self.left_for_replay = 0
        self._stopped_in = 0  # the process where shutdown() or drain() ran
        self.pool = WorkerPool(
            options.max_workers, options.max_queued, options.max_pending_bytes
        )
        self.supervisor = Supervisor(
            registry, self.worker_id, options.lease_time, self._requeued,
            free_slots=lambda: self.pool.free_slots,
        )
        self.runner = TaskRunner(
            app, registry, self.supervisor, self.worker_id, options.max_result_size,
            self.observer, self.pool.release_running,
        )

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

    def new_record(self, route: Route, request: RequestSnapshot, owner: str | None) -> TaskRecord:
        """A queued task for ``request`` on ``route``, held by this process."""
        return TaskRecord(
            id=new_task_id(),
            route=route.pattern.pattern,
            worker=self.worker_id(),
            owner=owner,
            fingerprint=fingerprint(request),
            replay=route.replay,
            timeout=self.options.timeout_of(route),
            result_ttl=self.options.result_ttl_of(route),
        )

    def submit(
        self,
        route: Route,
        request: RequestSnapshot,
        *,
        owner: str | None = None,
        key: str | None = None,
        multiprocess: bool = False,
    ) -> tuple[TaskRecord, Outcome]:
        """Store a task for ``request`` and have it run; return it and what happened.

        With ``key`` (already scoped to its caller), a task stored under that
        key is returned instead: ``"repeated"``, or ``"conflict"`` when it was
        made for a different request.  Raises :class:`Refused` when the task
        cannot be accepted now; then nothing is stored and nothing queued.
        """
        record = self.new_record(route, request, owner)
        executor = self.options.executor_of(route)
        if executor == "inline":
            stored = self._run_inline(record, request, key, multiprocess)
        elif executor == "workers":
            stored = self._create(record, request, key, multiprocess, queue=True)
        else:
            stored = self._enqueue(record, request, key, multiprocess)
        if stored.id == record.id:
            self.observer.accepted(record.route)
            return stored, "new"
        return stored, "repeated" if stored.fingerprint == record.fingerprint else "conflict"

    def _enqueue(
        self, record: TaskRecord, request: RequestSnapshot, key: str | None, multiprocess: bool
    ) -> TaskRecord:
        # A place in the pool is reserved first, so that a refusal leaves nothing behind.
        size = request.size
        try:
            self.pool.reserve(size)
        except QueueFull as exc:
            raise Refused(BUSY, str(exc), logging.WARNING) from None
        queued = False
        try:
            stored = self._create(record, request, key, multiprocess)
            if stored.id != record.id:
                return stored
            try:
                self.pool.put(
                    _Job(self, stored.id, request, multiprocess, stored.replay, size))
            except (RuntimeError, QueueFull) as exc:
                self.fail_unqueued(stored.id, NO_THREAD if isinstance(exc, RuntimeError)
                                   else BUSY)
                raise
            queued = True
            self.observer.queued(1)
            return stored
        except QueueFull as exc:  # shut down while the task was being stored
            raise Refused(BUSY, str(exc), logging.WARNING) from None
        except RuntimeError as exc:  # no thread could be started
            raise Refused(NO_THREAD, str(exc), logging.ERROR) from None
        finally:
            if not queued:
                self.pool.release(size)

    def _run_inline(
        self, record: TaskRecord, request: RequestSnapshot, key: str | None, multiprocess: bool
    ) -> TaskRecord:
        """Run the task in the caller's thread before answering (tests and debugging)."""
        stored = self._create(record, request, key, multiprocess)
        if stored.id != record.id:
            return stored
        self.runner.run(stored.id, request, multiprocess=multiprocess)
        try:
            return self.registry.get(stored.id) or stored
        except RegistryError:
            return stored

    def _create(
        self, record: TaskRecord, request: RequestSnapshot, key: str | None, multiprocess: bool,
        queue: bool = False,
    ) -> TaskRecord:
        """Store ``record`` (and its request when it may be replayed), or refuse.

        With ``queue``, the task and its request go on the registry's queue for
        worker processes (bounded by ``max_queued`` across all of them); this
        process never runs it.
        """
        try:
            self.supervisor.ensure_started()
            if queue:
                stored = self.registry.enqueue(record, request, key,
                                               max_queued=self.options.max_queued)
            else:
                stored = self.registry.create(record, request if record.replay else None, key)
        except QueueFull as exc:
            raise Refused(BUSY, str(exc), logging.WARNING) from None
        except RegistryFull as exc:
            raise Refused(FULL, str(exc), logging.WARNING) from None
        except MaybeWritten as exc:
            if not queue:  # (on the queue a worker claims it: it runs, and ends)
                self.supervisor.retry_later(
                    record.id, lambda: self._recover(record, request, key, multiprocess))
            raise Refused(UNAVAILABLE, str(exc), logging.ERROR) from None
        except RegistryError as exc:
            raise Refused(UNAVAILABLE, str(exc), logging.ERROR) from None
        return stored

    def _recover(
        self, record: TaskRecord, request: RequestSnapshot, key: str | None, multiprocess: bool
    ) -> None:
        """Settle a create that failed once sent (its client got a 503): the registry
        may have stored it since, queued under this live process that never queued it.

        Without a key nobody can know its id: it is removed.  With one, a retry may
        already hold its ``Location``: it runs.  Run by the supervisor until it succeeds.
        """
        found = self.registry.recover(record.id)
        if found is None or found.status is not TaskStatus.QUEUED or found.worker != record.worker:
            return
        if key is None:
            self.registry.delete(record.id)
            log.warning("wsgi_async: task %s was stored after its submit failed; removed",
                        record.id)
            return
        log.warning("wsgi_async: task %s was stored after its submit failed; running it",
                    record.id)
        try:
            self.pool.submit(_Job(self, record.id, request, multiprocess, record.replay))
            self.observer.queued(1)
        except (QueueFull, RuntimeError):
            self.registry.fail(record.id, error_response(
                503, "No worker was free to run the task after the registry came back.",
                id=record.id))

    def fail_unqueued(self, task_id: str, detail: str) -> None:
        """A stored task that will not run here must still end: fail it."""
        response = error_response(503, detail, id=task_id)
        try:
            self.registry.fail(task_id, response)
        except RegistryError:
            self.supervisor.retry_later(task_id, lambda: self.registry.fail(task_id, response))

    def check_server(self, multiprocess: bool) -> str | None:
        """Warn once if this server runs several processes on a private registry.

        Returns the warning (for the ``404`` of an unknown task), or ``None``.
        """
        self._checked_server = True
        if not multiprocess or self.registry.capabilities.shared:
            return None
        log.warning("wsgi_async: %s", PRIVATE_REGISTRY)
        return PRIVATE_REGISTRY

    @property
    def server_checked(self) -> bool:
        return self._checked_server

    def _requeued(self, record: TaskRecord) -> None:
        """Run a task that a lost process held, now handed to this one."""
        request = self.registry.request(record.id)
        if request is None:
            self.registry.fail(record.id, error_response(
                500, "The task's request was not stored; it cannot be replayed.", id=record.id))
            return
        try:
            self.pool.submit(_Job(self, record.id, request, True, replay=True))
            self.observer.queued(1)
        except (QueueFull, RuntimeError):
            self.registry.fail(record.id, error_response(
                503, "No worker was free to replay the task after its worker was lost.",
                id=record.id))

    def ensure_started(self) -> None:
        """Start the supervisor: any process that serves polls also settles dead ones' tasks."""
        try:
            self.supervisor.ensure_started()
        except RegistryError as exc:
            log.warning("wsgi_async: registry unavailable, supervisor not started: %s", exc)

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the pool (finishing queued tasks when ``wait``) and the supervisor.

        Tasks still running afterwards (``wait=False``, or past ``timeout``)
        are settled by another process once this one's lease lapses.
        """
        self._stopped_in = os.getpid()
        drained = self.pool.shutdown(wait=wait, timeout=timeout)
        self.supervisor.stop(retire=drained)

    @property
    def drain_timeout(self) -> float:
        return self.options.drain_timeout

    def drain(self, timeout: float | None = None) -> bool:
        """Stop as a server stops a process: let running tasks end, settle the queued ones.

        No new task is accepted; queued tasks are failed with a stored ``503``
        (replayable ones stay queued, and this process's lease is left to lapse
        so that another process replays them); running tasks get up to
        ``timeout`` seconds (default ``drain_timeout``) to finish and be stored,
        while the lease is still renewed.  Returns whether every task ended.
        """
        if self._stopped_in == os.getpid():  # shut down or drained already
            return self.pool.pending == 0
        self._stopped_in = os.getpid()
        began = time.monotonic()
        limit = self.options.drain_timeout if timeout is None else timeout
        pending = self.pool.pending
        if pending:
            log.info("wsgi_async: draining: up to %.1f s for %d pending task(s)", limit, pending)
        drained = self.pool.drain(limit)
        self.supervisor.stop(retire=drained and not self.left_for_replay)
        if not drained:
            log.warning("wsgi_async: drain timed out after %.2f s with %d task(s) still running; "
                        "another process settles them when this one's lease lapses",
                        time.monotonic() - began, self.pool.pending)
        elif pending:
            log.info("wsgi_async: drained in %.2f s", time.monotonic() - began)
        return drained
