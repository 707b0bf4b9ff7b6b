"""The task record and the contract every registry backend fulfils.

A registry stores tasks (status, timings, the buffered response) where every
process that serves the application can see them.  The middleware only ever
talks to the :class:`Registry` protocol, so backends are interchangeable.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, cast, runtime_checkable

from ..errors import RegistryError as RegistryError
from ..errors import RegistryFull as RegistryFull
from ..errors import RegistryUnavailable as RegistryUnavailable
from ..errors import error_parts


class TaskStatus(str, Enum):
    """Where a task is in its life: queued -> running -> done | failed."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self is TaskStatus.DONE or self is TaskStatus.FAILED


@dataclass(slots=True, frozen=True)
class StoredResponse:
    """A complete, validated WSGI response: status line, headers and body."""

    status: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def status_code(self) -> int:
        return int(self.status[:3])

    def headers_json(self) -> str:
        return json.dumps([self.status, [list(h) for h in self.headers]])

    @classmethod
    def from_parts(cls, headers_json: str, body: bytes) -> StoredResponse:
        status, headers = json.loads(headers_json)
        return cls(str(status), tuple((str(k), str(v)) for k, v in headers), bytes(body))


def require_final(status: TaskStatus) -> None:
    """``finish`` takes only a final status: a task never goes back to pending."""
    if not status.is_final:
        raise ValueError(f"status must be final, got {status.value!r}")


def error_response(code: int, detail: str, **extra: object) -> StoredResponse:
    """A stored JSON error response, as kept for a failed task."""
    return StoredResponse(*error_parts(code, detail, **extra))


def lost_worker_response(task_id: str) -> StoredResponse:
    """What a task whose process died (and that cannot be replayed) answers."""
    return error_response(
        500,
        "The worker process running this task was lost before it finished.",
        id=task_id,
        reason="worker_lost",
    )


@dataclass(slots=True, frozen=True)
class RequestSnapshot:
    """What is needed to run a request again: its JSON-safe environ and its body.

    Only ``str`` environ entries are kept: they are what survives a process
    boundary, and they hold nothing that dies with the original request.
    """

    environ: dict[str, str]
    body: bytes

    def to_json(self) -> str:
        return json.dumps(
            {"environ": self.environ, "body": base64.b64encode(self.body).decode("ascii")},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> RequestSnapshot:
        raw = json.loads(data)
        environ = {str(k): str(v) for k, v in raw["environ"].items()}
        return cls(environ, base64.b64decode(raw["body"]))


@dataclass(slots=True)
class TaskRecord:
    """One task as the registry stores it.

    ``worker`` is the id of the process that holds the task (queued in its
    pool or running there); ``owner`` is a hash of the submitting client's
    identity, or ``None`` when the middleware does not bind tasks to clients;
    ``fingerprint`` is a hash of the request (method, target, body), used to
    tell a retry from a different request under the same idempotency key.
    """

    id: str
    route: str
    status: TaskStatus = TaskStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    owner: str | None = None
    fingerprint: str | None = None
    attempts: int = 0
    replay: bool = False
    timeout: float | None = None
    result_ttl: float = 300.0
    response: StoredResponse | None = None

    def copy(self) -> TaskRecord:
        """A shallow copy (what ``dataclasses.replace(self)`` gives, several times faster)."""
        return TaskRecord(
            self.id, self.route, self.status, self.created_at, self.started_at,
            self.finished_at, self.worker, self.owner, self.fingerprint, self.attempts,
            self.replay, self.timeout, self.result_ttl, self.response,
        )

    @property
    def expires_at(self) -> float | None:
        """When a finished task is forgotten; ``None`` while it is still pending."""
        if self.finished_at is None:
            return None
        return self.finished_at + self.result_ttl

    def summary(self) -> dict[str, object]:
        """The JSON document a client sees while the task is pending."""
        return {
            "id": self.id,
            "status": self.status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "progress": None,
        }


@runtime_checkable
class Registry(Protocol):
    """Where tasks live.  Every method is thread-safe.

    Transitions are conditional so that a late or duplicate writer can never
    overwrite a newer state: ``start`` only moves a queued task held by the
    caller, ``finish`` only a running task held by the caller.  Backends raise
    :class:`RegistryUnavailable` when their storage cannot be reached and
    leave nothing half-written.
    """

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

    def start(self, task_id: str, worker: str) -> TaskRecord | None:
        """Move a queued task held by ``worker`` to running; ``None`` if it is not."""
        ...

    def finish(
        self, task_id: str, worker: str, status: TaskStatus, response: StoredResponse
    ) -> bool:
        """Store the final state of a task that ``worker`` is running.

        Returns ``False`` (and changes nothing) when the task is no longer
        running under ``worker``: a late result after a timeout or a reap.
        """
        ...

    def fail(self, task_id: str, response: StoredResponse) -> bool:
        """Mark a pending task failed with ``response`` whoever holds it."""
        ...

    def wait(self, task_id: str, timeout: float) -> TaskRecord | None:
        """Block until the task is final or ``timeout`` seconds pass; return it."""
        ...

    def delete(self, task_id: str) -> bool:
        """Forget a task; ``True`` if it existed."""
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


def wait_if(
    registry: Registry, task_id: str, timeout: float, accept: Callable[[TaskRecord], bool]
) -> TaskRecord | None:
    """Read the task; if ``accept`` says yes and it is pending, wait up to ``timeout`` for it.

    ``None`` when the task is unknown or not accepted (then nothing blocks).
    A backend whose :meth:`Registry.wait` must read the task first anyway
    (Redis, SQLite) has a ``wait_if`` method that does the same in one read
    fewer; any other registry gets a plain ``get`` then ``wait``.
    """
    own = getattr(registry, "wait_if", None)
    if own is not None:
        return cast("TaskRecord | None", own(task_id, timeout, accept))
    record = registry.get(task_id)
    if record is None or not accept(record):
        return None
    if record.status.is_final:
        return record
    return registry.wait(task_id, timeout)
