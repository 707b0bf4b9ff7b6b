"""The in-process registry: the embedded default for a single process.

Everything lives in dicts guarded by one lock; every operation is O(1) and
expiry costs O(expired) through a heap ordered by expiry time.  Tasks held by
a process die with it, so this registry suits one-process servers only.
Stored result bodies are bounded by ``max_bytes``: a result that does not fit,
even after expiry, is replaced by a stored 507.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import ClassVar

from .base import (
    TOMBSTONE_TTL,
    Capabilities,
    Claimed,
    RegistryError,
    RegistryFull,
    RequestSnapshot,
    StoredResponse,
    TaskRecord,
    TaskStatus,
    Tombstone,
    buried_as,
    check_tombstone_ttl,
    error_response,
    lost_worker_response,
    require_final,
)

NO_QUEUE = "the memory:// registry has no queue: worker processes cannot see its tasks"


class MemoryRegistry:
    """Thread-safe, bounded in-memory registry (``memory://``)."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        shared=False, queue=False, blocking_wait=True
    )

    def __init__(
        self,
        max_tasks: int = 10_000,
        max_bytes: int = 1024 * 1024 * 1024,
        *,
        tombstone_ttl: float = TOMBSTONE_TTL,
    ) -> None:
        if max_tasks < 1:
            raise ValueError(f"max_tasks must be at least 1, got {max_tasks!r}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes!r}")
        check_tombstone_ttl(tombstone_ttl)
        self.max_tasks = max_tasks
        self.max_bytes = max_bytes
        self.tombstone_ttl = float(tombstone_ttl)
        # id -> (expires at, status, owner), oldest first: one TTL for all, so
        # insertion order is expiry order and both bounds drop from the front.
        self._tombstones: OrderedDict[str, tuple[float, str, str | None]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # One condition per task being waited for: a settle wakes only its own waiters.
        self._waiting: dict[str, _Waiting] = {}
        self._closed = False
        self._tasks: dict[str, TaskRecord] = {}
        self._requests: dict[str, RequestSnapshot] = {}
        self._keys: dict[str, str] = {}
        self._key_of: dict[str, str] = {}
        self._expiry: list[tuple[float, str]] = []
        self._finished = 0  # finished tasks held: the heap's live entries
        self._leases: dict[str, float] = {}
        self._beat: float | None = None  # when a lease was last renewed (by anyone)
        self._grace = 0.0  # no reaping before this time (after an outage)
        self._held: dict[str, set[str]] = {}

    # -- the queue: none, since no other process sees this registry -------------

    def enqueue(
        self,
        record: TaskRecord,
        request: RequestSnapshot,
        idempotency_key: str | None = None,
        *,
        max_queued: int,
    ) -> TaskRecord:
        raise RegistryError(NO_QUEUE)

    def claim(
        self, worker: str, routes: Sequence[str], limit: int, wait: float, lease: float
    ) -> list[Claimed]:
        raise RegistryError(NO_QUEUE)

    def queued(self) -> int:
        return 0

    # -- creation and lookup -------------------------------------------------

    def create(
        self,
        record: TaskRecord,
        request: RequestSnapshot | None = None,
        idempotency_key: str | None = None,
    ) -> TaskRecord:
        with self._lock:
            self._expire_locked(time.time(), 100)
            if idempotency_key is not None:
                existing = self._keys.get(idempotency_key)
                # The sweep above is bounded: the key's task may have expired unswept.
                found = None if existing is None else self._live_locked(existing)
                if found is not None:
                    return found.copy()
            if len(self._tasks) >= self.max_tasks:
                raise RegistryFull(f"the registry holds its maximum of {self.max_tasks} tasks")
            stored = record.copy()
            self._tasks[stored.id] = stored
            if request is not None:
                self._requests[stored.id] = request
            if idempotency_key is not None:
                self._keys[idempotency_key] = stored.id
                self._key_of[stored.id] = idempotency_key
            if stored.worker is not None:
                self._held.setdefault(stored.worker, set()).add(stored.id)
            return stored.copy()

    def recover(self, task_id: str) -> TaskRecord | None:
        """A create here either stored or did not: nothing can land late."""
        return self.get(task_id)

    def get(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            record = self._live_locked(task_id)
            return None if record is None else record.copy()

    def request(self, task_id: str) -> RequestSnapshot | None:
        with self._lock:
            return self._requests.get(task_id)

    # -- transitions ---------------------------------------------------------

    def start(self, task_id: str, worker: str) -> TaskRecord | None:
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.status is not TaskStatus.QUEUED or record.worker != worker:
                return None
            record.status = TaskStatus.RUNNING
            record.started_at = time.time()
            record.attempts += 1
            return record.copy()

    def finish(
        self, task_id: str, worker: str, status: TaskStatus, response: StoredResponse
    ) -> bool | StoredResponse:
        require_final(status)
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.status is not TaskStatus.RUNNING or record.worker != worker:
                return False
            stored = self._settle_locked(record, status, response)
            return True if stored is response else stored

    def fail(self, task_id: str, response: StoredResponse) -> bool:
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.status.is_final:
                return False
            self._settle_locked(record, TaskStatus.FAILED, response)
            return True

    def cancel(self, task_id: str, response: StoredResponse) -> bool:
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.status.is_final:
                return False
            self._settle_locked(record, TaskStatus.CANCELLED, response)
            return True

    def progress(self, task_id: str, worker: str, document: dict[str, object]) -> bool:
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.status is not TaskStatus.RUNNING or record.worker != worker:
                return False
            record.progress = document
            return True

    def is_running(self, task_id: str, worker: str) -> bool:
        with self._lock:
            record = self._tasks.get(task_id)
            return (record is not None and record.status is TaskStatus.RUNNING
                    and record.worker == worker)

    def wait(self, task_id: str, timeout: float) -> TaskRecord | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            record = self._live_locked(task_id)
            if record is None or record.status.is_final or timeout <= 0:
                return None if record is None else record.copy()
            waiting = self._waiting.get(task_id)
            if waiting is None:
                waiting = self._waiting[task_id] = _Waiting(threading.Condition(self._lock))
            waiting.count += 1
            try:
                while (remaining := deadline - time.monotonic()) > 0 and not self._closed:
                    waiting.condition.wait(remaining)
                    record = self._live_locked(task_id)
                    if record is None or record.status.is_final:
                        break
            finally:
                waiting.count -= 1
                if waiting.count == 0:
                    del self._waiting[task_id]
            return None if record is None else record.copy()

    def wait_if(
        self, task_id: str, timeout: float, accept: Callable[[TaskRecord], bool] | None
    ) -> TaskRecord | None:
        record = self.get(task_id)
        if record is None or (accept is not None and not accept(record)):
            return None
        if record.status.is_final:
            return record
        return self.wait(task_id, timeout)

    def delete(self, task_id: str) -> bool:
        with self._lock:
            return self._drop_locked(task_id, deleted=True)

    def gone(self, task_id: str) -> Tombstone | None:
        with self._lock:
            self._live_locked(task_id)  # an expired task not swept yet is buried now
            found = self._tombstones.get(task_id)
            if found is None or found[0] <= time.time():
                return None
            return Tombstone(task_id, found[1], found[2])

    # -- leases --------------------------------------------------------------

    def heartbeat(self, worker: str, lease: float) -> None:
        with self._lock:
            now = time.time()
            if self._beat is not None and now - self._beat > lease / 2:
                # Nobody renewed a lease for a while (the process was frozen): none
                # is reaped until each has had a whole lease to renew its own.
                self._grace = now + lease
            self._beat = now
            self._leases[worker] = now + lease

    def retire(self, worker: str) -> None:
        with self._lock:
            self._leases.pop(worker, None)

    def reap(self, worker: str, limit: int = 100) -> list[TaskRecord]:
        now = time.time()
        requeued: list[TaskRecord] = []
        settled = 0
        with self._lock:
            if now < self._grace:
                return requeued
            for dead, expires in list(self._leases.items()):
                if expires > now or dead == worker:
                    continue
                held = self._held.get(dead, set())
                for task_id in list(held):
                    if settled >= limit:
                        return requeued
                    settled += 1
                    record = self._tasks[task_id]
                    held.discard(task_id)
                    if record.replay and task_id in self._requests:
                        record.status = TaskStatus.QUEUED
                        record.worker = worker
                        record.started_at = None
                        record.progress = None
                        self._held.setdefault(worker, set()).add(task_id)
                        requeued.append(record.copy())
                    else:
                        lost = lost_worker_response(task_id)
                        self._settle_locked(record, TaskStatus.FAILED, lost)
                self._held.pop(dead, None)
                del self._leases[dead]
        return requeued

    # -- expiry --------------------------------------------------------------

    def expire(self, limit: int = 1000) -> int:
        with self._lock:
            return self._expire_locked(time.time(), limit)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for waiting in self._waiting.values():
                waiting.condition.notify_all()

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)

    # -- internals (the lock is held) ------------------------------------------

    def _live_locked(self, task_id: str) -> TaskRecord | None:
        record = self._tasks.get(task_id)
        if record is None or record.finished_at is None:
            return record
        if record.finished_at + record.result_ttl <= time.time():
            self._drop_locked(task_id)
            return None
        return record

    def _settle_locked(
        self, record: TaskRecord, status: TaskStatus, response: StoredResponse
    ) -> StoredResponse:
        """Settle ``record``; return what was stored (a 507 when the result does not fit)."""
        if self._bytes + len(response.body) > self.max_bytes:
            self._expire_locked(time.time(), len(self._expiry))
        if self._bytes + len(response.body) > self.max_bytes:
            status, response = TaskStatus.FAILED, error_response(
                507,
                f"The result ({len(response.body)} bytes) does not fit in the registry: "
                f"finished tasks already hold {self._bytes} of its {self.max_bytes} bytes.",
                id=record.id,
                reason="registry_full",
            )
        self._bytes += len(response.body)
        self._finished += 1
        record.status = status
        record.response = response
        record.finished_at = time.time()
        if record.worker is not None:
            self._held.get(record.worker, set()).discard(record.id)
        self._requests.pop(record.id, None)
        heapq.heappush(self._expiry, (record.finished_at + record.result_ttl, record.id))
        waiting = self._waiting.get(record.id)
        if waiting is not None:
            waiting.condition.notify_all()
        return response

    def _drop_locked(self, task_id: str, deleted: bool = False) -> bool:
        record = self._tasks.pop(task_id, None)
        if record is None:
            return False
        self._bury_locked(record, buried_as(record.status, deleted),
                          None if deleted else record.expires_at)
        if record.response is not None:
            self._bytes -= len(record.response.body)
            self._finished -= 1
            # Deleted tasks leave stale heap entries; rebuild before they outnumber live ones.
            if len(self._expiry) > 2 * self._finished + 64:
                self._expiry = [
                    (expires, tid)
                    for tid, task in self._tasks.items()
                    if (expires := task.expires_at) is not None
                ]
                heapq.heapify(self._expiry)
        self._requests.pop(task_id, None)
        key = self._key_of.pop(task_id, None)
        if key is not None and self._keys.get(key) == task_id:
            del self._keys[key]
        if record.worker is not None:
            held = self._held.get(record.worker)
            if held is not None:
                held.discard(task_id)
        return True

    def _bury_locked(self, record: TaskRecord, status: str, since: float | None) -> None:
        """Leave a tombstone lasting from ``since`` (now if ``None``); drop expired ones,
        and the oldest past ``max_tasks``."""
        now = time.time()
        tombstones = self._tombstones
        while tombstones and next(iter(tombstones.values()))[0] <= now:
            tombstones.popitem(last=False)
        start = now if since is None else since
        tombstones[record.id] = (start + self.tombstone_ttl, status, record.owner)
        if len(tombstones) > self.max_tasks:
            tombstones.popitem(last=False)

    def _expire_locked(self, now: float, limit: int) -> int:
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now and dropped < limit:
            _, task_id = heapq.heappop(self._expiry)
            record = self._tasks.get(task_id)
            # A heap entry is stale when the task was deleted or settled again.
            if record is not None and (record.expires_at or float("inf")) <= now:
                self._drop_locked(task_id)
                dropped += 1
        return dropped


class _Waiting:
    """The condition the waiters of one task sleep on, and how many they are."""

    __slots__ = ("condition", "count")

    def __init__(self, condition: threading.Condition) -> None:
        self.condition = condition
        self.count = 0
