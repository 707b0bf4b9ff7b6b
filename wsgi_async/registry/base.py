"""The contract every registry backend fulfils, and what each one can do.

A registry stores tasks (status, timings, the buffered response) where the
processes that serve the application can see them.  The task service only
ever talks to the :class:`Registry` protocol, and asks a backend what it can
do through :class:`Capabilities` rather than by its type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from ..errors import MaybeWritten as MaybeWritten
from ..errors import QueueFull as QueueFull
from ..errors import RegistryError as RegistryError
from ..errors import RegistryFull as RegistryFull
from ..errors import RegistryUnavailable as RegistryUnavailable
from ..model import TOMBSTONE_TTL as TOMBSTONE_TTL
from ..model import RequestSnapshot as RequestSnapshot
from ..model import StoredResponse as StoredResponse
from ..model import TaskRecord as TaskRecord
from ..model import TaskStatus as TaskStatus
from ..model import Tombstone as Tombstone
from ..model import buried_as as buried_as
from ..model import check_tombstone_ttl as check_tombstone_ttl
from ..model import error_response as error_response
from ..model import lost_worker_response as lost_worker_response
from ..model import require_final as require_final


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend offers beyond the common contract.

    ``shared``: other processes (and hosts) see the same tasks, so polls may
    land on any of them; ``queue``: tasks can be handed to separate worker
    processes through the registry; ``blocking_wait``: :meth:`Registry.wait`
    is woken by the completion itself rather than by re-reading.
    """

    shared: bool
    queue: bool
    blocking_wait: bool


@dataclass(frozen=True, slots=True)
class Claimed:
    """A task a worker took from the queue: its record (held by the worker) and request."""

    record: TaskRecord
    request: RequestSnapshot


class TaskQueue(Protocol):
    """The queue that hands tasks to separate worker processes.

    Only backends whose ``capabilities.queue`` is true implement it; the others
    raise :class:`RegistryError`.  A queued task has no holder until a worker
    claims it; the claim makes the worker its holder (still ``queued``: the
    runner then starts it as for any task), under the worker's lease.  A task
    whose worker's lease lapses goes back on the queue when it never started
    or may be replayed, else it fails with the stored ``worker_lost`` 500
    (:meth:`Registry.reap`).  The queue entry is acknowledged only when the
    task's final state is stored, in the same atomic write.
    """

    def enqueue(
        self,
        record: TaskRecord,
        request: RequestSnapshot,
        idempotency_key: str | None = None,
        *,
        max_queued: int,
    ) -> TaskRecord:
        """Store a new task with its request and put it on the queue of its route.

        Like :meth:`Registry.create`, but ``record.worker`` is ignored (no one
        holds it yet).  Raises :class:`~wsgi_async.errors.QueueFull`, storing
        nothing, when ``max_queued`` tasks already wait for a worker.
        """
        ...

    def claim(
        self, worker: str, routes: Sequence[str], limit: int, wait: float, lease: float
    ) -> list[Claimed]:
        """Take up to ``limit`` queued tasks of ``routes`` for ``worker``.

        Blocks up to ``wait`` seconds while there is none.  ``lease`` is how
        long a claim may go unacknowledged before another worker may take it
        over (the workers' ``lease_time``).
        """
        ...

    def queued(self) -> int:
        """How many tasks wait on the queue for a worker (an O(1) counter)."""
        ...


@runtime_checkable
class Registry(TaskQueue, Protocol):
    """Where tasks live.  Every method is thread-safe.

    Transitions are conditional so that a late or duplicate writer can never
    overwrite a newer state: ``start`` only moves a queued task held by the
    caller, ``finish`` only a running task held by the caller.  Backends raise
    :class:`RegistryUnavailable` when their storage cannot be reached and
    leave nothing half-written.
    """

    capabilities: ClassVar[Capabilities]

    def create(
        self,
        record: TaskRecord,
        request: RequestSnapshot | None = None,
        idempotency_key: str | None = None,
    ) -> TaskRecord:
        """Store a new queued task held by ``record.worker``.

        With ``idempotency_key``, a live task already created under that key is
        returned instead and nothing is stored.  Raises :class:`RegistryFull`
        when the registry holds its maximum number of tasks.
        """
        ...

    def get(self, task_id: str) -> TaskRecord | None:
        """The task, with its response when final; ``None`` if unknown or expired."""
        ...

    def recover(self, task_id: str) -> TaskRecord | None:
        """After a :meth:`create` of ``task_id`` that raised :class:`MaybeWritten`.

        The task if the registry stored it after all, else ``None``; then a
        late run of that create (still in a stalled server's buffers) must store
        nothing.  A backend whose writes cannot land late answers :meth:`get`.
        """
        ...

    def start(self, task_id: str, worker: str) -> TaskRecord | None:
        """Move a queued task held by ``worker`` to running; ``None`` if it is not."""
        ...

    def finish(
        self, task_id: str, worker: str, status: TaskStatus, response: StoredResponse
    ) -> bool | StoredResponse:
        """Store the final state of a task that ``worker`` is running.

        Returns ``False`` (and changes nothing) when the task is no longer
        running under ``worker``: a late result after a timeout or a reap.
        A registry that stores a failure in the response's place (the memory
        registry's 507 for a result that does not fit) returns that failure,
        so that the caller logs what was really stored.
        """
        ...

    def fail(self, task_id: str, response: StoredResponse) -> bool:
        """Mark a pending task failed with ``response`` whoever holds it."""
        ...

    def progress(self, task_id: str, worker: str, document: dict[str, object]) -> bool:
        """Store the progress ``document`` of a task that ``worker`` is running.

        Returns ``False`` (and changes nothing) when the task no longer runs
        under ``worker``: cancelled, timed out or reaped.
        """
        ...

    def is_running(self, task_id: str, worker: str) -> bool:
        """Whether the task still runs under ``worker`` (a handle's cancellation check)."""
        ...

    def wait(self, task_id: str, timeout: float) -> TaskRecord | None:
        """Block until the task is final or ``timeout`` seconds pass; return it."""
        ...

    def wait_if(
        self, task_id: str, timeout: float, accept: Callable[[TaskRecord], bool] | None
    ) -> TaskRecord | None:
        """Read the task; if ``accept`` says yes and it is pending, wait up to ``timeout``.

        ``None`` when the task is unknown or not accepted (then nothing blocks):
        a long-poll checks the owner and waits in one read.
        """
        ...

    def delete(self, task_id: str) -> bool:
        """Forget a task, leaving a tombstone; ``True`` if it existed."""
        ...

    def cancel(self, task_id: str, response: StoredResponse) -> bool:
        """Settle a pending task as cancelled with ``response``, whoever holds it.

        ``False`` (nothing changed) when the task is unknown or already final:
        a cancel racing the task's own ``finish`` ends in exactly one of them.
        """
        ...

    def gone(self, task_id: str) -> Tombstone | None:
        """The tombstone of a task no longer held (expired, cancelled or deleted).

        Tombstones last ``tombstone_ttl`` seconds after their task is forgotten,
        and a backend keeps at most ``max_tasks`` of them, the oldest dropped
        first.  ``None`` for an id that never existed or whose tombstone expired.
        """
        ...

    def request(self, task_id: str) -> RequestSnapshot | None:
        """The stored request of a replayable task."""
        ...

    def heartbeat(self, worker: str, lease: float) -> None:
        """Declare ``worker`` alive for the next ``lease`` seconds."""
        ...

    def retire(self, worker: str) -> None:
        """Forget ``worker``'s lease at a clean shutdown."""
        ...

    def reap(self, worker: str, limit: int = 100) -> list[TaskRecord]:
        """Settle up to ``limit`` pending tasks of workers whose lease lapsed.

        A replayable task goes back to queued, now held by ``worker``, and is
        returned so that the caller runs it; any other is failed with a stored
        500 that says its worker was lost.
        """
        ...

    def expire(self, limit: int = 1000) -> int:
        """Drop up to ``limit`` finished tasks past their TTL; return how many."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...
