"""The speed goals of the issue, checked against one run's rows.

Each target is a ratio or a bound read from rows measured side by side; a
target whose rows are missing (skipped contender) says so instead of passing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

Rows = Sequence[dict[str, Any]]
PEERS = ("recipe", "celery", "rq", "rq simple")


@dataclass(frozen=True, slots=True)
class Outcome:
    target: str
    measured: str
    met: bool | None  # None: not measured in this run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Missing(Exception):
    """A row a target needs was not measured (skipped, failed, or not in this run)."""


def find(rows: Rows, scenario: str, contender: str, key: str) -> Any:
    for row in rows:
        if row["scenario"] == scenario and row["contender"] == contender:
            value = row.get(key)
            if value is None or row.get("skipped") or row.get("failed"):
                break
            return value
    raise Missing(f"{contender} / {scenario} not measured")


def _ratio(rows: Rows, scenario: str, a: str, b: str, goal: float, key: str = "per_s",
           other_scenario: str | None = None) -> tuple[str, bool]:
    ratio = find(rows, scenario, a, key) / find(rows, other_scenario or scenario, b, key)
    verdict = f"{ratio:.2f}x" + ("" if ratio >= goal else f", missed by {1 - ratio / goal:.1%}")
    return verdict, ratio >= goal


def _p99_below_peers(rows: Rows) -> tuple[str, bool]:
    ours = find(rows, "e2e noop wait", "wsgi_async memory", "p99_ms")
    peers = {}
    for peer in PEERS:
        try:
            peers[peer] = find(rows, "e2e noop poll", peer, "p99_ms")
        except Missing:
            continue
    if not peers:
        raise Missing("no peer measured")
    worst = min(peers, key=lambda p: peers[p])
    text = f"{ours:.1f} ms vs best peer {worst} {peers[worst]:.1f} ms"
    return text, all(ours < value for value in peers.values())


def _delivery(rows: Rows) -> tuple[str, bool]:
    delay = find(rows, "e2e sleep wait", "wsgi_async memory", "delivery_p50_ms")
    polls = find(rows, "e2e sleep wait", "wsgi_async memory", "polls_per_task")
    return f"median {delay:.2f} ms after completion, {polls:.2f} polls/task", (
        delay <= 5.0 and polls <= 1.0)


def _total_cpu(rows: Rows, contender: str, scenario: str) -> float:
    cpu = find(rows, scenario, contender, "cpu_ms_per_task")
    redis = 0.0
    for row in rows:
        if row["scenario"] == scenario and row["contender"] == contender:
            redis = row.get("redis_cpu_ms_per_task") or 0.0
    return float(cpu) + float(redis)


def _cpu(rows: Rows, contender: str) -> tuple[str, bool]:
    ours = _total_cpu(rows, contender, "e2e noop wait")
    celery = _total_cpu(rows, "celery", "e2e noop poll")
    return f"{ours:.2f} vs {celery:.2f} ms/task ({ours / celery:.2f}x)", ours <= celery / 2


def _memory(rows: Rows) -> tuple[str, bool]:
    """Under 2 KB a task; after expiry the live heap is back, and RSS does not grow again."""
    def get(key: str) -> Any:
        return find(rows, "memory", "wsgi_async memory", key)

    per_task = get("rss_bytes_per_task")
    base, stored, after = get("blocks_base"), get("blocks_stored"), get("blocks_after_expiry")
    back = after - base <= 0.05 * (stored - base)
    grown = get("rss_stored_mib") - get("rss_base_mib")
    regrown = get("rss_refill_mib") - get("rss_after_expiry_mib")
    reused = regrown <= max(1.0, 0.1 * grown)
    return (f"{per_task} B/task RSS; heap blocks {base:,} -> {stored:,} -> {after:,} after "
            f"expiry; RSS kept its {grown:.1f} MiB and a second fill added {regrown:+.1f} MiB"
            ), per_task < 2048 and back and reused


def _overload(rows: Rows) -> tuple[str, bool]:
    seen = [r for r in rows if r["scenario"] == "overload" and r["contender"].startswith(
        "wsgi_async") and not r.get("skipped") and not r.get("failed")]
    if not seen:
        raise Missing("no wsgi_async overload row")
    within = all(r["threads_peak"] <= r["thread_bound"] for r in seen)
    peaks = ", ".join(f"{r['contender'].removeprefix('wsgi_async ')} "
                      f"{r['threads_peak']}/{r['thread_bound']}" for r in seen)
    lost = sum(r["lost"] + r["failed"] for r in seen)
    retry = all(r["retry_after"] is not False for r in seen)
    return (f"peak/bound threads: {peaks}; {lost} accepted lost or failed; "
            f"every 503 with Retry-After: {retry}"), within and lost == 0 and retry


def _scale(rows: Rows) -> tuple[str, bool]:
    worst: dict[str, float] = {}
    for row in rows:
        if row["scenario"] == "scale" and not row.get("skipped"):
            worst[row["contender"]] = row["vs_first_level"]  # rows come in level order
    if not worst:
        raise Missing("scale not measured")
    text = ", ".join(f"{name.removeprefix('wsgi_async ')} {ratio:.2f}x"
                     for name, ratio in worst.items())
    return text, all(ratio < 1.2 for ratio in worst.values())


def _get_beside_cpu(rows: Rows, registry: str) -> tuple[str, bool]:
    """GET p99 while cpu tasks run: workers at most half of the pool's threads."""
    workers = find(rows, "cpu", f"wsgi_async {registry} workers", "get_p99_ms")
    threads = find(rows, "cpu", f"wsgi_async {registry}", "get_p99_ms")
    ratio = workers / threads
    return (f"{workers:.1f} vs {threads:.1f} ms ({ratio:.2f}x)"
            + ("" if ratio <= 0.5 else f", missed by {ratio / 0.5 - 1:.1%}")), ratio <= 0.5


def _e2e(rows: Rows, contender: str, peer: str, goal: float) -> tuple[str, bool]:
    """The long-poll ratio decides; the one-round-trip mode is shown beside it."""
    text, met = _ratio(rows, "e2e noop wait", contender, peer, goal,
                       other_scenario="e2e noop poll")
    try:
        one, _ = _ratio(rows, "e2e noop wait-on-submit", contender, peer, goal,
                        other_scenario="e2e noop poll")
    except Missing:
        return f"{text} (long-poll)", met
    return f"{text} (long-poll); {one} when the submit itself waits", met


TARGETS: tuple[tuple[str, Callable[[Rows], tuple[str, bool]]], ...] = (
    ("pass-through >= 0.97 x bare req/s",
     lambda r: _ratio(r, "passthrough", "passthrough", "bare", 0.97)),
    ("submit, memory >= 0.8 x bare",
     lambda r: _ratio(r, "submit", "wsgi_async memory", "bare", 0.8)),
    ("submit, redis >= 0.5 x bare",
     lambda r: _ratio(r, "submit", "wsgi_async redis", "bare", 0.5)),
    ("end to end noop, memory >= 2 x recipe",
     lambda r: _e2e(r, "wsgi_async memory", "recipe", 2.0)),
    ("end to end noop, memory >= 3 x Celery",
     lambda r: _e2e(r, "wsgi_async memory", "celery", 3.0)),
    ("end to end noop, redis >= 1.5 x Celery",
     lambda r: _e2e(r, "wsgi_async redis", "celery", 1.5)),
    ("end to end noop, memory p99 below every peer's", _p99_below_peers),
    ("Prefer: wait returns within 5 ms of completion (median), no sleep-polling", _delivery),
    ("CPU per task (processes + Redis), memory <= Celery / 2",
     lambda r: _cpu(r, "wsgi_async memory")),
    ("CPU per task (processes + Redis), redis <= Celery / 2",
     lambda r: _cpu(r, "wsgi_async redis")),
    ("end to end noop, redis workers >= 1.5 x Celery",
     lambda r: _e2e(r, "wsgi_async redis workers", "celery", 1.5)),
    ("end to end noop, sqlite workers >= 1.5 x Celery",
     lambda r: _e2e(r, "wsgi_async sqlite workers", "celery", 1.5)),
    ("CPU per task (processes + Redis), redis workers <= Celery / 2",
     lambda r: _cpu(r, "wsgi_async redis workers")),
    ("CPU per task (processes), sqlite workers <= Celery / 2",
     lambda r: _cpu(r, "wsgi_async sqlite workers")),
    ("GET p99 beside cpu tasks, redis: workers <= 0.5 x the pool's threads",
     lambda r: _get_beside_cpu(r, "redis")),
    ("GET p99 beside cpu tasks, sqlite: workers <= 0.5 x the pool's threads",
     lambda r: _get_beside_cpu(r, "sqlite")),
    ("memory per stored small result < 2 KB, back to baseline after expiry", _memory),
    ("overload: threads never past the bound, no accepted task lost", _overload),
    ("scale: 100,000 stored tasks < 1.2 x the time per op at 1,000", _scale),
)


def evaluate(rows: Rows) -> list[Outcome]:
    outcomes = []
    for text, check in TARGETS:
        try:
            measured, met = check(rows)
        except Missing as exc:
            outcomes.append(Outcome(text, f"not measured: {exc}", None))
            continue
        except ZeroDivisionError:
            outcomes.append(Outcome(text, "not measured: a zero rate", None))
            continue
        outcomes.append(Outcome(text, measured, met))
    return outcomes
