"""The scenarios: each drives one running contender and returns what it measured.

Latencies are in seconds inside :class:`~benchmarks.load.Samples`; the
summaries (rows of the report) are in milliseconds and per-second rates.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import services
from .contenders import THREADS, Contender, Deployment, Settings
from .load import Connection, Samples, burst, percentile, run_load
from .procs import BenchError, status

POLL_INTERVAL = 0.005  # how often a client that cannot long-poll polls
WAIT = (("Prefer", "wait=10"),)
RESPOND_ASYNC_WAIT = (("Prefer", "respond-async, wait=10"),)
MAX_POLLS = 10_000  # with POLL_INTERVAL: about 50 s, past any task here
OVERLOAD_SLEEP = 1.0  # seconds: long enough that the whole burst is in flight at once


@dataclass(frozen=True, slots=True)
class Profile:
    """How much each scenario does; ``--quick`` and the full run differ only here."""

    name: str
    tasks: int  # submit and end-to-end noop tasks per contender and pass
    sleep_tasks: int  # end-to-end sleep tasks per contender and pass
    clients: int
    budget: float  # seconds: no job of a load run starts after it
    passes: int  # contenders run in this many passes of alternating order
    passthrough_requests: int  # per round and contender
    passthrough_rounds: int
    memory_tasks: int
    memory_ttl: float
    scale_levels: tuple[int, ...]
    scale_ops: int
    warmup: int = 100
    overload_workers: int = 8
    overload_queued: int = 32
    overload_factor: int = 5


PROFILES = {
    "full": Profile("full", 2000, 400, 16, 25.0, 2, 5000, 6, 10_000, 15.0,
                    (1_000, 10_000, 100_000), 3000),
    "quick": Profile("quick", 300, 64, 8, 5.0, 1, 1000, 2, 1000, 3.0, (1_000, 10_000), 600,
                     warmup=30),
    "smoke": Profile("smoke", 60, 16, 4, 3.0, 1, 200, 2, 200, 2.0, (200, 1_000), 200,
                     warmup=10),
}


def _check(response_body: bytes, n: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response_body)
    if data.get("n") != n:
        raise BenchError(f"task {n} got the result of another: {response_body[:100]!r}")
    return data


async def poll_until_done(conn: Connection, location: str, wait: bool) -> tuple[Any, int]:
    """Poll ``location`` (long-polling when ``wait``) until 200; return it and the polls."""
    for polls in range(1, MAX_POLLS + 1):
        if not wait:
            await asyncio.sleep(POLL_INTERVAL)
        response = await conn.request("GET", location, WAIT if wait else ())
        if response.status == 200:
            return response, polls
        if response.status != 202:
            raise BenchError(f"poll answered {response.status}: {response.body[:200]!r}")
    raise BenchError(f"not done after {MAX_POLLS} polls")


def submit_job(contender: Contender, endpoint: str, accepted: list[tuple[int, str]]) -> Any:
    expected = 202 if contender.asynchronous else 200

    async def job(conn: Connection, i: int, samples: Samples) -> None:
        began = time.perf_counter()
        response = await conn.request("POST", f"/{endpoint}?n={i}")
        samples.latencies.append(time.perf_counter() - began)
        if response.status != expected:
            raise BenchError(f"submit answered {response.status}: {response.body[:200]!r}")
        if contender.asynchronous:
            accepted.append((i, response.headers["location"]))

    return job


def end_to_end_job(contender: Contender, endpoint: str, wait: bool,
                   on_submit: bool = False) -> Any:
    """Submit, then poll or long-poll until done; ``on_submit``: ask the submit to wait."""
    submit_headers = RESPOND_ASYNC_WAIT if on_submit else ()

    async def job(conn: Connection, i: int, samples: Samples) -> None:
        began = time.perf_counter()
        response = await conn.request("POST", f"/{endpoint}?n={i}", submit_headers)
        samples.add("submit", time.perf_counter() - began)
        polls = 0
        if contender.asynchronous and not (on_submit and response.status == 200):
            if response.status != 202:
                raise BenchError(f"submit answered {response.status}: {response.body[:200]!r}")
            response, polls = await poll_until_done(conn, response.headers["location"], wait)
        elif response.status != 200:
            raise BenchError(f"request answered {response.status}: {response.body[:200]!r}")
        samples.latencies.append(time.perf_counter() - began)
        data = _check(response.body, i)
        samples.add("polls", polls)
        if "done_at" in data:
            samples.add("delivery", response.received - float(data["done_at"]))

    return job


def drain(deployment: Deployment, accepted: list[tuple[int, str]], budget: float) -> int:
    """Poll every accepted task until it is done; return how many never were (lost)."""
    if not accepted:
        return 0
    wait = deployment.contender.can_wait

    async def job(conn: Connection, i: int, samples: Samples) -> None:
        n, location = accepted[i]
        response, _ = await poll_until_done(conn, location, wait)
        _check(response.body, n)

    samples = run_load(deployment.port, 16, len(accepted), budget, job)
    return len(accepted) - samples.done


class Meter:
    """CPU of a deployment's processes, and of Redis, across a load run."""

    def __init__(self, deployment: Deployment, redis: Any) -> None:
        self.deployment = deployment
        self.redis = redis if deployment.contender.needs_redis else None
        self.cpu = deployment.cpu()
        self.redis_cpu = services.cpu_seconds(self.redis) if self.redis is not None else 0.0

    def read(self) -> tuple[float, float]:
        cpu = self.deployment.cpu() - self.cpu
        redis_cpu = (services.cpu_seconds(self.redis) - self.redis_cpu
                     if self.redis is not None else 0.0)
        return cpu, redis_cpu


def measure(
    deployment: Deployment, profile: Profile, redis: Any, scenario: str
) -> dict[str, Any]:
    """Run one load scenario on a deployment: the raw samples, CPU and what was lost."""
    contender = deployment.contender
    accepted: list[tuple[int, str]] = []
    if scenario == "submit":
        job = submit_job(contender, "noop", accepted)
        jobs = profile.tasks
    else:
        _, endpoint, mode = scenario.split()
        job = end_to_end_job(contender, endpoint, wait=mode != "poll",
                             on_submit=mode == "wait-on-submit")
        jobs = profile.tasks if endpoint == "noop" else profile.sleep_tasks
    meter = Meter(deployment, redis)
    samples = run_load(deployment.port, profile.clients, jobs, profile.budget, job)
    cpu, redis_cpu = meter.read()
    lost = drain(deployment, accepted, profile.budget + 30)
    return {"samples": samples, "cpu": cpu, "redis_cpu": redis_cpu, "lost": lost}


def warm_up(deployment: Deployment, profile: Profile) -> None:
    """Start every lazy part (server threads, pool threads, connections) before measuring."""
    contender = deployment.contender
    job = end_to_end_job(contender, "noop", wait=contender.can_wait)
    samples = run_load(deployment.port, profile.clients, profile.warmup, 30.0, job)
    if samples.errors:
        raise BenchError(f"warm-up failed: {samples.first_error}")


def scenarios_of(contender: Contender) -> list[str]:
    if not contender.asynchronous:
        return ["submit", "e2e noop sync", "e2e sleep sync"]
    modes = ["poll", "wait", "wait-on-submit"] if contender.can_wait else ["poll"]
    return ["submit"] + [f"e2e {ep} {mode}" for ep in ("noop", "sleep") for mode in modes]


def summarise(scenario: str, contender: Contender, raw: dict[str, Any]) -> dict[str, Any]:
    samples: Samples = raw["samples"]
    ms = [v * 1000 for v in samples.latencies]
    row: dict[str, Any] = {
        "scenario": scenario, "contender": contender.name, "how": contender.how,
        "done": samples.done, "errors": samples.errors, "seconds": round(samples.elapsed, 3),
        "per_s": round(samples.rate, 1),
        "p50_ms": round(percentile(ms, 0.5), 2), "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2) if ms else None,
        "cpu_ms_per_task": round(raw["cpu"] * 1000 / samples.done, 3) if samples.done else None,
        "redis_cpu_ms_per_task": (round(raw["redis_cpu"] * 1000 / samples.done, 3)
                                  if samples.done and contender.needs_redis else None),
        "lost": raw["lost"],
    }
    if samples.first_error:
        row["first_error"] = samples.first_error
    if "polls" in samples.extra:
        polls = samples.extra["polls"]
        row["polls_per_task"] = round(sum(polls) / len(polls), 2)
    if samples.extra.get("submit"):
        row["submit_p50_ms"] = round(percentile(samples.extra["submit"], 0.5) * 1000, 2)
    if "delivery" in samples.extra:
        row["delivery_p50_ms"] = round(percentile(samples.extra["delivery"], 0.5) * 1000, 2)
    return row


def merge(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender's passes as if they were one run."""
    samples = Samples()
    for raw in raws:
        samples.merge(raw["samples"])
    return {"samples": samples, **{key: sum(raw[key] for raw in raws)
                                   for key in ("cpu", "redis_cpu", "lost")}}


# -- pass-through --------------------------------------------------------------------


def passthrough(settings: Settings, profile: Profile, bare: Contender,
                wrapped: Contender) -> list[dict[str, Any]]:
    """``GET /noop`` on the bare app and on the wrapped one, in alternating rounds."""
    async def job(conn: Connection, i: int, samples: Samples) -> None:
        began = time.perf_counter()
        response = await conn.request("GET", f"/noop?n={i}")
        samples.latencies.append(time.perf_counter() - began)
        if response.status != 200:
            raise BenchError(f"GET /noop answered {response.status}")
        _check(response.body, i)

    deployments = [Deployment(settings, bare), Deployment(settings, wrapped)]
    totals: dict[str, dict[str, Any]] = {
        d.contender.name: {"samples": Samples(), "cpu": 0.0} for d in deployments}
    try:
        for deployment in deployments:
            run_load(deployment.port, profile.clients, profile.warmup * 5, 30.0, job)
        for round_ in range(profile.passthrough_rounds):
            for deployment in deployments[:: 1 if round_ % 2 == 0 else -1]:
                before = deployment.cpu()
                samples = run_load(deployment.port, profile.clients,
                                   profile.passthrough_requests, profile.budget, job)
                total = totals[deployment.contender.name]
                total["samples"].merge(samples)
                total["cpu"] += deployment.cpu() - before
    finally:
        for deployment in deployments:
            deployment.stop()
    rows = []
    for deployment in deployments:
        total = totals[deployment.contender.name]
        samples = total["samples"]
        ms = [v * 1000 for v in samples.latencies]
        rows.append({
            "scenario": "passthrough", "contender": deployment.contender.name,
            "how": deployment.contender.how, "done": samples.done, "errors": samples.errors,
            "per_s": round(samples.rate, 1), "p50_ms": round(percentile(ms, 0.5), 3),
            "p99_ms": round(percentile(ms, 0.99), 3),
            "cpu_us_per_request": (round(total["cpu"] * 1e6 / samples.done, 1)
                                   if samples.done else None),
        })
    return rows


# -- overload ------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Reads the serving processes' threads and resident memory every 2 ms."""

    def __init__(self, read: Callable[[], tuple[int, int]]) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.peak_threads = 0
        self.peak_rss_kib = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.002):
            threads, rss = self.read()
            self.peak_threads = max(self.peak_threads, threads)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


def thread_bound(contender: Contender, profile: Profile) -> int | None:
    """The most threads wsgi_async's serving processes may have, by configuration.

    Per gunicorn worker: its main thread and its request threads, ``max_workers``
    pool threads, the supervisor, and one registry listener (SQLite wake-ups or
    Redis pub/sub).  The other contenders have no such bound.
    """
    if contender.kind != "wsgi_async":
        return None
    return contender.workers * (1 + THREADS + profile.overload_workers + 2)


def overload(settings: Settings, profile: Profile, contender: Contender) -> dict[str, Any]:
    """A burst of ``factor x (max_workers + max_queued)`` sleep tasks, all at once."""
    bound = profile.overload_workers + profile.overload_queued
    size = profile.overload_factor * bound
    deployment = Deployment(settings, contender,
                            BENCH_MAX_WORKERS=str(profile.overload_workers),
                            BENCH_MAX_QUEUED=str(profile.overload_queued))
    try:
        # Full strength first: every server thread and every pool thread started.
        job = end_to_end_job(contender, "sleep", wait=contender.can_wait)
        run_load(deployment.port, 2 * profile.overload_workers, 4 * profile.overload_workers,
                 30.0, job)
        workers = deployment.server_workers

        def read() -> tuple[int, int]:
            states = [status(pid) for pid in workers]
            return sum(s.threads for s in states), sum(s.rss_kib for s in states)

        before_threads, before_rss = read()
        sampler = Sampler(read)
        sampler.start()
        try:
            requests = [("POST", f"/sleep?n={i}&seconds={OVERLOAD_SLEEP}", ())
                        for i in range(size)]
            answers = asyncio.run(burst(deployment.port, requests, 120.0))
            accepted = [(i, r.headers["location"]) for i, (_, r) in enumerate(answers)
                        if r is not None and r.status == 202]
            lost = drain(deployment, accepted, 120.0)
        finally:
            sampler.stop()
    finally:
        deployment.stop()
    refused = [r for _, r in answers if r is not None and r.status == 503]
    failed = sum(1 for _, r in answers if r is None or r.status not in (202, 503))
    ok_ms = [t * 1000 for t, r in answers if r is not None and r.status == 202]
    return {
        "scenario": "overload", "contender": contender.name, "how": contender.how,
        "burst": size, "capacity": bound if contender.kind == "wsgi_async" else None,
        "thread_bound": thread_bound(contender, profile),
        "accepted": len(accepted), "refused_503": len(refused),
        "retry_after": all("retry-after" in r.headers for r in refused) if refused else None,
        "failed": failed, "lost": lost,
        "p99_accepted_ms": round(percentile(ok_ms, 0.99), 2),
        "threads_before": before_threads, "threads_peak": sampler.peak_threads,
        "threads_added": sampler.peak_threads - before_threads,
        "rss_before_mib": round(before_rss / 1024, 1),
        "rss_peak_mib": round(sampler.peak_rss_kib / 1024, 1),
    }


# -- memory --------------------------------------------------------------------------


def _store_bytes(deployment: Deployment, redis: Any) -> int | None:
    if deployment.sqlite_path is not None:
        paths = [deployment.sqlite_path.with_name(deployment.sqlite_path.name + suffix)
                 for suffix in ("", "-wal")]
        return sum(p.stat().st_size for p in paths if p.exists())
    if deployment.contender.needs_redis and redis is not None:
        return services.used_memory(redis)
    return None


def heap_blocks(deployment: Deployment) -> int:
    """Live Python memory blocks of the (single) serving process."""
    code, _, body = deployment.call("GET", "/_bench/heap")
    if code != 200:
        raise BenchError(f"/_bench/heap answered {code}")
    return int(json.loads(body)["blocks"])


def memory(settings: Settings, profile: Profile, contender: Contender,
           redis: Any) -> dict[str, Any]:
    """Resident memory per stored, finished task; and, for wsgi_async, after expiry."""
    ttl = profile.memory_ttl
    lease = 1.5  # the supervisor ticks every lease/3 and expires up to 1,000 tasks a tick
    deployment = Deployment(settings, contender, BENCH_RESULT_TTL=str(ttl),
                            BENCH_LEASE_TIME=str(lease))
    try:
        warm_up(deployment, profile)
        if contender.kind == "wsgi_async":
            time.sleep(ttl + 2 * lease)  # the warm-up's tasks expire: a clean baseline
        single = contender.workers == 1
        base_rss, base_store = deployment.rss_kib(), _store_bytes(deployment, redis)
        base_blocks = heap_blocks(deployment) if single else None
        job = end_to_end_job(contender, "noop", wait=contender.can_wait)

        def fill() -> tuple[float, int]:
            """Run the tasks; return when the last one finished, and how many ran."""
            samples = run_load(deployment.port, profile.clients, profile.memory_tasks,
                               max(60.0, profile.budget), job)
            if samples.errors or not samples.done:
                raise BenchError(f"{samples.done} of {profile.memory_tasks} tasks done: "
                                 f"{samples.first_error}")
            return time.monotonic(), samples.done

        ended, n = fill()  # a slow contender does fewer tasks within the budget
        stored_rss, stored_store = deployment.rss_kib(), _store_bytes(deployment, redis)
        stored_blocks = heap_blocks(deployment) if single else None
        expired_rss = expired_store = expired_blocks = refill_rss = None

        if contender.kind == "wsgi_async":
            batches = profile.memory_tasks // 1000 + 2  # the supervisor expires 1,000 a tick
            time.sleep(max(0.0, ended + ttl - time.monotonic()) + batches * lease / 3 + lease)
            expired_rss, expired_store = deployment.rss_kib(), _store_bytes(deployment, redis)
            expired_blocks = heap_blocks(deployment) if single else None
            if contender.registry == "memory":
                # Freed arenas are reused: a second batch must not grow the process again.
                fill()
                refill_rss = deployment.rss_kib()
    finally:
        deployment.stop()

    def per_task(after: int | None, before: int | None, scale: int) -> float | None:
        return None if after is None or before is None else round((after - before) * scale / n)

    return {
        "scenario": "memory", "contender": contender.name, "how": contender.how,
        "tasks": n, "rss_base_mib": round(base_rss / 1024, 1),
        "rss_stored_mib": round(stored_rss / 1024, 1),
        "rss_bytes_per_task": per_task(stored_rss, base_rss, 1024),
        "rss_after_expiry_mib": None if expired_rss is None else round(expired_rss / 1024, 1),
        "rss_after_expiry_vs_base_mib": (None if expired_rss is None
                                         else round((expired_rss - base_rss) / 1024, 2)),
        "blocks_base": base_blocks, "blocks_stored": stored_blocks,
        "blocks_after_expiry": expired_blocks,
        "rss_refill_mib": None if refill_rss is None else round(refill_rss / 1024, 1),
        "store": ("sqlite file" if deployment.sqlite_path is not None
                  else "redis used_memory" if contender.needs_redis else None),
        "store_bytes_per_task": per_task(stored_store, base_store, 1),
        "store_after_expiry_bytes_per_task": per_task(expired_store, base_store, 1),
        "expiry": f"{ttl:g} s" if contender.kind == "wsgi_async" else {
            "recipe": "5 min, not waited", "celery": "result_expires 600 s, not waited",
            "rq": "result_ttl 600 s, not waited"}.get(contender.kind),
    }


# -- CPU-heavy tasks beside pass-through requests --------------------------------------

GET_CLIENTS = 2
GET_PAUSE = 0.005  # between one client's GETs: a steady trickle, not a second load
# Clients running cpu tasks: each long-poll holds a server thread, and the GETs must
# find one free, so that they wait on the CPU and the GIL, not on a thread.
CPU_CLIENTS = THREADS // 2


def cpu_beside_requests(settings: Settings, profile: Profile,
                        contender: Contender) -> dict[str, Any]:
    """While clients run ``cpu`` tasks end to end, others time ``GET /noop`` on the web process.

    With the pool's threads the tasks share the web process's CPU and GIL with the
    GETs; with workers they run in another process.
    """
    deployment = Deployment(settings, contender)
    tasks_done = threading.Event()
    background: list[Samples] = []

    def run_tasks() -> None:
        try:
            background.append(run_load(deployment.port, CPU_CLIENTS, profile.sleep_tasks,
                                       profile.budget, end_to_end_job(contender, "cpu",
                                                                      contender.can_wait)))
        finally:
            tasks_done.set()

    async def get(conn: Connection, i: int, samples: Samples) -> None:
        if tasks_done.is_set():
            return
        await asyncio.sleep(GET_PAUSE)
        began = time.perf_counter()
        response = await conn.request("GET", f"/noop?n={i}")
        samples.latencies.append(time.perf_counter() - began)
        if response.status != 200:
            raise BenchError(f"GET /noop answered {response.status}")
        _check(response.body, i)

    try:
        warm_up(deployment, profile)
        thread = threading.Thread(target=run_tasks, daemon=True)
        thread.start()
        time.sleep(0.2)  # the first tasks are running
        gets = run_load(deployment.port, GET_CLIENTS, 1_000_000, profile.budget + 60, get)
        thread.join(profile.budget + 60)
    finally:
        deployment.stop()
    if not background:
        raise BenchError("the cpu tasks did not run")
    tasks = background[0]
    ms = [v * 1000 for v in gets.latencies]
    return {
        "scenario": "cpu", "contender": contender.name, "how": contender.how,
        "cpu_tasks": tasks.done, "cpu_tasks_per_s": round(tasks.rate, 1),
        "cpu_task_p50_ms": round(percentile([v * 1000 for v in tasks.latencies], 0.5), 2),
        "gets": len(ms), "get_p50_ms": round(percentile(ms, 0.5), 2),
        "get_p99_ms": round(percentile(ms, 0.99), 2),
        "errors": tasks.errors + gets.errors,
        **({"first_error": tasks.first_error or gets.first_error}
           if tasks.first_error or gets.first_error else {}),
    }
