"""The bounded worker pool that runs tasks off the server's request threads.

At most ``max_workers`` threads run tasks and at most ``max_queued`` more
wait; :meth:`WorkerPool.submit` refuses anything beyond that at once instead
of blocking the server.  Threads start lazily in the process that submits, so
a pool created before a fork (``gunicorn --preload``) is rebuilt in the child
and never used across the fork.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import weakref
from typing import Protocol

from .errors import QueueFull

log = logging.getLogger("wsgi_async")


class Job(Protocol):
    """A unit of work: ``run`` it, or ``cancel`` it if the pool shuts down first.

    ``size`` is the memory it holds until it ends (its request: body and environ), counted
    against the pool's ``max_pending_bytes``.
    """

    @property
    def size(self) -> int: ...

    def run(self) -> None: ...

    def cancel(self, reason: str) -> None: ...


def check_uwsgi_threads() -> None:
    """Fail loudly under uWSGI without threads: the pool's threads would never run."""
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None:
        return
    opts = getattr(uwsgi, "opt", {})
    if not (getattr(uwsgi, "has_threads", 0) or opts.get("enable-threads") or opts.get("threads")):
        raise RuntimeError(
            "wsgi_async needs threads, and uWSGI runs without them: "
            "start uWSGI with --enable-threads (or --threads N)"
        )


def uwsgi_processes() -> int:
    """How many worker processes uWSGI runs (1 outside uWSGI)."""
    uwsgi = sys.modules.get("uwsgi")
    return int(getattr(uwsgi, "numproc", 1) or 1) if uwsgi is not None else 1


class WorkerPool:
    """A fixed number of daemon threads fed by a bounded queue.

    Two bounds hold at once: at most ``max_workers + max_queued`` jobs, and at
    most ``max_pending_bytes`` of requests held by them (a job alone always fits).
    """

    def __init__(
        self,
        max_workers: int,
        max_queued: int,
        max_pending_bytes: int | None = None,
        name: str = "wsgi-async",
    ) -> None:
        self.max_workers = max_workers
        self.max_queued = max_queued
        self.max_pending_bytes = max_pending_bytes
        self.name = name
        self._lock = threading.Lock()
        self._reset()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_ref(ref))

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._reserved = 0
        self._bytes = 0
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False
        self._running = threading.local()  # the job each worker thread runs, until released

    @property
    def capacity(self) -> int:
        return self.max_workers + self.max_queued

    @property
    def free_slots(self) -> int:
        """How many more jobs :meth:`reserve` would accept now."""
        with self._lock:
            return 0 if self._closed else self.capacity - self._reserved

    def reserve(self, size: int = 0) -> None:
        """Hold a place for one job of ``size`` bytes, or raise :class:`QueueFull`.

        Callers reserve before they write anything elsewhere, so that a full
        pool leaves nothing behind; they then :meth:`put` or :meth:`release`.
        """
        with self._lock:
            if self._pid != os.getpid():
                self._reset()
            if self._closed:
                raise QueueFull("the worker pool is shut down")
            if self._reserved >= self.capacity:
                raise QueueFull(
                    f"all {self.max_workers} workers are busy and {self.max_queued} tasks wait"
                )
            limit = self.max_pending_bytes
            # A job alone is always admitted: a request within max_body_size whose
            # headers tip it over the bound must not be refused for ever.
            if limit is not None and self._bytes and self._bytes + size > limit:
                raise QueueFull(
                    f"queued and running tasks hold {self._bytes} bytes of request bodies, "
                    f"and max_pending_bytes is {limit}"
                )
            self._reserved += 1
            self._bytes += size

    def release(self, size: int = 0) -> None:
        """Give back a place taken by :meth:`reserve` that will not be used."""
        with self._lock:
            self._reserved -= 1
            self._bytes -= size

    def release_running(self) -> None:
        """Give back the place and bytes of the job this worker thread runs, now.

        A task calls it just before its result is stored: a client that sees the
        result and submits again at once must find the place free.  Outside a
        worker thread, or a second time, it does nothing.
        """
        job: Job | None = getattr(self._running, "job", None)
        if job is None:
            return
        self._running.job = None
        with self._lock:
            self._reserved -= 1
            self._bytes -= job.size

    def submit(self, job: Job) -> None:
        """Reserve a place and queue ``job``; raise :class:`QueueFull` at the bound."""
        self.reserve(job.size)
        self.put(job)

    def put(self, job: Job) -> None:
        """Queue ``job`` into a place already reserved.

        Raises :class:`QueueFull` if the pool was shut down since the place was
        reserved, and ``RuntimeError`` if no thread at all could be started.
        """
        with self._lock:
            if self._closed:
                raise QueueFull("the worker pool is shut down")
            if self._idle > 0:
                self._idle -= 1
            elif len(self._threads) < self.max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:
                    if not self._threads:
                        raise
                    log.warning("wsgi_async: could not start another worker thread; "
                                "the job waits for a busy one")
                else:
                    self._threads.append(thread)
            self._queue.put(job)

    def _work(self) -> None:
        jobs = self._queue
        while True:
            job = jobs.get()
            if job is None:
                return
            self._running.job = job
            try:
                job.run()
            except BaseException:  # nothing may end a worker thread but the stop signal
                log.exception("wsgi_async: a task job raised")
            finally:
                unreleased = self._running.job is not None
                self._running.job = None
                with self._lock:
                    if unreleased:
                        self._reserved -= 1
                        self._bytes -= job.size
                    self._idle += 1

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting work; with ``wait``, finish queued jobs, else cancel them.

        Returns whether every job has ended (none is still running).
        """
        with self._lock:
            if self._pid != os.getpid():
                self._reset()
            self._closed = True
            threads = list(self._threads)
            if not wait:
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        job.cancel("the server shut down before the task started")
                        self._reserved -= 1
                        self._bytes -= job.size
            for _ in threads:
                self._queue.put(None)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for thread in threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            return self._reserved == 0


    def drain(self, timeout: float) -> bool:
        """Stop accepting work, cancel the queued jobs, wait up to ``timeout`` s for the rest.

        What a process does when its server stops it: the jobs already running
        may finish, the ones that have not started are cancelled at once.
        Returns whether every job has ended.
        """
        deadline = time.monotonic() + timeout
        self.shutdown(wait=False)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return self._reserved == 0

    @property
    def pending(self) -> int:
        """Jobs queued or running (or reserved) in this process."""
        with self._lock:
            return self._reserved if self._pid == os.getpid() else 0


def _reset_ref(ref: weakref.ref[WorkerPool]) -> None:
    pool = ref()
    if pool is not None:
        pool._lock = threading.Lock()
        pool._reset()
