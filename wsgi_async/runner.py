"""Run one task: claim it, drive the application, store the outcome.

Whatever the application does, the task ends in a final state: its own
response (``done``), or a stored JSON 500/504 (``failed``) with the
traceback in the log and never in the response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .capture import capture
from .errors import RegistryError, ResponseError, ResultTooLarge, TaskCancelled, TaskTimeout
from .logfields import task_fields
from .model import (
    RequestSnapshot,
    StoredResponse,
    TaskRecord,
    TaskStatus,
    cancelled_response,
    error_response,
)
from .observer import Observer
from .registry.base import Registry
from .request import TaskHandle, task_environ
from .supervisor import Supervisor
from .types import WSGIApplication

log = logging.getLogger("wsgi_async")

# Backoff, in seconds, while the registry is unavailable (about 16 s in all).
STORE_RETRIES = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
T = TypeVar("T")
U = TypeVar("U")
# What ``_start`` returns when the registry did not answer (distinct from None).
_UNAVAILABLE = TaskRecord(id="", route="")
_STORED_NOTE = {True: "", False: " (discarded: the task had already ended)",
                None: " (kept for retry: the registry is unavailable)"}


@dataclass(slots=True)
class TaskRunner:
    """Everything needed to run tasks in this process."""

    app: WSGIApplication
    registry: Registry
    supervisor: Supervisor
    worker_id: Callable[[], str]
    max_result_size: int
    observer: Observer = field(default_factory=Observer)
    # Called once the application is done with the request, before the result is
    # stored: the pool gives back the task's place and bytes (WorkerPool.release_running).
    release: Callable[[], None] = lambda: None

    def run(self, task_id: str, request: RequestSnapshot, *, multiprocess: bool) -> None:
        worker = self.worker_id()
        record = self._start(task_id, worker)
        if record is _UNAVAILABLE:
            # Never started: fail it once the registry is back, whoever then holds it.
            response = error_response(503, "The task registry was unavailable when the task "
                                      "was due to start.", id=task_id)
            self.supervisor.retry_later(task_id, lambda: self.registry.fail(task_id, response))
            return
        if record is None:
            log.info("wsgi_async: task %s is no longer queued here; skipped", task_id,
                     extra=task_fields(task_id, outcome="skipped"))
            return
        began = time.monotonic()
        if record.started_at is not None:
            self.observer.started(record.route, record.started_at - record.created_at)
        else:
            self.observer.started(record.route, 0.0)
        deadline = None if record.timeout is None else began + record.timeout
        if deadline is not None:
            self.supervisor.watch(task_id, deadline)
        handle = TaskHandle(task_id, record.attempts, registry=self.registry, worker=worker)
        environ = task_environ(request, handle, multiprocess=multiprocess)
        status, response = self._drive(task_id, record.route, environ, deadline)
        handle.flush()  # the latest progress lands before the result
        self.release()
        stored = self._store(task_id, worker, status, response)
        if isinstance(stored, StoredResponse):  # the registry stored this failure instead
            status, response, stored = TaskStatus.FAILED, stored, True
        if stored is None:
            self.supervisor.retry_later(
                task_id, lambda: self.registry.finish(task_id, worker, status, response)
            )
        if deadline is not None:
            self.supervisor.unwatch(task_id)
        outcome, code = (status.value, response.status_code)
        if stored is False:  # what ended the task first (timeout, cancel, reap) is its outcome
            outcome, code = self._settled(task_id)
        duration = time.monotonic() - began
        self.observer.finished(record.route, outcome, code, duration)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "wsgi_async: task %s route=%s outcome=%s status=%s duration=%.3fs%s",
                task_id,
                record.route,
                status.value,
                response.status_code,
                duration,
                _STORED_NOTE[stored],
                extra=task_fields(task_id, record.route, outcome=outcome, status=code,
                                  duration=duration),
            )

    def _settled(self, task_id: str) -> tuple[str, int]:
        """The outcome and status stored for a task that ended before its result came."""
        try:
            current = self.registry.get(task_id)
        except RegistryError:
            current = None
        if current is None or current.response is None:
            return TaskStatus.FAILED.value, 500
        return current.status.value, current.response.status_code

    def _drive(
        self, task_id: str, route: str, environ: dict[str, object], deadline: float | None
    ) -> tuple[TaskStatus, StoredResponse]:
        try:
            response = capture(
                self.app, environ, max_result_size=self.max_result_size, deadline=deadline
            )
        except TaskTimeout:
            return TaskStatus.FAILED, error_response(
                504, "The task ran past its timeout.", id=task_id, reason="timeout"
            )
        except TaskCancelled:
            # The application stopped because its handle said so: nothing to log as an error.
            return TaskStatus.CANCELLED, cancelled_response(task_id)
        except ResultTooLarge as exc:
            log.error("wsgi_async: task %s route=%s: %s", task_id, route, exc,
                      extra=task_fields(task_id, route, outcome="failed", status=500))
            return TaskStatus.FAILED, error_response(
                500, str(exc), id=task_id, reason="result_too_large"
            )
        except ResponseError as exc:
            log.error("wsgi_async: task %s route=%s produced an invalid response: %s",
                      task_id, route, exc, exc_info=True,
                      extra=task_fields(task_id, route, outcome="failed", status=500))
            return TaskStatus.FAILED, error_response(
                500, "The application produced an invalid response.", id=task_id,
                reason="invalid_response",
            )
        except (Exception, SystemExit, KeyboardInterrupt):
            log.exception("wsgi_async: task %s route=%s raised", task_id, route,
                          extra=task_fields(task_id, route, outcome="failed", status=500))
            return TaskStatus.FAILED, error_response(
                500, "The application raised an error while running this task.", id=task_id,
                reason="application_error",
            )
        return TaskStatus.DONE, response

    def _start(self, task_id: str, worker: str) -> TaskRecord | None:
        """Claim the task, retrying while the registry is unavailable.

        ``None`` means the task is not queued here; :data:`_UNAVAILABLE`, that
        the registry did not answer.
        """

        def start(retried: bool) -> TaskRecord | None:
            record = self.registry.start(task_id, worker)
            if record is None and retried:
                # The previous try may have started it before its reply was lost.
                current = self.registry.get(task_id)
                if current and current.status is TaskStatus.RUNNING and current.worker == worker:
                    return current
            return record

        return _retrying(start, f"starting task {task_id}", _UNAVAILABLE)

    def _store(
        self, task_id: str, worker: str, status: TaskStatus, response: StoredResponse
    ) -> bool | StoredResponse | None:
        """Store the outcome, retrying while the registry is unavailable.

        ``False`` means a late result (the task had ended); ``None``, that the
        registry did not answer; a response, what the registry stored instead.
        """

        def finish(retried: bool) -> bool | StoredResponse:
            stored = self.registry.finish(task_id, worker, status, response)
            if not stored and retried:
                # The previous try may have stored it before its reply was lost.
                current = self.registry.get(task_id)
                return current is not None and current.response == response
            return stored

        return _retrying(finish, f"storing the outcome of task {task_id}", None)


def _retrying(call: Callable[[bool], T], what: str, gave_up: U) -> T | U:
    """``call(retried)`` until the registry answers; ``gave_up`` after the last retry."""
    for attempt, delay in enumerate((*STORE_RETRIES, None)):
        try:
            return call(attempt > 0)
        except RegistryError as exc:
            if delay is None:
                log.error("wsgi_async: %s failed; the supervisor will retry: %s", what, exc)
                return gave_up
            log.warning("wsgi_async: %s failed (%s); retrying", what, exc)
            time.sleep(delay)
    return gave_up
