"""The Redis server the Redis-backed contenders share, seen from the runner.

Every key the run writes starts with its random prefix; :func:`clean` deletes
exactly those (never ``FLUSHDB``).  ``INFO`` gives Redis's own CPU and memory,
which the Redis-backed contenders cost on top of their processes.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_URL = "redis://127.0.0.1:6379/14"


def redis_url() -> str:
    return os.environ.get("WSGI_ASYNC_BENCH_REDIS", DEFAULT_URL)


def connect(url: str) -> tuple[Any, str]:
    """A redis-py client, or ``(None, reason)`` when Redis cannot be used."""
    try:
        import redis
    except ImportError:
        return None, "redis-py is not installed (pip install -e '.[bench]')"
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return None, f"no Redis at {url}: {exc}"
    return client, ""


def cpu_seconds(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def clean(client: Any, prefix: str) -> int:
    """Delete every key under ``prefix``; return how many."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(client.delete(*batch))
            batch.clear()
    if batch:
        deleted += int(client.delete(*batch))
    return deleted
