"""The worker tier over real processes: gunicorn web processes and ``wsgi-async worker``.

Routes with ``executor="workers"`` are only stored and queued by the web
process; ``wsgi-async worker`` processes claim and run them, on SQLite and on
Redis (Streams).  Workers are killed with SIGKILL and stopped with SIGTERM;
the queue is bounded by ``max_queued``.  Every process is killed by its pid.
"""

from __future__ import annotations

import json
import math
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
from gunicorn_helpers import NO_CONTROL_SOCKET, http_call

pytestmark = pytest.mark.server

APPS = Path(__file__).parent / "apps"
BIN = Path(sys.executable).parent
LEASE = 1.5
MAX_QUEUED = 5


class Cluster:
    """One gunicorn web process and any number of ``wsgi-async worker`` processes."""

    def __init__(self, registry: str, folder: Path, max_queued: int = 1000) -> None:
        self.folder = folder
        self.env = dict(os.environ, PYTHONPATH=str(APPS), WSGI_ASYNC_TEST_REGISTRY=registry,
                        WSGI_ASYNC_TEST_LEASE=str(LEASE), WSGI_ASYNC_TEST_MARKS=str(folder),
                        WSGI_ASYNC_TEST_MAX_QUEUED=str(max_queued))
        self.port = free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.web = self._start(
            "web",
            [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "8",
             "-b", f"127.0.0.1:{self.port}", *NO_CONTROL_SOCKET, "workerapp:application"],
        )
        deadline = time.monotonic() + 20
        while True:
            assert self.web.poll() is None, self.logs()
            try:
                status, _, body = self.request("GET", "/pid")
                self.web_pid = int(body)
                return
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not start in 20 s"
                time.sleep(0.1)

    def _start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{name}-{len(self.processes)}.log", "wb")  # noqa: SIM115
        try:
            process = subprocess.Popen(command, env=self.env, cwd=self.folder, stdout=log,
                                       stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.processes.append(process)
        return process

    def worker(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start a ``wsgi-async worker`` and wait until it claims."""
        process = self._start("worker", [str(BIN / "wsgi-async"), "worker",
                                         "workerapp:application", *extra])
        log = self.folder / f"worker-{len(self.processes) - 1}.log"
        deadline = time.monotonic() + 20
        while b"claims routes" not in log.read_bytes():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the worker did not start in 20 s"
            time.sleep(0.05)
        return process

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        return http_call(self.port, method, path, body, headers)

    def submit(self, path: str, body: bytes) -> str:
        status, headers, answer = self.request("POST", path, body)
        assert status == 202, answer
        return headers["Location"]

    def final(self, location: str, limit: float = 30) -> tuple[int, dict[str, str], bytes]:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            status, headers, body = self.request("GET", location, headers={"Prefer": "wait=2"})
            if status != 202:
                return status, headers, body
        raise AssertionError(f"{location} did not finish in {limit} s")

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')}"
                         for log in sorted(self.folder.glob("*.log")))

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def drop_keys(prefix: str) -> None:
    import redis

    with redis.Redis.from_url(REDIS_URL) as keys:
        for key in keys.scan_iter(match=prefix + "*", count=1000):
            keys.delete(key)


@pytest.fixture(params=["sqlite", "redis"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite file, or a fresh key prefix on the test Redis (dropped after)."""
    prefix = f"wsgi-async-workers-{secrets.token_hex(4)}:"
    if request.param == "redis":
        require_redis()
        try:
            yield f"{REDIS_URL}?prefix={prefix}"
        finally:
            drop_keys(prefix)
    else:
        yield f"sqlite:///{tmp_path / 'tasks.db'}"


@pytest.fixture
def cluster(registry_url: str, tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(registry_url, tmp_path)
    try:
        yield running
    finally:
        running.stop()


def running_pid(folder: Path, task_id: str, attempt: int = 1, limit: float = 15) -> int:
    mark = folder / f"{task_id}.{attempt}"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if mark.exists() and mark.read_text():
            return int(mark.read_text())
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} attempt {attempt} never started")


def task_id(location: str) -> str:
    return location.rsplit("/", 1)[1]


def test_two_workers_run_every_task_and_the_web_process_none(cluster: Cluster) -> None:
    workers = {cluster.worker("--threads", "4").pid, cluster.worker("--threads", "4").pid}
    locations: dict[str, bytes] = {}
    lock = threading.Lock()

    def submit(client: int) -> None:
        for index in range(50):
            payload = f"{client}-{index}-{secrets.token_hex(4)}".encode()
            location = cluster.submit("/work?sleep=0.01", payload)
            with lock:
                locations[location] = payload

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(locations) == 200
    ran_in: dict[int, int] = {}
    for location, payload in locations.items():
        status, headers, body = cluster.final(location)
        assert (status, body) == (200, b"done:" + payload)
        pid = int(headers["X-Pid"])
        ran_in[pid] = ran_in.get(pid, 0) + 1
    assert set(ran_in) == workers, (ran_in, workers)  # both workers, never the web process
    assert cluster.web_pid not in ran_in
    print(f"tasks per worker: {sorted(ran_in.values())}")


def test_progress_and_cancel_cross_from_and_to_the_worker(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker = cluster.worker("--threads", "2")
    location = cluster.submit("/steps?count=300", b"")
    # The worker's progress, read by the web process from the shared registry.
    deadline = time.monotonic() + 20
    while True:
        status, headers, body = cluster.request("GET", location)
        assert status == 202, body
        progress = json.loads(body)["progress"]
        if progress is not None and progress["current"] >= 3:
            break
        assert time.monotonic() < deadline, "no progress from the worker"
        time.sleep(0.1)
    assert progress["total"] == 300 and progress["message"].endswith(f" in {worker.pid}")
    assert progress["percent"] == math.floor(progress["current"] * 10_000 / 300) / 100
    # DELETE on the web process reaches the task running in the worker within about
    # a second (CHECK_INTERVAL): the application sees it and stops.
    cancelled_at = time.monotonic()
    status, headers, body = cluster.request("DELETE", location)
    assert status == 204, body
    mark = tmp_path / f"{task_id(location)}.cancelled"
    while not mark.exists():
        assert time.monotonic() - cancelled_at < 5, cluster.logs()
        time.sleep(0.05)
    pid, step = map(int, mark.read_text().split())
    assert pid == worker.pid and step < 300
    status, headers, body = cluster.request("GET", location)
    assert status == 410 and json.loads(body)["status"] == "cancelled", body
    # The late result is never stored, and the worker goes on with the next task.
    time.sleep(0.5)
    assert cluster.request("GET", location)[0] == 410
    status, headers, body = cluster.final(cluster.submit("/work", b"next"))
    assert (status, body, int(headers["X-Pid"])) == (200, b"done:next", worker.pid)


@pytest.mark.parametrize("replay", [True, False])
def test_killed_workers_tasks_are_taken_over_after_the_lease(
    cluster: Cluster, tmp_path: Path, replay: bool
) -> None:
    first = [cluster.worker("--threads", "2"), cluster.worker("--threads", "2")]
    location = cluster.submit("/replay?sleep=60" if replay else "/work?sleep=60", b"again")
    pid = running_pid(tmp_path, task_id(location))
    assert pid in {process.pid for process in first}
    for process in first:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    killed_at = time.monotonic()
    fresh = cluster.worker("--threads", "2")
    status, headers, body = cluster.final(location, limit=LEASE * 4 + 10)
    settled_after = time.monotonic() - killed_at
    print(f"settled {settled_after:.2f} s after SIGKILL (lease {LEASE} s)")
    assert settled_after < LEASE * 3 + 3
    if replay:
        assert (status, body) == (200, b"done:again"), body
        assert int(headers["X-Pid"]) == fresh.pid
        assert headers["X-Attempt"] == "2"
    else:
        assert status == 500
        assert json.loads(body)["reason"] == "worker_lost"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_lets_the_running_task_finish(
    cluster: Cluster, tmp_path: Path, signum: int
) -> None:
    worker = cluster.worker("--threads", "2", "--grace", "20")
    location = cluster.submit("/work?sleep=1.5", b"graceful")
    assert running_pid(tmp_path, task_id(location)) == worker.pid
    worker.send_signal(signum)
    assert worker.wait(20) == 0
    # Stored before the worker exited: a plain read has it, no worker runs any more.
    status, headers, body = cluster.request("GET", location)
    assert (status, body) == (200, b"done:graceful")
    assert int(headers["X-Pid"]) == worker.pid


def test_the_queue_is_bounded_and_waits_for_a_worker(registry_url: str, tmp_path: Path) -> None:
    cluster = Cluster(registry_url, tmp_path, max_queued=MAX_QUEUED)
    try:
        _bounded(cluster)
    finally:
        cluster.stop()


def _bounded(cluster: Cluster) -> None:
    answers = [cluster.request("POST", "/work", f"{n}".encode()) for n in range(MAX_QUEUED + 3)]
    accepted = [(headers["Location"], n) for n, (status, headers, _) in enumerate(answers)
                if status == 202]
    refused = [(status, headers, body) for status, headers, body in answers if status != 202]
    assert len(accepted) == MAX_QUEUED
    assert len(refused) == 3
    for status, headers, body in refused:
        assert status == 503
        assert headers["Retry-After"].isdigit()
        assert json.loads(body)["error"] == "Service Unavailable"
    status, _, body = cluster.request("GET", accepted[0][0])
    assert (status, json.loads(body)["status"]) == (202, "queued")
    worker = cluster.worker()
    for location, n in accepted:
        status, headers, body = cluster.final(location)
        assert (status, body) == (200, b"done:" + f"{n}".encode())
        assert int(headers["X-Pid"]) == worker.pid


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["workerapp:app"], "needs --registry and --routes"),
        (["workerapp:application", "--routes", "^/nope$"], "are not routes of the application"),
        (["workerapp:application", "--threads", "0"], "threads must be at least 1"),
    ],
)
def test_worker_command_refuses_what_it_cannot_run(
    tmp_path: Path, args: list[str], message: str
) -> None:
    env = dict(os.environ, PYTHONPATH=str(APPS),
               WSGI_ASYNC_TEST_REGISTRY=f"sqlite:///{tmp_path / 'tasks.db'}")
    done = subprocess.run([str(BIN / "wsgi-async"), "worker", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert message in done.stderr
