"""Prometheus metrics of the tasks (the ``metrics`` extra: ``prometheus_client``).

``AsyncMiddleware(app, routes=..., metrics=True)`` records them, and
``metrics="/metrics"`` also serves them on that path; :func:`make_metrics_app`
gives the same WSGI app to mount yourself.  Under several processes (gunicorn
``-w N``), set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder before the server
starts: each process then writes its own values there (prometheus_client's
multiprocess mode) and any process answers a scrape with the sum of all.  The
queue shared by worker processes is read from the registry itself at scrape
time, so it is the same whichever process answers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client import make_wsgi_app as _make_wsgi_app
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "wsgi_async metrics need prometheus_client: pip install 'wsgi-async[metrics]'"
    ) from exc

from .errors import RegistryError
from .observer import Observer
from .registry import Registry
from .types import StartResponse, WSGIApplication, WSGIEnvironment

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
           300.0, 600.0, float("inf"))

ACCEPTED = Counter("wsgi_async_tasks_accepted", "Tasks stored and answered 202.", ["route"])
REFUSED = Counter("wsgi_async_tasks_refused",
                  "Requests matching a route that got no task, by reason.", ["route", "reason"])
FINISHED = Counter("wsgi_async_tasks_finished",
                   "Tasks that ran to an end, by outcome and the stored status class.",
                   ["route", "outcome", "status_class"])
CANCELLED = Counter("wsgi_async_tasks_cancelled",
                    "Pending tasks cancelled by a DELETE, or failed unrun at shutdown.")
QUEUED = Gauge("wsgi_async_tasks_queued", "Tasks waiting for a thread in the processes' pools.",
               multiprocess_mode="livesum")
RUNNING = Gauge("wsgi_async_tasks_running", "Tasks running now.", ["route"],
                multiprocess_mode="livesum")
LONG_POLLS = Gauge("wsgi_async_long_polls", "Prefer: wait requests held now.",
                   multiprocess_mode="livesum")
QUEUE_WAIT = Histogram("wsgi_async_task_queue_wait_seconds",
                       "From the submit to the start of the task.", ["route"], buckets=SECONDS)
RUN_TIME = Histogram("wsgi_async_task_run_seconds", "How long the application ran for a task.",
                     ["route"], buckets=SECONDS)


class PrometheusMetrics(Observer):
    """Records the task events as the Prometheus metrics above."""

    def accepted(self, route: str) -> None:
        ACCEPTED.labels(route).inc()

    def refused(self, route: str, reason: str) -> None:
        REFUSED.labels(route, reason).inc()

    def queued(self, delta: int) -> None:
        QUEUED.inc(delta)

    def started(self, route: str, waited: float) -> None:
        RUNNING.labels(route).inc()
        QUEUE_WAIT.labels(route).observe(max(waited, 0.0))

    def finished(self, route: str, outcome: str, status: int, duration: float) -> None:
        FINISHED.labels(route, outcome, f"{status // 100}xx").inc()
        RUN_TIME.labels(route).observe(max(duration, 0.0))
        RUNNING.labels(route).dec()  # last: a scrape that sees it ended sees it counted

    def cancelled(self) -> None:
        CANCELLED.inc()

    def long_polls(self, delta: int) -> None:
        LONG_POLLS.inc(delta)


class QueueDepthCollector(Collector):
    """The worker queue's depth, read from the shared registry at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.registry.capabilities.queue:
            return
        try:
            depth = self.registry.queued()
        except RegistryError:
            return  # no sample rather than a wrong one; the scrape still succeeds
        yield GaugeMetricFamily("wsgi_async_queue_depth",
                                "Tasks waiting on the registry's queue for a worker process "
                                "(every process and host).", value=depth)


class _Process(Collector):
    """This process's metrics, from prometheus_client's default registry."""

    def collect(self) -> Iterable[Any]:
        return REGISTRY.collect()


def make_metrics_app(registry: Registry | None = None) -> WSGIApplication:
    """A WSGI app answering Prometheus scrapes with the task metrics.

    Under ``PROMETHEUS_MULTIPROC_DIR`` it sums every process's values;
    with ``registry`` it adds that registry's worker-queue depth.
    """
    scraped = CollectorRegistry(auto_describe=True)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(scraped)  # type: ignore[no-untyped-call]
    else:
        scraped.register(_Process())
    if registry is not None:
        scraped.register(QueueDepthCollector(registry))
    served = _make_wsgi_app(scraped)

    def metrics_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body: Iterable[bytes] = served(environ, start_response)
        return body

    return metrics_app
