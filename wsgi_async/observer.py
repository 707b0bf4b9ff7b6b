"""What the task service reports as tasks come and go: nothing, unless metrics are on.

:class:`Observer` is the no-op default; :class:`wsgi_async.metrics.PrometheusMetrics`
records the same calls as Prometheus metrics.  Keeping the hooks here lets the
core run without ``prometheus_client`` installed.
"""

from __future__ import annotations


class Observer:
    """Hears each task event; every method does nothing here."""

    def accepted(self, route: str) -> None:
        """A new task was stored for ``route``."""

    def refused(self, route: str, reason: str) -> None:
        """A request matching ``route`` got no task (``reason``: a short label)."""

    def queued(self, delta: int) -> None:
        """Tasks waiting in this process's pool changed by ``delta``."""

    def started(self, route: str, waited: float) -> None:
        """A task began to run, ``waited`` seconds after it was submitted."""

    def finished(self, route: str, outcome: str, status: int, duration: float) -> None:
        """A task that ran here ended after ``duration`` s (``outcome``: its final status)."""

    def cancelled(self) -> None:
        """A pending task was cancelled (``DELETE``), or failed unrun at shutdown."""

    def long_polls(self, delta: int) -> None:
        """``Prefer: wait`` requests held in this process changed by ``delta``."""
