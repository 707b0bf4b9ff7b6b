"""One background thread per process that keeps the registry honest.

It renews this process's lease (so other processes know it is alive),
settles the tasks of processes whose lease lapsed, stores a 504 for tasks
that run past their timeout, drops expired results, and retries the writes
that failed while the registry was unavailable, so that every task this
process holds reaches a final state.  Each duty is
bounded per tick, so a tick's cost does not grow with the registry.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

from .errors import RegistryError
from .logfields import task_fields
from .model import TaskRecord, error_response
from .registry.base import Registry

log = logging.getLogger("wsgi_async")

REAP_BATCH = 100
EXPIRE_BATCH = 1000


class Supervisor:
    """Lease heartbeat, reaper, expiry and task timeouts for one process."""

    def __init__(
        self,
        registry: Registry,
        worker_id: Callable[[], str],
        lease_time: float,
        on_requeued: Callable[[TaskRecord], None],
        free_slots: Callable[[], int] = lambda: REAP_BATCH,
    ) -> None:
        self.registry = registry
        self.worker_id = worker_id
        self.lease_time = lease_time
        self.interval = lease_time / 3
        self.on_requeued = on_requeued
        self.free_slots = free_slots
        self._cond = threading.Condition()
        self._deadlines: dict[str, float] = {}
        self._unsettled: dict[str, Callable[[], object]] = {}
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._stopped = False
        self._renewed = 0.0  # when this process last renewed its lease (time.monotonic)
        self._reap_from = 0.0  # no reaping before this, after an outage we suffered
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_ref(ref))

    def ensure_started(self) -> None:
        """Start the thread in this process (once), after a first heartbeat."""
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._cond:
            if self._thread is not None or self._stopped:
                return
            self.registry.heartbeat(self.worker_id(), self.lease_time)
            self._renewed = time.monotonic()
            thread = threading.Thread(
                target=self._loop, name="wsgi-async-supervisor", daemon=True
            )
            thread.start()
            self._thread = thread

    def watch(self, task_id: str, deadline: float) -> None:
        """Fail ``task_id`` with a 504 at ``deadline`` (``time.monotonic``) unless it ended."""
        with self._cond:
            self._deadlines[task_id] = deadline
            self._cond.notify()

    def unwatch(self, task_id: str) -> None:
        with self._cond:
            self._deadlines.pop(task_id, None)

    def retry_later(self, task_id: str, write: Callable[[], object]) -> None:
        """Run ``write`` at each tick until the registry takes it.

        At most one write per task this process holds, so the list is bounded
        by the pool's capacity.
        """
        with self._cond:
            self._unsettled[task_id] = write

    def stop(self, retire: bool = True) -> None:
        """Stop the thread; ``retire`` the lease only if this process holds no task.

        A process that stops with tasks still running, or with outcomes the
        registry has not taken yet, keeps its lease, which then lapses, so that
        another process settles (or replays) those tasks.
        """
        with self._cond:
            self._stopped = True
            self._cond.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        with self._cond:
            unsettled = bool(self._unsettled)
        if not retire or unsettled:  # keep the lease: let it lapse and others settle
            return
        try:
            self.registry.retire(self.worker_id())
        except RegistryError:
            log.warning("wsgi_async: could not retire this worker's lease", exc_info=True)

    def _loop(self) -> None:
        next_beat = 0.0
        while True:
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                due = [t for t, at in self._deadlines.items() if at <= now]
                for task_id in due:
                    del self._deadlines[task_id]
                wake = min([next_beat, *self._deadlines.values()])
                if not due and wake > now:
                    self._cond.wait(wake - now)
                    continue
            for task_id in due:
                self._time_out(task_id)
            if time.monotonic() >= next_beat:
                self._tick()
                next_beat = time.monotonic() + self.interval

    def _time_out(self, task_id: str) -> None:
        response = error_response(504, "The task ran past its timeout.", id=task_id,
                                  reason="timeout")
        try:
            if self.registry.fail(task_id, response):
                log.warning("wsgi_async: task %s timed out; its late result will be discarded",
                            task_id, extra=task_fields(task_id, outcome="timeout", status=504))
        except RegistryError:
            log.exception("wsgi_async: could not store the timeout of task %s", task_id)
            with self._cond:
                self._deadlines[task_id] = time.monotonic() + self.interval

    def _tick(self) -> None:
        worker = self.worker_id()
        try:
            self.registry.heartbeat(worker, self.lease_time)
            self._note_renewal()
            self._settle_unsettled()
            limit = min(REAP_BATCH, self.free_slots())  # a replay needs a place in the pool
            if time.monotonic() < self._reap_from:
                limit = 0
            for record in self.registry.reap(worker, limit) if limit > 0 else ():
                log.warning("wsgi_async: replaying task %s, whose worker was lost", record.id,
                            extra=task_fields(record.id, record.route, outcome="replayed"))
                self._requeue(record)
            self.registry.expire(EXPIRE_BATCH)
        except RegistryError as exc:
            log.warning("wsgi_async: registry unavailable in the supervisor: %s", exc)
        except Exception:
            log.exception("wsgi_async: supervisor tick failed")

    def _note_renewal(self) -> None:
        """After a lease renewal that came late (the registry was out, for us too),
        wait a whole lease before reaping: the others were as unable to renew theirs,
        and each must have the time to do so before it is judged dead."""
        now = time.monotonic()
        if now - self._renewed > self.lease_time / 2:
            self._reap_from = now + self.lease_time
            log.info("wsgi_async: lease renewed after %.1f s; reaping resumes in %.1f s",
                     now - self._renewed, self.lease_time)
        self._renewed = now

    def _requeue(self, record: TaskRecord) -> None:
        try:
            self.on_requeued(record)
        except Exception as exc:  # the task is ours now: it must not be dropped
            log.warning("wsgi_async: could not replay task %s yet: %s", record.id, exc)
            self.retry_later(record.id, lambda: self.on_requeued(record))

    def _settle_unsettled(self) -> None:
        with self._cond:
            pending = list(self._unsettled.items())
        for task_id, write in pending:
            write()  # a RegistryError ends the tick; the rest wait for the next
            with self._cond:
                if self._unsettled.get(task_id) is write:
                    del self._unsettled[task_id]
            log.info("wsgi_async: task %s settled after the registry came back", task_id)


def _reset_ref(ref: weakref.ref[Supervisor]) -> None:
    sup = ref()
    if sup is not None:
        sup._cond = threading.Condition()
        sup._thread = None
        sup._deadlines = {}
        sup._unsettled = {}
        sup._pid = os.getpid()
        sup._renewed = sup._reap_from = 0.0
