"""Load: 10,000 submissions through gunicorn -w 2 from 16 keep-alive clients.

On SQLite and on Redis: every ``202`` reaches a final state (read back from
the registry while the load runs, before its short ``result_ttl`` runs out),
none is lost, and the workers' resident memory is printed before the load,
at its peak and after every result has expired.  Only "every task final, none
lost" is asserted, never a timing.  Marked ``load``: skipped unless pytest
runs with ``--load``, as ``.ci/run`` does.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REDIS_URL, free_port, require_redis
from wsgi_async.registry import Registry, TaskStatus, open_registry

pytestmark = [pytest.mark.server, pytest.mark.load]

APPS = Path(__file__).parent / "apps"
SUBMISSIONS = 10_000
CLIENTS = 16
WARMUP = 1000
TTL = 15.0  # result_ttl: results expire within the test
RETRY_503 = 0.02


def no_control_socket() -> list[str]:
    help_text = subprocess.run([sys.executable, "-m", "gunicorn", "--help"],
                               capture_output=True, text=True, timeout=30).stdout
    return ["--no-control-socket"] if "--no-control-socket" in help_text else []


def worker_pids(master: int) -> list[int]:
    path = Path(f"/proc/{master}/task/{master}/children")
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mib(values: list[int]) -> str:
    return " + ".join(f"{value / 2**20:.1f}" for value in values) + " MiB"


class Gunicorn:
    """gunicorn -w 2 (gthread) serving tests/apps/loadapp.py on ``registry``."""

    def __init__(self, registry: str, log: Path) -> None:
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=str(APPS), WSGI_ASYNC_TEST_REGISTRY=registry,
                   WSGI_ASYNC_TEST_TTL=str(TTL))
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "8",
                 "-b", f"127.0.0.1:{self.port}", "--log-level", "warning",
                 *no_control_socket(), "loadapp:application"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.log = log
        deadline = time.monotonic() + 20
        while len(worker_pids(self.process.pid)) < 2 or not self._answers():
            assert self.process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"gunicorn not ready:\n{log.read_text()}"
            time.sleep(0.1)
        self.workers = worker_pids(self.process.pid)

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/pid")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def rss(self) -> list[int]:
        return [rss(pid) for pid in self.workers]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # our child leads its group
        self.process.wait(10)


@pytest.fixture(params=["sqlite", "redis"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tasks.db'}"
        return
    require_redis()
    prefix = f"wsgi-async-load-{secrets.token_hex(4)}:"
    yield f"{REDIS_URL}?prefix={prefix}"
    import redis

    with redis.Redis.from_url(REDIS_URL) as keys:
        for key in keys.scan_iter(match=prefix + "*", count=1000):
            keys.delete(key)


class Checker(threading.Thread):
    """Reads each accepted task back from the registry until it is final.

    A task gone from the registry before it was seen final is lost, unless its
    ``result_ttl`` could have run out first (then it is counted apart, and fails
    the test too: the check was too slow to prove anything).
    """

    def __init__(self, registry: Registry) -> None:
        super().__init__(name="checker", daemon=True)
        self.registry = registry
        self.pending: collections.deque[tuple[str, bytes, float]] = collections.deque()
        self.ids: list[str] = []
        self.final = 0
        self.lost: list[str] = []
        self.wrong: list[str] = []
        self.unproven: list[str] = []
        self.stopping = threading.Event()

    def add(self, task_id: str, payload: bytes) -> None:
        self.ids.append(task_id)
        self.pending.append((task_id, payload, time.monotonic()))

    def run(self) -> None:
        while not (self.stopping.is_set() and not self.pending):
            try:
                task_id, payload, accepted = self.pending.popleft()
            except IndexError:
                time.sleep(0.01)
                continue
            record = self.registry.get(task_id)
            if record is None:
                (self.unproven if time.monotonic() - accepted > TTL else self.lost).append(task_id)
            elif not record.status.is_final:
                self.pending.append((task_id, payload, accepted))
                if len(self.pending) < 50:
                    time.sleep(0.002)
            elif (record.status is not TaskStatus.DONE or record.response is None
                  or record.response.body != b"done:" + payload):
                self.wrong.append(task_id)
            else:
                self.final += 1


def client(port: int, share: range, checker: Checker, counts: collections.Counter[str]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for index in share:
            payload = f"job-{index}".encode()
            for _ in range(1000):
                try:
                    connection.request("POST", "/job", body=payload)
                    response = connection.getresponse()
                    body = response.read()
                except (OSError, http.client.HTTPException):
                    counts["reconnects"] += 1
                    connection.close()
                    continue
                if response.status == 202:
                    checker.add(response.getheader("Location", "").rsplit("/", 1)[1], payload)
                    counts["accepted"] += 1
                    break
                # 503 + Retry-After: a bound was reached; retried, and counted by its detail.
                counts[f"{response.status} {json.loads(body).get('detail')}"] += 1
                time.sleep(RETRY_503)
    finally:
        connection.close()


def run_clients(port: int, jobs: range, checker: Checker,
                counts: collections.Counter[str]) -> None:
    """``CLIENTS`` keep-alive clients share ``jobs`` until each got its ``202``."""
    clients = [threading.Thread(target=client, args=(port, jobs[n::CLIENTS], checker, counts))
               for n in range(CLIENTS)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(150)


def test_ten_thousand_submissions_all_final_none_lost(registry_url: str, tmp_path: Path) -> None:
    kind = registry_url.split(":", 1)[0]
    server = Gunicorn(registry_url, tmp_path / "gunicorn.log")
    registry = open_registry(registry_url)
    try:
        checker = Checker(registry)
        checker.start()
        # A warm-up first, so that the baseline holds every thread and connection a worker
        # keeps (16 threads, each with its registry connection): what remains is the load's.
        run_clients(server.port, range(SUBMISSIONS, SUBMISSIONS + WARMUP), checker,
                    collections.Counter())
        while len(checker.pending):
            time.sleep(0.05)
        before = server.rss()
        peak = list(before)
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.2):
                for i, value in enumerate(server.rss()):
                    peak[i] = max(peak[i], value)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        counts: collections.Counter[str] = collections.Counter()
        began = time.monotonic()
        run_clients(server.port, range(SUBMISSIONS), checker, counts)
        submitted = time.monotonic() - began
        checker.stopping.set()
        checker.join(60)
        settled = time.monotonic() - began
        sampling.set()
        sampler.join(5)
        # Every result expires (TTL), and the supervisors' sweeps drop them.
        time.sleep(TTL + 4)
        after = server.rss()
        sample = checker.ids[:: max(1, len(checker.ids) // 200)]
        expired = sum(registry.get(task_id) is None for task_id in sample)
    finally:
        server.stop()
        registry.close()
    print(f"\n{kind}: {counts['accepted']} accepted in {submitted:.1f} s "
          f"({counts['accepted'] / submitted:.0f}/s), all read back final after {settled:.1f} s; "
          f"reconnects: {counts['reconnects']}, refusals retried: "
          f"{ {k: v for k, v in counts.items() if k[:1].isdigit()} }\n"
          f"{kind}: worker RSS before {mib(before)}, peak {mib(peak)}, "
          f"after expiry {mib(after)} ({expired} of {len(sample)} sampled results expired)")
    assert not checker.is_alive(), "tasks still pending after the load"
    assert counts["accepted"] == SUBMISSIONS, counts
    assert not checker.lost, f"{len(checker.lost)} task(s) lost: {checker.lost[:5]}"
    assert not checker.wrong, f"{len(checker.wrong)} task(s) with a wrong result"
    assert not checker.unproven, f"{len(checker.unproven)} read back too late to prove"
    assert checker.final == SUBMISSIONS + WARMUP
    assert expired == len(sample), "results outlived their result_ttl"
