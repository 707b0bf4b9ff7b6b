"""The task model: a task's status, its stored response and request, and its record.

These are plain values shared by the middleware, the task service, the worker
command and every registry backend; they serialise to JSON and bytes only
(never pickle), so that a task can cross processes and hosts.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from enum import Enum

from .errors import error_parts


def new_task_id() -> str:
    """A URL-safe id with 192 bits from :mod:`secrets`."""
    return secrets.token_urlsafe(24)


class TaskStatus(str, Enum):
    """Where a task is in its life: queued -> running -> done | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self is not TaskStatus.QUEUED and self is not TaskStatus.RUNNING


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


def cancelled_response(task_id: str) -> StoredResponse:
    """What a cancelled task answers: ``410 Gone`` saying so."""
    return error_response(410, "The task was cancelled.", id=task_id, status="cancelled")


# What an environ entry costs beyond its characters: the header of the value's str
# object (49 bytes on 64-bit CPython) and a dict slot; keys are mostly shared.
ENTRY_OVERHEAD = 64


#: How long a tombstone outlives its task by default (a day), in seconds.
TOMBSTONE_TTL = 86_400.0


@dataclass(slots=True, frozen=True)
class Tombstone:
    """What is left of a task its registry no longer holds, for ``tombstone_ttl`` seconds.

    ``status`` says why it is gone: ``"expired"`` (its result outlived
    ``result_ttl``), ``"cancelled"`` or ``"deleted"``; ``owner`` is the task's,
    so that only its owner learns that it existed.
    """

    id: str
    status: str
    owner: str | None = None


def check_tombstone_ttl(value: object) -> None:
    """A tombstone TTL is a finite number of seconds above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"tombstone_ttl must be a number of seconds, got {value!r}")
    if not 0 < value < math.inf:
        raise ValueError(f"tombstone_ttl must be a finite number above 0, got {value!r}")


def buried_as(status: TaskStatus, deleted: bool) -> str:
    """The tombstone status of a task with ``status`` that is forgotten (or ``deleted``)."""
    if status is TaskStatus.CANCELLED:
        return "cancelled"
    return "deleted" if deleted else "expired"


@dataclass(slots=True, frozen=True)
class RequestSnapshot:
    """What is needed to run a request again: its JSON-safe environ and its body.

    Only ``str`` environ entries are kept: they are what survives a process
    boundary, and they hold nothing that dies with the original request.
    """

    environ: dict[str, str]
    body: bytes

    @property
    def size(self) -> int:
        """The memory this request holds while its task is pending: its body and its environ.

        The environ counts too: its headers can weigh more than the body (50
        headers of 8 KB are 400 KB on an empty POST).  Each entry is its
        characters plus :data:`ENTRY_OVERHEAD`.
        """
        return len(self.body) + sum(
            len(key) + len(value) + ENTRY_OVERHEAD for key, value in self.environ.items()
        )

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
    # The latest progress the application reported (see TaskHandle.progress), or None.
    progress: dict[str, object] | None = None

    def copy(self) -> TaskRecord:
        """A shallow copy (what ``dataclasses.replace(self)`` gives, several times faster)."""
        return TaskRecord(
            self.id, self.route, self.status, self.created_at, self.started_at,
            self.finished_at, self.worker, self.owner, self.fingerprint, self.attempts,
            self.replay, self.timeout, self.result_ttl, self.response, self.progress,
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
            "created_at": rfc3339(self.created_at),
            "started_at": None if self.started_at is None else rfc3339(self.started_at),
            "progress": self.progress,
        }


def rfc3339(timestamp: float) -> str:
    """An epoch time as an RFC 3339 UTC string to the millisecond: ``2026-12-03T12:45:00.123Z``."""
    seconds = int(timestamp)
    return f"{_utc_second(seconds)}.{int((timestamp - seconds) * 1000):03d}Z"


@functools.lru_cache(maxsize=256)
def _utc_second(seconds: int) -> str:
    # Tasks made at about the same time share their second: format it once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
