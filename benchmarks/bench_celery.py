"""The Celery application of section (b), for ``celery -A bench_celery worker``.

Broker and result backend are Redis (``BENCH_REDIS_URL``); every key carries
the run's random ``BENCH_PREFIX`` and the queue is the run's own, so the
benchmark can delete exactly what it wrote.
"""

from __future__ import annotations

import os
from typing import Any

from bench_tasks import work
from celery import Celery


def make_celery() -> tuple[Celery, Any]:
    """A Celery app and its ``bench.work`` task; each client thread builds its own."""
    url = os.environ["BENCH_REDIS_URL"]
    prefix = os.environ["BENCH_PREFIX"]
    app = Celery("bench_celery", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
        broker_connection_retry_on_startup=True,
        task_default_queue=os.environ["BENCH_QUEUE"],
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=600,
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
    )

    bench_work = app.task(name="bench.work")(work)
    return app, bench_work


app, bench_work = make_celery()
