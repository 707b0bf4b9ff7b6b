"""The two endpoints' work, identical for every contender.

``noop`` returns a small JSON at once, so the machinery around it is all that
is measured; ``sleep`` waits 50 ms like a slow query; ``cpu`` computes for
about 20 ms in pure Python (holding the GIL), like a report or an image.  Both echo ``n`` so the
client can check it got the result of its own task, and ``sleep`` says when it
finished, so the client can tell how long the result took to reach it.
"""

from __future__ import annotations

import time
from typing import Any

SLEEP_SECONDS = 0.05
# About 20 ms of arithmetic on the development machine (see benchmarks/README.md).
CPU_ITERATIONS = 100_000


def noop(n: int) -> dict[str, Any]:
    return {"n": n, "ok": True}


def sleep(n: int, seconds: float = SLEEP_SECONDS) -> dict[str, Any]:
    """Sleep ``seconds`` (at most 5), like a slow query."""
    seconds = min(max(seconds, 0.0), 5.0)
    time.sleep(seconds)
    return {"n": n, "slept": seconds, "done_at": time.time()}


def cpu(n: int) -> dict[str, Any]:
    """About 20 ms of pure-Python computation."""
    x = n
    for i in range(CPU_ITERATIONS):
        x = (x * 31 + i) % 1_000_003
    return {"n": n, "x": x}


WORK = {"noop": noop, "sleep": sleep, "cpu": cpu}
