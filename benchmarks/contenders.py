"""The contenders, and how each is started and stopped.

Every contender serves :mod:`benchmarks.apps` under the same gunicorn
(gthread, 1 worker, 8 threads, unless its row says otherwise); the Celery and
RQ contenders also start their real worker processes.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import (
    HOST,
    BenchError,
    Processes,
    Skipped,
    children_of,
    cpu_seconds,
    descendants,
    free_port,
    status,
)

THREADS = 8
CELERY_THREADS = 8
RQ_WORKERS = 4


@dataclass(frozen=True, slots=True)
class Contender:
    """One way of serving the two endpoints."""

    name: str
    kind: str  # bare | passthrough | wsgi_async | recipe | celery | rq
    registry: str = ""  # memory | sqlite | redis, for wsgi_async
    workers: int = 1  # gunicorn processes
    rq_worker: str = ""  # the RQ worker class
    how: str = ""
    executor: str = "threads"  # wsgi_async: "workers" adds one wsgi-async worker process

    @property
    def asynchronous(self) -> bool:
        return self.kind not in ("bare", "passthrough")

    @property
    def can_wait(self) -> bool:
        """Whether polls can long-poll with ``Prefer: wait``."""
        return self.kind == "wsgi_async"

    @property
    def needs_redis(self) -> bool:
        return self.kind in ("celery", "rq") or self.registry == "redis"


CONTENDERS = (
    Contender("bare", "bare", how="the Flask app, synchronous"),
    Contender("passthrough", "passthrough", how="AsyncMiddleware, no route matches"),
    Contender("wsgi_async memory", "wsgi_async", "memory", how="memory:// registry"),
    Contender("wsgi_async sqlite", "wsgi_async", "sqlite", how="sqlite:// registry (WAL)"),
    Contender("wsgi_async redis", "wsgi_async", "redis", how="redis:// registry"),
    Contender("wsgi_async sqlite -w 2", "wsgi_async", "sqlite", 2, how="gunicorn -w 2"),
    Contender("wsgi_async redis -w 2", "wsgi_async", "redis", 2, how="gunicorn -w 2"),
    Contender("wsgi_async redis workers", "wsgi_async", "redis", executor="workers",
              how=f"redis://, executor='workers': wsgi-async worker --threads {THREADS}"),
    Contender("wsgi_async sqlite workers", "wsgi_async", "sqlite", executor="workers",
              how=f"sqlite://, executor='workers': wsgi-async worker --threads {THREADS}"),
    Contender("recipe", "recipe", how="thread per request, global dict, polled"),
    Contender("celery", "celery",
              how=f"Redis broker+backend, celery worker --pool threads -c {CELERY_THREADS}"),
    Contender("rq", "rq", rq_worker="rq.worker.Worker",
              how=f"{RQ_WORKERS} x rq worker (forks a work-horse per job)"),
    Contender("rq simple", "rq", rq_worker="rq.worker.SimpleWorker",
              how=f"{RQ_WORKERS} x rq worker --worker-class SimpleWorker (no fork)"),
)
LOCAL = ("bare", "passthrough", "wsgi_async memory", "wsgi_async sqlite",
         "wsgi_async sqlite workers", "recipe")


@dataclass
class Settings:
    """What the run shares with every deployment."""

    procs: Processes
    redis_url: str | None
    prefix: str
    workdir: Path
    why_no_redis: str = ""
    started: int = field(default=0)


def require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Skipped(f"{module} is not installed (pip install -e '.[{extra}]')")


class Deployment:
    """A running contender: its gunicorn and, for Celery and RQ, its workers."""

    def __init__(self, settings: Settings, contender: Contender, **env: str) -> None:
        self.settings = settings
        self.contender = contender
        self.port = free_port()
        settings.started += 1
        self.label = f"{settings.started:03d}-{contender.name.replace(' ', '_')}"
        self.sqlite_path: Path | None = None
        self.env = self._env(env)
        self.worker_procs: list[int] = []
        procs = settings.procs
        args = [
            sys.executable, "-m", "gunicorn", "--bind", f"{HOST}:{self.port}",
            "--worker-class", "gthread", "--workers", str(contender.workers),
            "--threads", str(THREADS), "--keep-alive", "60", "--graceful-timeout", "3",
            "--timeout", "120", "--log-level", "warning", "benchmarks.apps:make_app()",
        ]
        self.server = procs.start(self.label, args, self.env)
        try:
            self._start_workers()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        contender, settings = self.contender, self.settings
        if contender.kind in ("celery", "rq"):
            require(contender.kind, "bench")
        if contender.needs_redis and settings.redis_url is None:
            raise Skipped(settings.why_no_redis or "no Redis server")
        queue = f"bench-{secrets.token_hex(4)}"
        env = {
            "BENCH_APP": contender.kind,
            "BENCH_QUEUE": queue,
            "BENCH_PREFIX": settings.prefix,
            "BENCH_REDIS_URL": settings.redis_url or "",
            "RQ_KEY_PREFIX": settings.prefix + "rq",
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            "BENCH_EXECUTOR": contender.executor,
        }
        if contender.executor == "workers":
            # The submit scenario queues faster than one worker drains: the shared
            # queue's bound (max_queued) would refuse it, as Celery's broker does not.
            env["BENCH_MAX_QUEUED"] = "100000"
        if contender.registry == "memory":
            env["BENCH_REGISTRY"] = "memory://"
        elif contender.registry == "sqlite":
            path = Path(tempfile.mkdtemp(dir=settings.workdir)) / "tasks.db"
            env["BENCH_REGISTRY"] = f"sqlite:///{path}"
            self.sqlite_path = path
        elif contender.registry == "redis":
            assert settings.redis_url is not None
            env["BENCH_REGISTRY"] = f"{settings.redis_url}?prefix={settings.prefix}wa:{queue}:"
        return {**env, **extra}

    def _start_workers(self) -> None:
        contender, procs = self.contender, self.settings.procs
        queue = self.env["BENCH_QUEUE"]
        if contender.executor == "workers":
            proc = procs.start(self.label + "-worker", [
                sys.executable, "-m", "wsgi_async", "worker", "benchmarks.apps:middleware",
                "--threads", str(THREADS), "--log-level", "WARNING",
            ], self.env)
            self.worker_procs.append(proc.pid)
        elif contender.kind == "celery":
            proc = procs.start(self.label + "-celery", [
                sys.executable, "-m", "celery", "-A", "benchmarks.celery_app", "worker",
                "--pool", "threads", "--concurrency", str(CELERY_THREADS), "--queues", queue,
                "--loglevel", "warning", "--without-heartbeat", "--without-gossip",
                "--without-mingle", "--hostname", f"{queue}@{HOST}",
            ], self.env)
            self.worker_procs.append(proc.pid)
        elif contender.kind == "rq":
            for i in range(RQ_WORKERS):
                proc = procs.start(f"{self.label}-rq{i}", [
                    sys.executable, "-m", "rq.cli", "worker", "--url",
                    self.env["BENCH_REDIS_URL"], "--worker-class", contender.rq_worker,
                    "--name", f"{queue}-{i}", "--logging_level", "WARNING", queue,
                ], self.env)
                self.worker_procs.append(proc.pid)

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise BenchError(f"{self.contender.name}: gunicorn exited with "
                                 f"{self.server.returncode}:\n"
                                 + self.settings.procs.log_tail(self.label))
            if len(children_of(self.server.pid)) == self.contender.workers:
                try:
                    code, _, body = self.call("GET", "/noop?n=7")
                    if code == 200 and json.loads(body)["n"] == 7:
                        if self.contender.asynchronous:
                            self.round_trip(deadline)
                        return
                    last = f"GET /noop answered {code}"
                except (OSError, ValueError, KeyError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise BenchError(f"{self.contender.name}: not ready after {timeout:.0f} s ({last}):\n"
                         + self.settings.procs.log_tail(self.label))

    def round_trip(self, deadline: float) -> None:
        """One task through every part (front, broker, worker), or BenchError."""
        code, headers, body = self.call("POST", "/noop?n=11")
        if code != 202 or "location" not in headers:
            raise BenchError(f"{self.contender.name}: submit answered {code}: {body[:200]!r}")
        while time.monotonic() < deadline:
            code, _, body = self.call("GET", headers["location"])
            if code == 200:
                if json.loads(body)["n"] != 11:
                    raise BenchError(f"{self.contender.name}: wrong result {body[:200]!r}")
                return
            if code != 202:
                raise BenchError(f"{self.contender.name}: poll answered {code}: {body[:200]!r}")
            time.sleep(0.02)
        raise BenchError(f"{self.contender.name}: the first task did not finish")

    def call(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request(method, path, body=b"" if method == "POST" else None)
            response = conn.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
        finally:
            conn.close()

    @property
    def server_workers(self) -> list[int]:
        """The gunicorn worker processes (the ones that serve requests)."""
        return children_of(self.server.pid)

    def pids(self) -> list[int]:
        """Every process of the deployment: gunicorn, its workers, task workers, work-horses."""
        found = descendants(self.server.pid)
        for pid in self.worker_procs:
            found += descendants(pid)
        return found

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def threads(self) -> int:
        """Threads of the serving processes (the gunicorn workers), summed."""
        return sum(status(pid).threads for pid in self.server_workers)

    def rss_kib(self) -> int:
        return sum(status(pid).rss_kib for pid in self.server_workers)

    def stop(self) -> None:
        self.settings.procs.stop_pids([self.server.pid, *self.worker_procs])
