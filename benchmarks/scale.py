"""Scale scenario: does the time per registry operation stay flat as stored tasks pile up?

For each backend (memory, SQLite, Redis) the registry is filled to each level of stored
tasks, then ``ops`` task cycles are timed there.  A cycle is what the middleware does for
one task: ``create`` (queued, held by a worker), ``start``, ``finish`` (DONE, a small JSON
response), ``get`` (checked: DONE with the right body) and one ``get`` of an unknown id.
Every wrong answer raises :class:`ScaleError`: a fast but wrong backend is not a result.

Stored tasks accumulate: the filled tasks and the cycles' own tasks all stay stored (their
``result_ttl`` outlives the run), so while a level is timed the count grows from the level
to the level plus ``ops``; ``stored`` is the count when timing starts.  Filling runs the
same ``create``/``start``/``finish`` calls in a tight loop and is timed too (``fill_per_s``);
for Redis, where each call is a round trip, the same calls' scripts are pipelined (see
:func:`pipelined_fill`), so its fill rate is not the API's round-trip rate: a cycle's is.
Each level is timed as the best of 9 repeats of ``ops // 9`` cycles (the least disturbed
repeat; the garbage collector stays on but is run before each repeat).  Task ids are
generated before the timer starts, so the figures are the registry's cost alone, and the
first level's fill starts with ``ops // REPEATS`` untimed cycles (at most half the level), a
warm-up that stays stored.

    python -m benchmarks.scale --levels 1000,10000 --ops 3000
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from wsgi_async.registry import MemoryRegistry, Registry, StoredResponse, TaskRecord, TaskStatus

if TYPE_CHECKING:
    from wsgi_async.registry.redis import RedisRegistry

SCENARIO = "scale"
REPEATS = 9
WORKER = "bench-scale-worker"
ROUTE = "/bench/scale"
RESULT_TTL = 24 * 3600.0  # far longer than any run: nothing expires while we measure
BODY = b'{"ok": true}'
RESPONSE = StoredResponse("200 OK", (("Content-Type", "application/json"),), BODY)
CONTENDERS = {
    "memory": "wsgi_async memory",
    "sqlite": "wsgi_async sqlite",
    "redis": "wsgi_async redis",
}
DEFAULT_LEVELS = (1_000, 10_000, 100_000)
DEFAULT_OPS = 3_000
DEFAULT_REDIS_URL = os.environ.get("WSGI_ASYNC_BENCH_REDIS", "redis://127.0.0.1:6379/14")
DELETE_BATCH = 500  # keys per DEL when cleaning up Redis
PIPELINE_TASKS = 500  # tasks per pipeline when filling Redis


class ScaleError(RuntimeError):
    """A registry gave a wrong answer during the scale scenario."""


class Skipped(Exception):
    """A backend cannot run here (missing package, unreachable server); the message says why."""


def new_id() -> str:
    """A task id as the middleware makes them."""
    return secrets.token_urlsafe(24)


def settle(registry: Registry, task_id: str) -> None:
    """Create, start and finish one task the way the middleware does, checking each answer."""
    record = TaskRecord(id=task_id, route=ROUTE, worker=WORKER, result_ttl=RESULT_TTL)
    created = registry.create(record)
    if created.id != task_id or created.status is not TaskStatus.QUEUED:
        raise ScaleError(f"create({task_id!r}) answered {created!r}, expected it queued")
    started = registry.start(task_id, WORKER)
    if started is None or started.status is not TaskStatus.RUNNING:
        raise ScaleError(f"start({task_id!r}) answered {started!r}, expected a running task")
    if not registry.finish(task_id, WORKER, TaskStatus.DONE, RESPONSE):
        raise ScaleError(f"finish({task_id!r}) refused a running task held by its worker")


def cycle(registry: Registry, task_id: str, unknown_id: str) -> None:
    """One full task cycle: settle it, read it back (checked), then miss an unknown id."""
    settle(registry, task_id)
    check_done(registry, task_id)
    missing = registry.get(unknown_id)
    if missing is not None:
        raise ScaleError(f"get of an unknown id answered {missing!r}, expected None")


def fill(registry: Registry, ids: Sequence[str]) -> float:
    """Store a finished task under each of ``ids`` through the registry API; seconds taken."""
    started = time.perf_counter()
    for task_id in ids:
        settle(registry, task_id)
    return time.perf_counter() - started


def check_done(registry: Registry, task_id: str) -> None:
    """Raise unless ``task_id`` reads back DONE with the benchmark's body."""
    record = registry.get(task_id)
    if (
        record is None
        or record.status is not TaskStatus.DONE
        or record.response != RESPONSE
    ):
        raise ScaleError(f"get({task_id!r}) answered {record!r}, expected DONE, {RESPONSE!r}")


def time_cycles(registry: Registry, ops: int) -> tuple[int, float]:
    """Time ``ops`` cycles as the best of REPEATS repeats; (cycles run, best us per cycle)."""
    per_repeat = max(1, ops // REPEATS)
    best = math.inf
    for _ in range(REPEATS):
        ids = [(new_id(), new_id()) for _ in range(per_repeat)]
        gc.collect()
        started = time.perf_counter()
        for task_id, unknown_id in ids:
            cycle(registry, task_id, unknown_id)
        best = min(best, (time.perf_counter() - started) / per_repeat)
    return per_repeat * REPEATS, best * 1e6


def measure(
    contender: str,
    registry: Registry,
    levels: Sequence[int],
    ops: int,
    count: Callable[[], int],
    filler: Callable[[Sequence[str]], float] | None = None,
) -> list[dict[str, Any]]:
    """Fill ``registry`` to each level in turn and time cycles there; one row per level.

    ``count`` reads how many tasks the backend stores, to check that fills and cycles
    stored exactly what they should; a sample of the filled tasks is read back too.
    ``filler`` stores finished tasks under the ids it is given (default: :func:`fill`).
    """
    if filler is None:
        filler = functools.partial(fill, registry)
    rows: list[dict[str, Any]] = []
    stored = 0
    for level in levels:
        if not rows:  # warm up (connections, scripts, caches) with untimed stored cycles
            for _ in range(max(1, min(ops // REPEATS, level // 2))):
                cycle(registry, new_id(), new_id())
                stored += 1
        missing = max(0, level - stored)
        ids = [new_id() for _ in range(missing)]
        seconds = filler(ids)
        for task_id in ids[:: max(1, missing // 10)] + ids[-1:]:
            check_done(registry, task_id)
        stored += missing
        if count() != stored:
            raise ScaleError(f"{contender} stores {count()} tasks after filling, not {stored}")
        timed, us_per_op = time_cycles(registry, ops)
        rows.append({
            "scenario": SCENARIO,
            "contender": contender,
            "stored": stored,
            "ops": timed,
            "us_per_op": us_per_op,
            "vs_first_level": us_per_op / rows[0]["us_per_op"] if rows else 1.0,
            "fill_per_s": missing / seconds if missing and seconds > 0 else math.nan,
        })
        stored += timed
        if count() != stored:
            raise ScaleError(f"{contender} stores {count()} tasks after timing, not {stored}")
    return rows


def capacity(levels: Sequence[int], ops: int) -> int:
    """A max_tasks no run can reach: the largest level plus every timed cycle's task."""
    return max(levels) + (len(levels) + 1) * (ops + REPEATS) + 1_000


def run_memory(levels: Sequence[int], ops: int) -> list[dict[str, Any]]:
    """The scenario on a fresh :class:`MemoryRegistry`."""
    registry = MemoryRegistry(max_tasks=capacity(levels, ops))
    try:
        return measure(CONTENDERS["memory"], registry, levels, ops, registry.__len__)
    finally:
        registry.close()


def run_sqlite(levels: Sequence[int], ops: int, workdir: Path) -> list[dict[str, Any]]:
    """The scenario on a fresh SQLite file under ``workdir``, removed afterwards."""
    from wsgi_async.registry.sqlite import SQLiteRegistry

    path = workdir / f"scale-{secrets.token_hex(4)}.db"
    registry = SQLiteRegistry(path, max_tasks=capacity(levels, ops))
    try:
        return measure(CONTENDERS["sqlite"], registry, levels, ops, registry.__len__)
    finally:
        registry.close()
        for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the wake-up directory, if anything made it
            os.rmdir(registry.notify_directory)


def run_redis(
    levels: Sequence[int], ops: int, redis_url: str | None, prefix: str
) -> list[dict[str, Any]]:
    """The scenario in Redis under a fresh sub-prefix of ``prefix``, every key deleted after.

    The sub-prefix (``<prefix>scale-<hex>:``) holds only this run's keys, so the clean-up
    cannot touch keys that other scenarios keep under the same ``prefix``.
    """
    if redis_url is None:
        raise Skipped("no Redis URL given")
    try:
        import redis

        from wsgi_async.registry.redis import RedisRegistry
    except ImportError as exc:
        raise Skipped(f"redis-py is not installed ({exc})") from None
    ours = f"{prefix}scale-{secrets.token_hex(4)}:"
    registry = RedisRegistry.from_url(redis_url, max_tasks=capacity(levels, ops), prefix=ours)
    measured = False
    try:
        try:
            registry.client.ping()
        except redis.RedisError as exc:
            raise Skipped(f"Redis is unreachable at {redact(redis_url)}: {exc}") from None
        client = registry.client

        def count() -> int:
            return int(client.zcard(ours + "tasks"))

        rows = measure(
            CONTENDERS["redis"], registry, levels, ops, count,
            functools.partial(pipelined_fill, registry),
        )
        measured = True
        return rows
    finally:
        try:
            delete_keys(registry.client, ours)
        except redis.RedisError:
            # After a failed or skipped run (Redis likely gone) the first error is the
            # one to see; after a good run, keys left behind are an error of their own.
            if measured:
                raise
        finally:
            registry.close()


class ScriptTap:
    """Stands in for one of a RedisRegistry's Lua scripts: records each call, gives ``reply``."""

    def __init__(self, name: str, reply: Any, calls: list[tuple[str, Any, Any]]) -> None:
        self.name = name
        self.reply = reply
        self.calls = calls

    def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        self.calls.append((self.name, keys, args))
        return self.reply


def pipelined_fill(registry: RedisRegistry, ids: Sequence[str]) -> float:
    """Store finished tasks in Redis through the API, its scripts pipelined; seconds taken.

    Through the API each of ``create``, ``start`` and ``finish`` is a round trip (about
    1 ms a task here), so a 100,000-task fill takes minutes.  Here the same API calls run,
    but the registry's scripts are swapped for taps that record each call's keys and
    arguments; the recorded calls then run, in order, on the real scripts in one pipeline
    per ``PIPELINE_TASKS`` tasks, and every reply is checked as the API would check it.
    The stored state is the API's; only the round trips are batched.
    """
    from wsgi_async.registry.redis_scripts import decode, encode, pairs

    names = ("_create", "_start", "_finish")
    scripts = {name: getattr(registry, name) for name in names}
    running = TaskRecord(id="tap", route=ROUTE, status=TaskStatus.RUNNING, worker=WORKER,
                         attempts=1, result_ttl=RESULT_TTL)
    start_reply = [
        part if isinstance(part, bytes) else part.encode()
        for field in encode(running, None).items()
        for part in field
    ]
    replies: dict[str, Any] = {"_create": [b"created"], "_start": start_reply, "_finish": 1}
    started = time.perf_counter()
    for first in range(0, len(ids), PIPELINE_TASKS):
        calls: list[tuple[str, Any, Any]] = []
        for name in names:
            setattr(registry, name, ScriptTap(name, replies[name], calls))
        try:
            for task_id in ids[first : first + PIPELINE_TASKS]:
                settle(registry, task_id)
        finally:
            for name, script in scripts.items():
                setattr(registry, name, script)
        with registry.client.pipeline(transaction=False) as pipe:
            for name, keys, args in calls:
                scripts[name](keys=keys, args=args, client=pipe)
            answers = pipe.execute()
        for (name, keys, _), answer in zip(calls, answers, strict=True):
            if name == "_create":
                ok = isinstance(answer, list) and answer[0] not in (b"full", b"existing")
            elif name == "_start":
                ok = answer is not None and decode(pairs(answer)).status is TaskStatus.RUNNING
            else:
                ok = bool(answer)
            if not ok:
                raise ScaleError(f"pipelined {name[1:]} of {keys!r} answered {answer!r}")
    return time.perf_counter() - started


def delete_keys(client: Any, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN + DEL in batches, never FLUSHDB); how many."""
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= DELETE_BATCH:
            deleted += int(client.delete(*batch))
            batch = []
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


def run_scale(
    levels: Sequence[int], ops: int, *, redis_url: str | None, prefix: str, workdir: Path
) -> list[dict[str, Any]]:
    """Run the scale scenario on every backend; one row per (backend, level) or per skip.

    A backend that cannot run here gives one ``{"skipped": reason}`` row; one that answers
    wrongly raises :class:`ScaleError`.
    """
    levels = sorted(set(levels))
    if not levels or levels[0] < 1:
        raise ValueError(f"levels must be positive task counts, got {levels!r}")
    if ops < REPEATS:
        raise ValueError(f"ops must be at least {REPEATS}, got {ops!r}")
    backends: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("memory", lambda: run_memory(levels, ops)),
        ("sqlite", lambda: run_sqlite(levels, ops, workdir)),
        ("redis", lambda: run_redis(levels, ops, redis_url, prefix)),
    ]
    rows: list[dict[str, Any]] = []
    for name, run in backends:
        try:
            rows += run()
        except Skipped as skip:
            rows.append({"scenario": SCENARIO, "contender": CONTENDERS[name], "skipped": str(skip)})
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a small plain-text table."""
    headers = ["contender", "stored", "cycles", "us/cycle", "vs first", "fill tasks/s"]
    body: list[list[str]] = []
    for row in rows:
        if "skipped" in row:
            body.append([row["contender"], f"skipped: {row['skipped']}"])
            continue
        fill_rate = row["fill_per_s"]
        body.append([
            row["contender"],
            f"{row['stored']:,}",
            f"{row['ops']:,}",
            f"{row['us_per_op']:,.1f}",
            f"{row['vs_first_level']:.2f}",
            "-" if math.isnan(fill_rate) else f"{fill_rate:,.0f}",
        ])
    widths = [len(h) for h in headers]
    for cells in body:
        if len(cells) == len(headers):
            widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]

    def line(cells: Sequence[str]) -> str:
        if len(cells) < len(headers):  # a skipped backend: its reason runs across
            return "  ".join([cells[0].ljust(widths[0]), *cells[1:]])
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)])


def redact(url: str) -> str:
    """``url`` without its user name and password, fit for a report."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def parse_levels(text: str) -> list[int]:
    """``"1000,10000"`` (underscores allowed) as a list of positive ints, for argparse."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be positive, got {text!r}")
    return levels


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenario standalone and print its table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=parse_levels, default=list(DEFAULT_LEVELS),
                        help="stored-task levels, comma-separated (default: %(default)s)")
    parser.add_argument("--ops", type=int, default=DEFAULT_OPS,
                        help="cycles timed per level, in 3 repeats (default: %(default)s)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                        help="Redis to use, '' to skip Redis (default: %(default)s)")
    args = parser.parse_args(argv)
    prefix = f"wsgi-async-bench:{secrets.token_hex(6)}:"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wsgi-async-scale-") as workdir:
        rows = run_scale(args.levels, args.ops, redis_url=args.redis_url or None,
                         prefix=prefix, workdir=Path(workdir))
    print(f"scale: us per task cycle (create, start, finish, get, get unknown) by stored "
          f"tasks; best of {REPEATS} repeats of ops/{REPEATS}")
    print(format_rows(rows))
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
