"""What a running task's application finds in ``environ["wsgi_async.task"]``.

Besides the task's id and attempt, the handle reports progress and tells the
application when the task was cancelled.  Both go through the registry, so
they cross processes; both are rate-limited so that calling them in a tight
loop costs next to nothing: at most one progress write every
:data:`PROGRESS_INTERVAL` and one cancellation check every
:data:`CHECK_INTERVAL` per task.
"""

from __future__ import annotations

import logging
import math
import threading
from decimal import Decimal
from numbers import Real
from time import monotonic

from .errors import RegistryError, TaskCancelled
from .registry.base import Registry

log = logging.getLogger("wsgi_async")

#: Seconds between two progress writes of one task (the latest value is kept meanwhile).
PROGRESS_INTERVAL = 0.2
#: Seconds between two reads that ask the registry whether the task still runs.
CHECK_INTERVAL = 0.5
#: Characters of a progress message kept; a longer one is cut and ends with "...".
MAX_MESSAGE = 200

_INF = math.inf
_Progress = tuple[float, float | None, str | None]


class TaskHandle:
    """The running task, as its application sees it.

    ``id`` and ``attempt`` name the task (``attempt`` > 1 when it is replayed);
    :meth:`progress` reports how far it got; :attr:`cancelled` and
    :meth:`check` say whether it was cancelled (or otherwise ended, e.g. timed
    out), so that the application can stop early.  A handle made without a
    registry (in a test, say) keeps its progress to itself and is never
    cancelled.
    """

    __slots__ = (
        "_cancelled", "_lock", "_next_check", "_next_write", "_registry", "_worker",
        "_written", "attempt", "id", "latest",
    )

    def __init__(
        self,
        id: str,
        attempt: int = 1,
        *,
        registry: Registry | None = None,
        worker: str | None = None,
    ) -> None:
        self.id = id
        self.attempt = attempt
        #: The latest progress reported, as (current, total, message), or None.
        self.latest: _Progress | None = None
        self._registry = registry if worker is not None else None
        self._worker = worker or ""
        self._lock = threading.Lock()
        self._written: _Progress | None = None
        self._next_write = 0.0
        self._next_check = monotonic() + CHECK_INTERVAL
        self._cancelled = False

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id} attempt={self.attempt}>"

    @property
    def replayed(self) -> bool:
        return self.attempt > 1

    def progress(
        self, current: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Report that ``current`` of ``total`` units are done, with an optional ``message``.

        Pollers see ``{"current", "total", "percent", "message"}`` in the status
        document.  Raises :class:`ValueError` for a value that is not a finite
        number at least 0, a ``total`` of 0, or ``current`` above ``total``.
        Cheap enough for a tight loop: the registry is written at most every
        :data:`PROGRESS_INTERVAL` seconds, and the latest value always before
        the task's result is stored.
        """
        # Exact types first: the common case costs two comparisons.
        if type(current) is not int and type(current) is not float:
            current = _number("current", current)
        if not 0 <= current < _INF:
            raise ValueError(f"progress: current must be a finite number >= 0, got {current!r}")
        if total is not None:
            if type(total) is not int and type(total) is not float:
                total = _number("total", total)
            if not 0 < total < _INF:
                raise ValueError(f"progress: total must be a finite number > 0, got {total!r}")
            if current > total:
                raise ValueError(f"progress: current ({current!r}) exceeds total ({total!r})")
        if message is not None:
            if type(message) is not str:
                raise ValueError(f"progress: message must be a str, got {type(message).__name__}")
            if len(message) > MAX_MESSAGE:
                message = message[: MAX_MESSAGE - 3] + "..."
        self.latest = (current, total, message)
        if self._registry is not None and monotonic() >= self._next_write:
            self._write(blocking=False)

    @property
    def cancelled(self) -> bool:
        """Whether the task was cancelled (or ended otherwise): its result would be discarded.

        Asks the registry at most every :data:`CHECK_INTERVAL` seconds, so it
        may be read in a loop; a cancel from any process is seen within about
        that time.
        """
        if self._cancelled:
            return True
        if self._registry is None:
            return False
        now = monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + CHECK_INTERVAL
        try:
            running = self._registry.is_running(self.id, self._worker)
        except RegistryError as exc:
            log.warning("wsgi_async: task %s: cannot check for a cancel: %s", self.id, exc)
            return False
        if not running:
            self._cancelled = True
        return not running

    def check(self) -> None:
        """Raise :class:`~wsgi_async.TaskCancelled` if the task was cancelled.

        The application may let it propagate: the task then ends quietly.
        """
        if self.cancelled:
            raise TaskCancelled(f"task {self.id} was cancelled")

    def flush(self) -> None:
        """Write the latest progress if it was not written yet (the runner calls it last)."""
        if self._registry is not None and self.latest is not self._written:
            self._write(blocking=True)

    def _write(self, *, blocking: bool) -> None:
        # One writer at a time; a thread that finds the lock taken leaves the
        # latest value to the next write, or to the last flush.
        if not self._lock.acquire(blocking=blocking):
            return
        try:
            latest = self.latest
            if latest is None or latest is self._written or self._registry is None:
                return
            self._written = latest
            self._next_write = monotonic() + PROGRESS_INTERVAL
            try:
                running = self._registry.progress(self.id, self._worker, document(*latest))
            except RegistryError as exc:
                log.warning("wsgi_async: task %s: progress not stored: %s", self.id, exc)
                return
            # The write also said whether the task still runs: that was a check.
            self._next_check = monotonic() + CHECK_INTERVAL
            if not running:
                self._cancelled = True
        finally:
            self._lock.release()


def document(current: float, total: float | None, message: str | None) -> dict[str, object]:
    """The status document's ``progress`` member."""
    # Rounded down to a hundredth, so that 100 means done.
    percent = None if total is None else math.floor(current * 10_000 / total) / 100
    return {"current": current, "total": total, "percent": percent, "message": message}


def _number(name: str, value: object) -> float:
    """A real number other than a bool (``Decimal``, ``Fraction``, numpy's...) as a float."""
    if isinstance(value, bool) or not isinstance(value, (Real, Decimal)):
        raise ValueError(f"progress: {name} must be a number, got {value!r}")
    return float(value)
