#!/usr/bin/env python
"""wsgi_async's speed goals, measured side by side in one run.

    python benchmarks/run.py                 # full run, about 1.5 min on 2 cores
    python benchmarks/run.py --quick         # about 30 s
    python benchmarks/run.py --quick --only local --json out.json

Sections (see benchmarks/README.md for what each figure means):

(a) pass-through overhead: a trivial app bare vs wrapped by AsyncMiddleware on a
    non-matching path, in-process through WSGI and over HTTP under gunicorn.
(b) async round trip: submit + wait-until-done for short tasks over HTTP:
    wsgi_async (memory; sqlite and redis when importable) vs the thread-per-request
    Flask recipe, and vs Celery and RQ through their client APIs.
(c) bound check: a burst of slow tasks; peak thread count of the server process,
    and what wsgi_async answers past max_queued.

Every process started here is stopped by pid in a ``finally``; only 127.0.0.1 is
used; Redis keys all carry a random prefix (db 14) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib
import json
import math
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
REDIS_URL = os.environ.get("WSGI_ASYNC_BENCH_REDIS", "redis://127.0.0.1:6379/14")
PREFIX = f"wsgi-async-bench:{secrets.token_hex(6)}:"
POLL_INTERVAL = 0.005  # how often a client without "Prefer: wait" polls
SLEEPY_TASK = 0.05  # the task of (b)'s second table, long enough that clients must wait
TASK_TIMEOUT = 30.0  # a task not done by then counts as an error
MAX_WORKERS = 8


@dataclass(frozen=True)
class Profile:
    name: str
    inproc_calls: int  # calls per repeat of the plain app (the Flask app gets a tenth)
    inproc_repeats: int
    http_requests: int  # requests per round and variant
    http_rounds: int
    http_clients: int
    tasks: int  # tasks per system in (b)
    task_clients: int
    task_budget: float  # seconds per system in (b): fewer tasks are run past it
    burst: int
    burst_seconds: float  # how long each task of the burst sleeps
    burst_clients: int
    server_threads: int  # gunicorn --threads
    passes: int  # (b) runs its systems in this many passes of alternating order


PROFILES = {
    "full": Profile("full", 200_000, 5, 3000, 5, 4, 2000, 8, 30.0, 200, 2.0, 16, 32, 2),
    "quick": Profile("quick", 20_000, 3, 1000, 2, 4, 200, 8, 5.0, 200, 1.0, 16, 32, 2),
    "smoke": Profile("smoke", 2_000, 2, 100, 1, 2, 30, 4, 3.0, 40, 0.5, 8, 16, 1),
}


class BenchError(Exception):
    """A system misbehaved (wrong status, wrong result, did not start)."""


class Skipped(Exception):
    """A system cannot run here (not installed, not importable, no Redis)."""


# -- processes -------------------------------------------------------------------


class Processes:
    """Every subprocess this run starts, so that ``stop_all`` can end each by pid."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("wb")
        try:
            # A new session: a Ctrl-C reaches run.py only, which then stops each one.
            proc = subprocess.Popen(
                list(args), env={**os.environ, **env}, cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log.close()
        self._procs.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        # The session we created has the leader's pid as its group id: this ends
        # what it forked and left behind (a gunicorn worker, an RQ work-horse).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self._procs):
            self.stop(proc, grace=1.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def proc_status(pid: int) -> tuple[int, int]:
    """(threads, resident KiB) of a process, from /proc."""
    threads = rss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return threads, rss


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time of processes, with that of their reaped children."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


class Server:
    """One gunicorn (gthread, 1 worker) serving ``bench_apps:make_app()``."""

    def __init__(self, procs: Processes, name: str, env: dict[str, str], threads: int) -> None:
        self.procs = procs
        self.name = name
        self.port = free_port()
        args = [
            sys.executable, "-m", "gunicorn", "--bind", f"{HOST}:{self.port}",
            "--worker-class", "gthread", "--workers", "1", "--threads", str(threads),
            "--keep-alive", "30", "--graceful-timeout", "2", "--timeout", "120",
            "--log-level", "warning", "--pythonpath", f"{HERE},{ROOT}",
            "bench_apps:make_app()",
        ]
        self.proc = procs.start(name, args, env)
        self.worker_pid = 0
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name}: gunicorn exited with {self.proc.returncode}:\n"
                    + self.procs.log_tail(self.name)
                )
            workers = children_of(self.proc.pid)
            if workers:
                client = Client(self.port, timeout=2.0)
                try:
                    status, _, _ = client.request("GET", "/hello")
                    if status == 200:
                        self.worker_pid = workers[0]
                        return
                except OSError:
                    pass
                finally:
                    client.close()
            time.sleep(0.05)
        raise BenchError(f"{self.name}: not ready after {timeout:.0f} s:\n"
                         + self.procs.log_tail(self.name))

    def stop(self) -> None:
        self.procs.stop(self.proc)


# -- HTTP client and load loops ----------------------------------------------------


class Client:
    """One persistent HTTP/1.1 connection (http.client, keep-alive)."""

    def __init__(self, port: int, timeout: float = TASK_TIMEOUT) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None
        self.used = False

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
                self.used = False
            reused = self.used
            try:
                self.conn.request(method, path, body=b"" if method == "POST" else None,
                                  headers=headers or {})
                response = self.conn.getresponse()
                body = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # Only a kept-alive connection the server closed meanwhile is retried.
                self.close()
                if attempt == 2 or not reused:
                    raise
                continue
            self.used = True
            if response.will_close:
                self.close()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, body
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class LoadResult:
    done: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def run_clients(
    clients: int,
    jobs: int,
    budget: float,
    make_ctx: Callable[[], Any],
    job: Callable[[Any, int], Any],
    close_ctx: Callable[[Any], None] = lambda ctx: None,
) -> LoadResult:
    """Run ``job(ctx, i)`` for i in range(jobs) from ``clients`` threads.

    Bounded twice: by ``jobs``, and by ``budget`` seconds after which no new
    job starts (a job in flight ends by its own timeout).
    """
    result = LoadResult()
    lock = threading.Lock()
    counter = iter(range(jobs))
    start = time.perf_counter()
    deadline = start + budget
    outputs: list[Any] = []

    def next_job() -> int | None:
        with lock:
            if time.perf_counter() > deadline:
                return None
            return next(counter, None)

    def loop() -> None:
        try:
            ctx = make_ctx()
        except Exception as exc:
            with lock:
                result.errors += 1
                result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
            return
        try:
            while (i := next_job()) is not None:
                began = time.perf_counter()
                try:
                    out = job(ctx, i)
                except Exception as exc:
                    with lock:
                        result.errors += 1
                        result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
                    continue
                took = time.perf_counter() - began
                with lock:
                    result.done += 1
                    result.latencies.append(took)
                    outputs.append(out)
        finally:
            close_ctx(ctx)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.perf_counter()) + TASK_TIMEOUT + 5)
    result.elapsed = time.perf_counter() - start
    result.extra["outputs"] = outputs
    return result


# -- (a) pass-through overhead -------------------------------------------------------


def _call_ns(app: Any, base: dict[str, Any], calls: int) -> float:
    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return None

    began = time.perf_counter_ns()
    for _ in range(calls):
        body = app(dict(base), start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return (time.perf_counter_ns() - began) / calls


def bench_inprocess(profile: Profile) -> list[dict[str, Any]]:
    import bench_apps
    from werkzeug.test import EnvironBuilder

    base = EnvironBuilder(path="/hello", base_url=f"http://{HOST}/").get_environ()
    rows = []
    pairs = [
        ("plain WSGI app", bench_apps.hello_app, profile.inproc_calls),
        ("Flask app", bench_apps.flask_app(), max(200, profile.inproc_calls // 10)),
    ]
    for label, bare, calls in pairs:
        wrapped = bench_apps.wrap(bare)
        try:
            _call_ns(bare, base, calls // 10)  # warm up both
            _call_ns(wrapped, base, calls // 10)
            bare_ns: list[float] = []
            wrapped_ns: list[float] = []
            for _ in range(profile.inproc_repeats):  # interleaved; the best of each is kept
                bare_ns.append(_call_ns(bare, base, calls))
                wrapped_ns.append(_call_ns(wrapped, base, calls))
        finally:
            wrapped.shutdown(wait=False)
        rows.append({
            "app": label, "calls": calls * profile.inproc_repeats,
            "bare_us": min(bare_ns) / 1000, "wrapped_us": min(wrapped_ns) / 1000,
            "ratio": min(wrapped_ns) / min(bare_ns),
            "overhead_us": (min(wrapped_ns) - min(bare_ns)) / 1000,
        })
    return rows


def bench_http_passthrough(procs: Processes, profile: Profile) -> dict[str, Any]:
    server = Server(procs, "passthrough", {"BENCH_APP": "passthrough"}, profile.server_threads)
    try:
        def get(path: str) -> Callable[[Client, int], None]:
            def job(client: Client, i: int) -> None:
                status, _, body = client.request("GET", path)
                if status != 200 or body != b"hello\n":
                    raise BenchError(f"GET {path} answered {status}")
            return job

        def one_round(path: str, requests: int) -> LoadResult:
            cpu = cpu_seconds(server.worker_pid)
            res = run_clients(profile.http_clients, requests, 60.0,
                              lambda: Client(server.port), get(path), Client.close)
            res.extra["cpu"] = cpu_seconds(server.worker_pid) - cpu
            return res

        one_round("/hello", 200)
        one_round("/w/hello", 200)
        totals = {"/hello": LoadResult(extra={"cpu": 0.0}),
                  "/w/hello": LoadResult(extra={"cpu": 0.0})}
        for _ in range(profile.http_rounds):  # alternate, so drift hits both alike
            for path, total in totals.items():
                res = one_round(path, profile.http_requests)
                total.done += res.done
                total.errors += res.errors
                total.elapsed += res.elapsed
                total.latencies += res.latencies
                total.first_error = total.first_error or res.first_error
                total.extra["cpu"] += res.extra["cpu"]
    finally:
        server.stop()
    bare, wrapped = totals["/hello"], totals["/w/hello"]
    for res in (bare, wrapped):
        if res.errors:
            raise BenchError(f"pass-through over HTTP: {res.errors} errors: {res.first_error}")
    return {
        "server": f"gunicorn gthread 1 worker x {profile.server_threads} threads",
        "clients": profile.http_clients, "requests": bare.done + wrapped.done,
        "bare_rps": bare.rate, "wrapped_rps": wrapped.rate,
        "bare_p50_ms": percentile(bare.latencies, 0.5) * 1000,
        "wrapped_p50_ms": percentile(wrapped.latencies, 0.5) * 1000,
        "ratio": bare.rate / wrapped.rate if wrapped.rate else math.nan,
        "bare_cpu_us": bare.extra["cpu"] / bare.done * 1e6,
        "wrapped_cpu_us": wrapped.extra["cpu"] / wrapped.done * 1e6,
    }


# -- (b) async round trip --------------------------------------------------------------


@dataclass
class RoundTrip:
    system: str
    note: str = ""
    task_seconds: float = 0.0
    tasks: int = 0
    errors: int = 0
    rate: float = math.nan
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    gets_per_task: float = math.nan
    cpu_ms: float = math.nan  # CPU of the server/worker processes per task
    skipped: str = ""
    failed: str = ""


Measured = tuple[LoadResult, float]  # the load's outcome, and the CPU seconds it cost


@dataclass
class System:
    """One row of (b): ``run(tasks, budget)`` starts it, measures, and stops it."""

    name: str
    note: str
    run: Callable[[int, float], Measured]
    task_seconds: float = 0.0


def _round_trip(system: System, measured: list[Measured]) -> RoundTrip:
    res = LoadResult()
    cpu = 0.0
    for part, part_cpu in measured:  # the passes of one system, merged
        res.done += part.done
        res.errors += part.errors
        res.elapsed += part.elapsed
        res.latencies += part.latencies
        res.first_error = res.first_error or part.first_error
        res.extra.setdefault("outputs", []).extend(part.extra.get("outputs", []))
        cpu += part_cpu
    polls = res.extra.get("outputs", [])
    row = RoundTrip(
        system.name, system.note, system.task_seconds, res.done, res.errors, res.rate,
        percentile(res.latencies, 0.5) * 1000, percentile(res.latencies, 0.95) * 1000,
        sum(polls) / len(polls) if polls and all(isinstance(p, int) for p in polls) else math.nan,
    )
    row.cpu_ms = cpu / res.done * 1000 if res.done else math.nan
    if res.errors:
        row.failed = f"{res.errors} errors, first: {res.first_error}"
    return row


def http_task_job(prefer_wait: bool, task_seconds: float) -> Callable[[Client, int], int]:
    """Submit a task, then GET its Location until the result is there; returns the GETs.

    The task is ``POST /reports/<i>`` (no work) or, when ``task_seconds``,
    ``POST /reports/slow?seconds=<task_seconds>`` (a sleep).
    """
    from bench_tasks import expected_total

    headers = {"Prefer": "wait=10"} if prefer_wait else {}

    def check(body: bytes, i: int) -> bool:
        if task_seconds:
            return bool(json.loads(body)["slept"] == task_seconds)
        return bool(json.loads(body)["total"] == expected_total(i))

    def job(client: Client, i: int) -> int:
        path = f"/reports/slow?seconds={task_seconds}" if task_seconds else f"/reports/{i}"
        status, head, body = client.request("POST", path)
        if status != 202 or "location" not in head:
            raise BenchError(f"submit answered {status}: {body[:200]!r}")
        location = head["location"]
        gets = 0
        give_up = time.monotonic() + TASK_TIMEOUT
        while time.monotonic() < give_up:
            status, head, body = client.request("GET", location, headers)
            gets += 1
            if status == 200:
                if not check(body, i):
                    raise BenchError(f"task {i}: wrong result {body[:200]!r}")
                return gets
            if status != 202:
                raise BenchError(f"GET {location} answered {status}: {body[:200]!r}")
            if not prefer_wait:
                time.sleep(POLL_INTERVAL)
        raise BenchError(f"task {i} not done after {TASK_TIMEOUT:.0f} s")

    return job


def http_system(
    procs: Processes, profile: Profile, name: str, env: dict[str, str], *, prefer_wait: bool,
    task_seconds: float = 0.0, check: Callable[[], None] = lambda: None,
) -> Callable[[int, float], Measured]:
    def run(tasks: int, budget: float) -> Measured:
        check()
        label = name.replace(" ", "-").replace(",", "")
        server = Server(procs, label, env, profile.server_threads)
        try:
            job = http_task_job(prefer_wait, task_seconds)
            warm = run_clients(2, 10, 10.0, lambda: Client(server.port), job, Client.close)
            if warm.errors:
                raise BenchError(f"warm-up failed: {warm.first_error}")
            cpu = cpu_seconds(server.worker_pid)
            res = run_clients(profile.task_clients, tasks, budget,
                              lambda: Client(server.port), job, Client.close)
            return res, cpu_seconds(server.worker_pid) - cpu
        finally:
            server.stop()

    return run


def redis_client() -> Any:
    """A client of the benchmark's Redis database, or :class:`Skipped` saying why not."""
    try:
        import redis
    except ImportError as exc:
        raise Skipped(f"redis-py is not installed ({exc})") from None
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise Skipped(f"Redis is unreachable at {REDIS_URL}: {exc}") from None
    return client


def require(module: str, why: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise Skipped(f"{module} is not installed: {exc} ({why})") from None


def require_backend(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # not written yet, or half-written
        raise Skipped(f"{module} is not importable: {type(exc).__name__}: {exc}") from None


def celery_system(procs: Processes, profile: Profile) -> Callable[[int, float], Measured]:
    def run(tasks: int, budget: float) -> Measured:
        require("celery", "pip install celery")
        redis_client()
        args = [
            sys.executable, "-m", "celery", "-A", "bench_celery", "worker", "--pool", "threads",
            "--concurrency", str(MAX_WORKERS), "--without-gossip", "--without-mingle",
            "--without-heartbeat", "--loglevel", "WARNING", "-Q", os.environ["BENCH_QUEUE"],
        ]
        env = {"PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}"}
        worker = procs.start("celery-worker", args, env)
        try:
            import bench_celery
            from bench_tasks import expected_total

            def job(task: Any, i: int) -> None:
                value = task.delay(i).get(timeout=TASK_TIMEOUT)
                if value["total"] != expected_total(i):
                    raise BenchError(f"celery task {i}: wrong result {value!r}")

            def make_ctx() -> Any:  # a Celery app per client thread: results are per app
                return bench_celery.make_celery()[1]

            def close_ctx(task: Any) -> None:
                task.app.close()

            warm = run_clients(1, 1, 30.0, make_ctx, job, close_ctx)  # waits for the worker
            if warm.errors:
                raise BenchError(f"celery warm-up failed: {warm.first_error}\n"
                                 + procs.log_tail("celery-worker"))
            run_clients(2, 10, 10.0, make_ctx, job, close_ctx)
            cpu = cpu_seconds(worker.pid)
            res = run_clients(profile.task_clients, tasks, budget, make_ctx, job, close_ctx)
            return res, cpu_seconds(worker.pid) - cpu
        finally:
            procs.stop(worker)

    return run


def rq_system(
    procs: Processes, profile: Profile, worker_class: str | None, workers: int, label: str
) -> Callable[[int, float], Measured]:
    def run(tasks: int, budget: float) -> Measured:
        require("rq", "pip install rq")
        connection = redis_client()
        from bench_tasks import expected_total
        from rq import Queue
        from rq.results import Result

        queue_name = f"{os.environ['BENCH_QUEUE']}-{label.lower()}"
        started = []
        try:
            for n in range(workers):
                args = [sys.executable, "-m", "rq.cli", "worker", "--url", REDIS_URL,
                        "--path", str(HERE), "--name", f"{queue_name}-{n}-{secrets.token_hex(3)}",
                        "--logging_level", "WARNING"]
                if worker_class:
                    args += ["--worker-class", worker_class]
                started.append(procs.start(f"rq-{label}-{n}", [*args, queue_name], {}))
            queue = Queue(queue_name, connection=connection)

            def job(_: Any, i: int) -> None:
                enqueued = queue.enqueue("bench_tasks.work", i, result_ttl=600)
                result = enqueued.latest_result(timeout=int(TASK_TIMEOUT))
                if result is None:
                    raise BenchError(f"rq job {i}: no result after {TASK_TIMEOUT:.0f} s")
                if result.type != Result.Type.SUCCESSFUL:
                    raise BenchError(f"rq job {i}: {result.type}: {result.exc_string}")
                value = result.return_value
                if not isinstance(value, dict) or value.get("total") != expected_total(i):
                    raise BenchError(f"rq job {i}: wrong result {value!r}")

            warm = run_clients(1, 1, 30.0, lambda: None, job)
            if warm.errors:
                raise BenchError(f"rq warm-up failed: {warm.first_error}\n"
                                 + procs.log_tail(f"rq-{label}-0"))
            run_clients(2, 10, 10.0, lambda: None, job)
            pids = [proc.pid for proc in started]
            cpu = cpu_seconds(*pids)
            res = run_clients(profile.task_clients, tasks, budget, lambda: None, job)
            return res, cpu_seconds(*pids) - cpu
        finally:
            for proc in started:
                procs.stop(proc)

    return run


def round_trip_systems(
    procs: Processes, profile: Profile, only_local: bool, tmp: Path
) -> list[System]:
    mem = {"BENCH_APP": "wsgi_async", "BENCH_REGISTRY": "memory://"}
    recipe = {"BENCH_APP": "recipe"}
    wait = "Prefer: wait=10"
    poll = f"polls every {POLL_INTERVAL * 1000:.0f} ms"
    nowait = poll + " (it has no way to wait)"
    systems = [
        System("wsgi_async memory", wait,
               http_system(procs, profile, "wsgi_async memory", mem, prefer_wait=True)),
    ]
    if not only_local:
        sqlite = {"BENCH_APP": "wsgi_async", "BENCH_REGISTRY": f"sqlite:///{tmp}/tasks.db"}
        redis = {"BENCH_APP": "wsgi_async", "BENCH_REGISTRY": REDIS_URL,
                 "BENCH_PREFIX": PREFIX + "registry:"}

        def needs_redis_registry() -> None:
            require_backend("wsgi_async.registry.redis")
            redis_client()

        systems += [
            System("wsgi_async sqlite", wait, http_system(
                procs, profile, "wsgi_async sqlite", sqlite, prefer_wait=True,
                check=lambda: require_backend("wsgi_async.registry.sqlite"))),
            System("wsgi_async redis", wait, http_system(
                procs, profile, "wsgi_async redis", redis, prefer_wait=True,
                check=needs_redis_registry)),
        ]
    systems.append(System("Flask recipe", nowait, http_system(
        procs, profile, "Flask recipe", recipe, prefer_wait=False)))
    if not only_local:
        rq = "enqueue + latest_result(timeout)"
        systems += [
            System("Celery", f"redis broker+backend, 1 worker --pool threads -c {MAX_WORKERS}, "
                   "delay().get()", celery_system(procs, profile)),
            System("RQ Worker", f"4 x `rq worker` (default Worker, forks a work-horse per job), "
                   f"{rq}", rq_system(procs, profile, None, 4, "Worker")),
            System("RQ SimpleWorker", f"4 x `rq worker` (rq.worker.SimpleWorker, no fork), {rq}",
                   rq_system(procs, profile, "rq.worker.SimpleWorker", 4, "SimpleWorker")),
        ]
    sleepy = SLEEPY_TASK
    systems += [
        System("wsgi_async memory", wait, http_system(
            procs, profile, "wsgi_async memory", mem, prefer_wait=True, task_seconds=sleepy),
            sleepy),
        System("wsgi_async memory, polling", poll, http_system(
            procs, profile, "wsgi_async memory polling", mem, prefer_wait=False,
            task_seconds=sleepy), sleepy),
        System("Flask recipe", nowait, http_system(
            procs, profile, "Flask recipe", recipe, prefer_wait=False, task_seconds=sleepy),
            sleepy),
    ]
    return systems


def bench_round_trips(
    procs: Processes, profile: Profile, only_local: bool, tmp: Path
) -> list[RoundTrip]:
    """Run every system, in ``profile.passes`` passes of alternating order (A..Z, Z..A).

    Each pass runs a share of the tasks, and a system's passes are merged, so a
    drift of the machine's load during the run weighs on every system alike.
    """
    systems = round_trip_systems(procs, profile, only_local, tmp)
    measured: dict[int, list[Measured]] = {i: [] for i in range(len(systems))}
    stopped: dict[int, RoundTrip] = {}
    for n in range(profile.passes):
        order = list(range(len(systems)))
        for i in order if n % 2 == 0 else reversed(order):
            if i in stopped:
                continue
            system = systems[i]
            total = profile.tasks // 4 if system.task_seconds else profile.tasks
            tasks = total // profile.passes + (total % profile.passes if n == 0 else 0)
            sleepy = f", {system.task_seconds:g} s tasks" if system.task_seconds else ""
            print(f"  (b) pass {n + 1}/{profile.passes}: {system.name}{sleepy} ...",
                  file=sys.stderr, flush=True)
            try:
                measured[i].append(system.run(tasks, profile.task_budget / profile.passes))
            except Skipped as exc:
                stopped[i] = RoundTrip(system.name, task_seconds=system.task_seconds,
                                       skipped=str(exc))
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if type(exc).__module__.startswith(("redis", "kombu")):
                    reason = f"Redis unavailable at {REDIS_URL}: {reason}"
                    stopped[i] = RoundTrip(system.name, task_seconds=system.task_seconds,
                                           skipped=reason)
                else:
                    stopped[i] = RoundTrip(system.name, task_seconds=system.task_seconds,
                                           failed=reason)
    rows = []
    for i, system in enumerate(systems):
        if not measured[i]:
            rows.append(stopped[i])
            continue
        row = _round_trip(system, measured[i])
        if i in stopped:
            row.failed = row.failed or stopped[i].failed or stopped[i].skipped
        rows.append(row)
    return rows


# -- (c) bound check ------------------------------------------------------------------


@dataclass
class Burst:
    server: str
    submitted: int = 0
    accepted: int = 0
    refused_503: int = 0
    other: int = 0
    retry_after: str = ""
    threads_before: int = 0
    threads_peak: int = 0
    rss_peak_mib: float = 0.0
    burst_seconds: float = 0.0
    failed: str = ""


class Sampler(threading.Thread):
    """Reads a process's thread count and RSS every 2 ms until stopped (or 120 s)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_threads = 0
        self.peak_rss = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        until = time.monotonic() + 120
        while not self._stop_event.is_set() and time.monotonic() < until:
            threads, rss = proc_status(self.pid)
            self.peak_threads = max(self.peak_threads, threads)
            self.peak_rss = max(self.peak_rss, rss)
            self._stop_event.wait(0.002)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def bench_burst(procs: Processes, profile: Profile, label: str, env: dict[str, str]) -> Burst:
    row = Burst(label)
    server = Server(procs, "burst-" + label.split()[0], env, profile.server_threads)
    try:
        def nap(client: Client, i: int) -> None:
            client.request("GET", "/sleep?seconds=0.3")

        # More concurrent synchronous requests than gunicorn has threads: it starts
        # them all (its pool is lazy), so "before" is the server at full strength.
        clients = profile.server_threads + 8
        run_clients(clients, clients, 10.0, lambda: Client(server.port), nap, Client.close)
        time.sleep(0.2)
        row.threads_before = proc_status(server.worker_pid)[0]
        sampler = Sampler(server.worker_pid)
        sampler.start()
        path = f"/reports/slow?seconds={profile.burst_seconds}"

        def submit(client: Client, i: int) -> tuple[int, str]:
            status, head, _ = client.request("POST", path)
            return status, head.get("retry-after", "")

        res = run_clients(profile.burst_clients, profile.burst, 30.0,
                          lambda: Client(server.port), submit, Client.close)
        row.burst_seconds = res.elapsed
        time.sleep(profile.burst_seconds + 0.3)  # the recipe's threads live this long
        sampler.stop()
    finally:
        server.stop()
    answers: list[tuple[int, str]] = res.extra["outputs"]
    row.submitted = res.done + res.errors
    row.accepted = sum(1 for status, _ in answers if status == 202)
    row.refused_503 = sum(1 for status, _ in answers if status == 503)
    row.other = len(answers) - row.accepted - row.refused_503 + res.errors
    row.retry_after = ",".join(sorted({ra for status, ra in answers if status == 503 and ra}))
    row.threads_peak = sampler.peak_threads
    row.rss_peak_mib = sampler.peak_rss / 1024
    if res.errors:
        row.failed = f"{res.errors} errors, first: {res.first_error}"
    return row


def bench_bounds(procs: Processes, profile: Profile) -> list[Burst]:
    queued = max(8, profile.burst // 6)
    configs = [
        ("Flask recipe", {"BENCH_APP": "recipe"}),
        (f"wsgi_async max_workers={MAX_WORKERS} max_queued=1000",
         {"BENCH_APP": "wsgi_async", "BENCH_MAX_WORKERS": str(MAX_WORKERS)}),
        (f"wsgi_async max_workers={MAX_WORKERS} max_queued={queued}",
         {"BENCH_APP": "wsgi_async", "BENCH_MAX_WORKERS": str(MAX_WORKERS),
          "BENCH_MAX_QUEUED": str(queued)}),
    ]
    rows = []
    for label, env in configs:
        print(f"  (c) {label} ...", file=sys.stderr, flush=True)
        try:
            rows.append(bench_burst(procs, profile, label, env))
        except Exception as exc:
            rows.append(Burst(label, failed=f"{type(exc).__name__}: {exc}"))
    return rows


# -- report ---------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def fmt(value: float, digits: int = 2) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"


def _round_trip_table(rows: list[dict[str, Any]]) -> list[str]:
    base = next((r for r in rows if r["system"] == "wsgi_async memory" and r["tasks"]), None)
    body = []
    notes = []
    for r in rows:
        if r["skipped"] or (r["failed"] and not r["tasks"]):
            body.append([r["system"], "skipped" if r["skipped"] else "FAILED", *["-"] * 7])
            why = f"skipped: {r['skipped']}" if r["skipped"] else f"FAILED: {r['failed']}"
            notes.append(f"  {r['system']}: {why}")
            continue
        rate_x = r["rate"] / base["rate"] if base else math.nan
        p50_x = r["p50_ms"] / base["p50_ms"] if base else math.nan
        body.append([r["system"], f"{r['tasks']:,}", fmt(r["rate"], 0),
                     fmt(r["p50_ms"]), fmt(r["p95_ms"]), fmt(r["gets_per_task"], 1),
                     fmt(r["cpu_ms"]), fmt(rate_x), fmt(p50_x)])
        if r["failed"]:
            notes.append(f"  {r['system']}: FAILED: {r['failed']}")
    lines = [table(["system", "tasks", "tasks/s", "p50 ms", "p95 ms", "GETs/task",
                    "server CPU ms/task", "tasks/s vs wa", "p50 vs wa"], body)]
    lines += ["", "  wa = wsgi_async memory (Prefer: wait) above; how each was run:"]
    lines += [f"  {r['system']}: {r['note']}" for r in rows if r["note"]]
    return lines + notes


def report(results: dict[str, Any], profile: Profile) -> str:
    out = [
        f"wsgi_async benchmarks ({profile.name}) {results['date']}, {results['cpus']} CPUs, "
        f"Python {results['python']}, {results['platform']}",
    ]
    if "inprocess" in results:
        out += ["", "(a) pass-through overhead, non-matching path (lower ratio is better)", ""]
        out.append(table(
            ["in-process WSGI", "calls", "bare us/req", "wrapped us/req", "+us/req",
             "wrapped/bare"],
            [[r["app"], f"{r['calls']:,}", fmt(r["bare_us"], 3), fmt(r["wrapped_us"], 3),
              fmt(r["overhead_us"], 3), fmt(r["ratio"])] for r in results["inprocess"]],
        ))
    if "http_passthrough" in results:
        h = results["http_passthrough"]
        out += ["", table(
            ["over HTTP", "requests", "bare req/s", "wrapped req/s", "bare/wrapped",
             "bare p50 ms", "wrapped p50 ms", "server CPU us/req bare", "wrapped", "ratio"],
            [[f"{h['server']}, {h['clients']} clients", f"{h['requests']:,}",
              fmt(h["bare_rps"], 0), fmt(h["wrapped_rps"], 0), fmt(h["ratio"]),
              fmt(h["bare_p50_ms"], 3), fmt(h["wrapped_p50_ms"], 3), fmt(h["bare_cpu_us"], 0),
              fmt(h["wrapped_cpu_us"], 0), fmt(h["wrapped_cpu_us"] / h["bare_cpu_us"])]],
        )]
    if "round_trips" in results:
        rows = results["round_trips"]
        short = [r for r in rows if not r["task_seconds"]]
        sleepy = [r for r in rows if r["task_seconds"]]
        out += ["", f"(b) async round trip: submit + wait until done, {profile.tasks} tasks "
                f"that do no work, per system (or {profile.task_budget:.0f} s), "
                f"{profile.task_clients} client threads", ""]
        out += _round_trip_table(short)
        if sleepy:
            out += ["", f"(b') the same with tasks that sleep {SLEEPY_TASK * 1000:.0f} ms, "
                    f"{profile.tasks // 4} per system: what waiting instead of polling buys", ""]
            out += _round_trip_table(sleepy)
    if "bounds" in results:
        out += ["", f"(c) bound check: a burst of {profile.burst} slow tasks "
                f"({profile.burst_seconds:g} s each) from {profile.burst_clients} clients; "
                "threads of the server's worker process", ""]
        out.append(table(
            ["server", "submitted", "202", "503", "Retry-After", "threads before",
             "threads peak", "peak - before", "peak RSS MiB"],
            [[b["server"], str(b["submitted"]), str(b["accepted"]), str(b["refused_503"]),
              b["retry_after"] or "-", str(b["threads_before"]), str(b["threads_peak"]),
              str(b["threads_peak"] - b["threads_before"]), fmt(b["rss_peak_mib"], 1)]
             if not b["failed"] or b["submitted"] else [b["server"], "FAILED", *["-"] * 7]
             for b in results["bounds"]],
        ))
        out += [f"  {b['server']}: FAILED: {b['failed']}" for b in results["bounds"] if b["failed"]]
    if "redis_keys_deleted" in results:
        out += ["", f"Redis: deleted the run's {results['redis_keys_deleted']} keys "
                f"({results['redis_prefix']}*) from {REDIS_URL}"]
    out += ["", f"total {results['seconds']:.1f} s"]
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------


def clean_redis() -> int:
    """Delete every key of this run (they all start with PREFIX); returns how many."""
    try:
        client = redis_client()
    except Exception:
        return 0
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=PREFIX + "*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += client.delete(*batch)
            batch = []
    if batch:
        deleted += client.delete(*batch)
    return deleted


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small counts, under a minute")
    size.add_argument("--smoke", action="store_true", help="tiny counts, for the smoke test")
    parser.add_argument("--only", choices=["all", "local"], default="all",
                        help="local: wsgi_async memory and the recipe only (no Redis, "
                             "no sqlite, no Celery/RQ)")
    parser.add_argument("--sections", default="abc",
                        help="which sections to run, e.g. 'ab' (default: abc)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    sys.path[:0] = [str(HERE), str(ROOT)]
    os.environ.update({  # read by bench_apps/bench_celery here and in the subprocesses
        "BENCH_REDIS_URL": REDIS_URL, "BENCH_PREFIX": PREFIX,
        "BENCH_QUEUE": f"wsgi-async-bench-{PREFIX.split(':')[1]}",
        # RQ reads its key prefix at import; set before it is imported anywhere.
        "RQ_KEY_PREFIX": PREFIX + "rq",
    })
    signal.signal(signal.SIGTERM, _terminate)
    began = time.perf_counter()
    results: dict[str, Any] = {
        "profile": asdict(profile), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}", "redis_prefix": PREFIX,
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="wsgi-async-bench-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Processes(tmp)
        try:
            if "a" in args.sections:
                print("  (a) in-process ...", file=sys.stderr, flush=True)
                results["inprocess"] = bench_inprocess(profile)
                print("  (a) over HTTP ...", file=sys.stderr, flush=True)
                try:
                    results["http_passthrough"] = bench_http_passthrough(procs, profile)
                except BenchError as exc:
                    print(f"(a) over HTTP FAILED: {exc}", file=sys.stderr)
                    failed = True
            if "b" in args.sections:
                rows = bench_round_trips(procs, profile, args.only == "local", tmp)
                results["round_trips"] = [asdict(r) for r in rows]
                failed |= any(r.failed for r in rows)
            if "c" in args.sections:
                bursts = bench_bounds(procs, profile)
                results["bounds"] = [asdict(b) for b in bursts]
                failed |= any(b.failed for b in bursts)
        finally:
            procs.stop_all()
            if args.only != "local":
                results["redis_keys_deleted"] = clean_redis()
    results["seconds"] = time.perf_counter() - began
    print(report(results, profile), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 1 if failed else 0


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:  # the finally blocks above have stopped everything
        print(f"interrupted ({exc or 'Ctrl-C'}); every process started was stopped",
              file=sys.stderr)
        sys.exit(130)
