"""Structured fields on the log records about a task.

Every record the middleware logs about a task carries the same attributes:
``task_id``, ``route``, ``outcome``, ``status`` and ``duration`` (``None``
where not known yet), passed as ``extra``, so that a JSON formatter picks them
up as fields while the message itself stays readable.
"""

from __future__ import annotations

FIELDS = ("task_id", "route", "outcome", "status", "duration")


def task_fields(
    task_id: str | None,
    route: str | None = None,
    *,
    outcome: str | None = None,
    status: int | None = None,
    duration: float | None = None,
) -> dict[str, object]:
    """The ``extra`` of a log record about a task (always every field, for a fixed schema)."""
    return {
        "task_id": task_id,
        "route": route,
        "outcome": outcome,
        "status": status,
        "duration": None if duration is None else round(duration, 6),
    }
