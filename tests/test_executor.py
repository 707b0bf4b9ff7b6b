"""The bounded worker pool."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest

from wsgi_async.errors import QueueFull
from wsgi_async.executor import WorkerPool


class Job:
    def __init__(self, gate: threading.Event | None = None, size: int = 0) -> None:
        self.gate = gate
        self.size = size
        self.ran = threading.Event()
        self.cancelled: str | None = None
        self.thread: str | None = None

    def run(self) -> None:
        self.thread = threading.current_thread().name
        if self.gate is not None:
            self.gate.wait(10)
        self.ran.set()

    def cancel(self, reason: str) -> None:
        self.cancelled = reason


def test_bound_is_workers_plus_queue() -> None:
    pool = WorkerPool(max_workers=2, max_queued=3)
    gate = threading.Event()
    jobs = [Job(gate) for _ in range(5)]
    for job in jobs:
        pool.submit(job)
    with pytest.raises(QueueFull, match="all 2 workers are busy and 3 tasks wait"):
        pool.submit(Job())
    assert pool.free_slots == 0
    gate.set()
    for job in jobs:
        assert job.ran.wait(5)
    deadline = time.monotonic() + 5
    while pool.free_slots != 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.free_slots == 5
    names = {job.thread for job in jobs}
    assert len(names) <= 2
    pool.shutdown()


def test_threads_start_lazily_and_never_exceed_max_workers() -> None:
    before = threading.active_count()
    pool = WorkerPool(max_workers=3, max_queued=100)
    assert threading.active_count() == before
    jobs = [Job() for _ in range(50)]
    for job in jobs:
        pool.submit(job)
    assert threading.active_count() <= before + 3
    for job in jobs:
        assert job.ran.wait(5)
    pool.shutdown()
    assert threading.active_count() == before


def test_reserve_and_release() -> None:
    pool = WorkerPool(max_workers=1, max_queued=0 + 1)
    pool.reserve()
    pool.reserve()
    with pytest.raises(QueueFull):
        pool.reserve()
    pool.release()
    pool.reserve()
    pool.release()
    pool.release()
    assert pool.free_slots == 2
    pool.shutdown()


def test_shutdown_without_wait_cancels_queued_jobs() -> None:
    pool = WorkerPool(max_workers=1, max_queued=5)
    gate = threading.Event()
    running = Job(gate)
    pool.submit(running)
    time.sleep(0.05)
    queued = [Job() for _ in range(3)]
    for job in queued:
        pool.submit(job)
    pool.shutdown(wait=False)
    assert all(job.cancelled for job in queued)
    with pytest.raises(QueueFull, match="shut down"):
        pool.submit(Job())
    gate.set()
    assert running.ran.wait(5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def true_in_a_forked_child(check: Callable[[], bool]) -> bool:
    """Fork, run ``check`` in the child, and say whether it returned true there."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if check() else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    try:
        os.close(write)
        return os.read(read, 1) == b"\x00"
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def test_a_pool_inherited_over_fork_is_rebuilt_in_the_child() -> None:
    pool = WorkerPool(max_workers=1, max_queued=1)
    gate = threading.Event()
    pool.submit(Job(gate))  # the parent's only worker is busy and its queue slot free
    pool.submit(Job(gate))

    def runs_a_job() -> bool:  # in the child: the parent's threads do not exist here
        job = Job()
        pool.submit(job)
        return job.ran.wait(5)

    try:
        assert true_in_a_forked_child(runs_a_job)
    finally:
        gate.set()
        pool.shutdown()


def test_bytes_held_by_pending_jobs_are_bounded() -> None:
    pool = WorkerPool(max_workers=1, max_queued=10, max_pending_bytes=100)
    gate = threading.Event()
    first, second = Job(gate, size=60), Job(gate, size=40)
    pool.submit(first)
    pool.submit(second)
    with pytest.raises(QueueFull, match="hold 100 bytes of request bodies"):
        pool.submit(Job(size=1))
    gate.set()
    assert first.ran.wait(5) and second.ran.wait(5)
    deadline = time.monotonic() + 5
    while pool.free_slots != 11 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.submit(Job(size=100))  # the budget is back
    pool.shutdown()


def test_put_after_shutdown_is_refused() -> None:
    pool = WorkerPool(max_workers=1, max_queued=1)
    pool.reserve()  # a submit is storing its task...
    pool.shutdown()  # ...when the server shuts down
    with pytest.raises(QueueFull, match="shut down"):
        pool.put(Job())
    pool.release()


def test_a_job_raising_system_exit_does_not_kill_the_worker() -> None:
    class Exiting(Job):
        def run(self) -> None:
            super().run()
            raise SystemExit(1)

    pool = WorkerPool(max_workers=1, max_queued=5)
    first, second = Exiting(), Job()
    pool.submit(first)
    pool.submit(second)
    assert first.ran.wait(5) and second.ran.wait(5)
    pool.shutdown()


def test_check_uwsgi_threads_refuses_a_uwsgi_without_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys
    import types

    from wsgi_async import AsyncMiddleware
    from wsgi_async.executor import check_uwsgi_threads

    check_uwsgi_threads()  # not under uWSGI: nothing to check
    stand_in = types.ModuleType("uwsgi")
    stand_in.opt = {}  # type: ignore[attr-defined]
    stand_in.has_threads = 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uwsgi", stand_in)
    with pytest.raises(RuntimeError, match="--enable-threads"):
        check_uwsgi_threads()
    with pytest.raises(RuntimeError, match="--enable-threads"):
        AsyncMiddleware(lambda environ, start_response: [], routes=["^/"])
    for name, value in [("has_threads", 1), ("opt", {"enable-threads": True}),
                        ("opt", {"threads": b"4"})]:
        with monkeypatch.context() as patch:
            patch.setattr(stand_in, name, value)
            check_uwsgi_threads()  # threads on: accepted


def test_a_running_job_can_give_back_its_place_before_it_ends() -> None:
    pool = WorkerPool(max_workers=1, max_queued=1, max_pending_bytes=100)
    gate = threading.Event()
    released = threading.Event()

    class Releasing(Job):
        def run(self) -> None:
            pool.release_running()
            pool.release_running()  # a second call gives back nothing more
            released.set()
            super().run()

    job = Releasing(gate, size=100)
    pool.submit(job)
    assert released.wait(5)
    assert pool.free_slots == 2  # its place is free while it still runs...
    pool.reserve(100)  # ...and so are its bytes
    pool.release(100)
    pool.release_running()  # outside a worker thread: nothing to give back
    assert pool.free_slots == 2
    gate.set()
    assert job.ran.wait(5)
    assert pool.shutdown(wait=True, timeout=5)  # every place back, none given back twice


def test_release_gives_back_the_place_and_the_bytes() -> None:
    pool = WorkerPool(max_workers=1, max_queued=1, max_pending_bytes=100)
    pool.reserve(60)
    pool.reserve(40)
    with pytest.raises(QueueFull):
        pool.reserve(1)
    pool.release(60)
    pool.release(40)
    assert pool.free_slots == 2
    pool.reserve(70)  # the bytes are back too: 70 fits beside 30 only if 100 were freed
    pool.reserve(30)
    pool.release(70)
    pool.release(30)
    pool.shutdown()


def test_release_without_a_size_gives_back_no_bytes() -> None:
    pool = WorkerPool(max_workers=1, max_queued=1, max_pending_bytes=100)
    pool.reserve()
    pool.release()
    pool.reserve(60)
    with pytest.raises(QueueFull, match="hold 60 bytes of request bodies"):
        pool.reserve(41)
    pool.release(60)
    pool.shutdown()


def test_a_drain_waits_for_all_running_jobs_within_one_bound() -> None:
    pool = WorkerPool(max_workers=2, max_queued=1)
    gate = threading.Event()
    running = [Job(gate), Job(gate)]
    for job in running:
        pool.submit(job)
    deadline = time.monotonic() + 5
    while any(job.thread is None for job in running):  # both have started
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        began = time.monotonic()
        assert pool.drain(0.1) is False  # both still run
        assert time.monotonic() - began < 0.9  # the bound is shared, not one per thread
    finally:
        gate.set()
    assert all(job.ran.wait(5) for job in running)
    assert pool.shutdown(wait=True, timeout=5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_starts_with_an_empty_pool() -> None:
    pool = WorkerPool(max_workers=1, max_queued=1)
    gate = threading.Event()
    pool.submit(Job(gate))  # the parent's places are all taken
    pool.submit(Job(gate))
    assert pool.free_slots == 0
    try:  # in the child, none of the parent's jobs is here
        assert true_in_a_forked_child(lambda: (pool.free_slots, pool.pending) == (2, 0))
    finally:
        gate.set()
        pool.shutdown()


def test_the_pool_starts_one_named_daemon_thread_per_busy_job_up_to_its_bound() -> None:
    pool = WorkerPool(max_workers=2, max_queued=2, name="reports")
    gate = threading.Event()
    jobs = [Job(gate) for _ in range(3)]
    try:
        for job in jobs:
            pool.submit(job)
        threads = {t.name: t for t in threading.enumerate() if t.name.startswith("reports-")}
        # Two busy jobs, two threads; the third job waits for one of them.
        assert sorted(threads) == ["reports-0", "reports-1"]
        assert all(thread.daemon for thread in threads.values())  # never holds up an exit
    finally:
        gate.set()
    assert all(job.ran.wait(5) for job in jobs)
    # A job submitted to an idle thread reuses it instead of starting another.
    idle = Job()
    pool.submit(idle)
    assert idle.ran.wait(5)
    assert sorted(t.name for t in threading.enumerate() if t.name.startswith("reports-")) == [
        "reports-0", "reports-1"]
    pool.shutdown()
