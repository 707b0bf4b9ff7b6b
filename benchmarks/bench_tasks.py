"""The unit of work every system under test runs: tiny, so the machinery dominates.

``work(n)`` is the "short task" of section (b): a few microseconds of pure
Python, identical for wsgi_async, the recipe, Celery and RQ.  ``slow(s)`` is
the sleeping task of the bound check (c).
"""

from __future__ import annotations

import time


def work(n: int) -> dict[str, int]:
    """A deterministic, checkable result: the client verifies ``total``."""
    return {"n": n, "total": sum(range(n % 100))}


def expected_total(n: int) -> int:
    return sum(range(n % 100))


def slow(seconds: float) -> dict[str, float]:
    time.sleep(seconds)
    return {"slept": seconds}
