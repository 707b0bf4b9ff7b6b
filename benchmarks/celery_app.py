"""The Celery contender's application, for ``celery -A benchmarks.celery_app worker``.

Broker and result backend are the real Redis (``BENCH_REDIS_URL``); every key
carries the run's ``BENCH_PREFIX`` and the queue is the run's own, so the
benchmark deletes exactly what it wrote.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from .work import cpu, noop, sleep


def make_celery() -> Celery:
    url = os.environ["BENCH_REDIS_URL"]
    prefix = os.environ["BENCH_PREFIX"] + "celery:"
    celery = Celery("bench", broker=url, backend=url, set_as_current=False)
    celery.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
        broker_connection_retry_on_startup=True,
        task_default_queue=os.environ.get("BENCH_QUEUE", "bench"),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=600,
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=4,
    )
    return celery


app = make_celery()
tasks: dict[str, Any] = {
    "noop": app.task(name="bench.noop")(noop),
    "sleep": app.task(name="bench.sleep")(sleep),
    "cpu": app.task(name="bench.cpu")(cpu),
}
