"""What only the memory registry does: its long-polls wait on one condition per task.

The contract every backend keeps is in ``test_registry_contract.py``; here,
the bookkeeping behind the memory registry's waits: several waiters on one
task, waiters that leave early, and nothing left behind once they are gone.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path

from conftest import new_task
from wsgi_async.registry import MemoryRegistry, StoredResponse, TaskRecord, TaskStatus
from wsgi_async.registry import memory as memory_module

OK = StoredResponse("200 OK", (("Content-Type", "text/plain"),), b"ok")


class Waiter(threading.Thread):
    """``registry.wait(task_id, timeout)`` in a thread; ``got`` and ``elapsed`` after."""

    def __init__(self, registry: MemoryRegistry, task_id: str, timeout: float) -> None:
        super().__init__(daemon=True)
        self.registry, self.task_id, self.timeout = registry, task_id, timeout
        self.got: TaskRecord | None = None
        self.elapsed = -1.0

    def run(self) -> None:
        began = time.monotonic()
        self.got = self.registry.wait(self.task_id, self.timeout)
        self.elapsed = time.monotonic() - began


def started(waiter: Waiter) -> Waiter:
    waiter.start()
    time.sleep(0.1)  # the memory registry's wait blocks at once, without a read
    return waiter


def test_every_waiter_on_a_task_is_woken_by_its_completion() -> None:
    registry = MemoryRegistry()
    record = registry.create(new_task())
    waiters = [started(Waiter(registry, record.id, 10)) for _ in range(3)]
    registry.start(record.id, "w1")
    registry.finish(record.id, "w1", TaskStatus.DONE, OK)
    for waiter in waiters:
        waiter.join(5)
        assert waiter.got is not None and waiter.got.status is TaskStatus.DONE
        assert waiter.elapsed < 2, f"woken after {waiter.elapsed:.2f}s"


def test_a_waiter_that_times_out_leaves_the_others_waiting_and_woken() -> None:
    registry = MemoryRegistry()
    record = registry.create(new_task())
    short = started(Waiter(registry, record.id, 0.2))
    long = started(Waiter(registry, record.id, 10))
    short.join(5)
    assert short.got is not None and short.got.status is TaskStatus.QUEUED
    registry.fail(record.id, OK)
    long.join(5)
    assert long.got is not None and long.got.status is TaskStatus.FAILED
    assert long.elapsed < 2, f"woken after {long.elapsed:.2f}s"


def test_a_short_wait_ends_at_its_own_timeout() -> None:
    registry = MemoryRegistry()
    record = registry.create(new_task())
    began = time.monotonic()
    got = registry.wait(record.id, 0.05)
    assert got is not None and got.status is TaskStatus.QUEUED
    assert time.monotonic() - began < 0.5


def test_a_wait_on_a_task_deleted_meanwhile_answers_none() -> None:
    registry = MemoryRegistry()
    record = registry.create(new_task())
    waiter = started(Waiter(registry, record.id, 0.4))
    assert registry.delete(record.id) is True
    waiter.join(5)
    assert waiter.got is None and waiter.elapsed >= 0.3


def test_waiting_on_many_tasks_leaves_nothing_behind() -> None:
    """Each long-poll's bookkeeping goes with its last waiter: nothing grows per wait.

    Measured against a control: the same tasks created and deleted without a
    wait (their tombstones and the dicts' growth are the same on both sides).
    """
    source = str(Path(memory_module.__file__))

    def growth(wait: bool) -> int:
        registry = MemoryRegistry()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            ids = [registry.create(new_task()).id for _ in range(2000)]
            if wait:
                for task_id in ids:  # each waits, times out, and leaves
                    registry.wait(task_id, 0.0001)
            for task_id in ids:
                registry.delete(task_id)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        only = [tracemalloc.Filter(True, source)]
        return sum(stat.size_diff for stat in after.filter_traces(only).compare_to(
            before.filter_traces(only), "filename"))

    control, waited = growth(wait=False), growth(wait=True)
    # A leaked condition and its lock per wait would be several hundred kB here.
    assert waited - control < 20_000, f"{waited - control} bytes more after 2000 waits"
