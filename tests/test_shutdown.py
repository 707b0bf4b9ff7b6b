"""Graceful shutdown over real HTTP: SIGTERM to gunicorn, waitress and uWSGI with tasks running.

Each server serves ``tests/apps/drainapp.py`` (two task threads per process)
on a free loopback port; the test submits slow tasks, sends SIGTERM while some
run and others wait, and then reads every task back from the registry (the
SQLite file, or Redis): the running ones stored as ``done`` with the app's
response, the queued ones failed with a stored ``503``, or, on a replayable
route, left queued for another process, which runs them once the stopped
one's lease lapses.  A server that is missing is skipped locally and fails
under CI.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import IN_CI, REDIS_URL, free_port, require_redis
from wsgi_async.registry import Registry, TaskRecord, TaskStatus, open_registry

pytestmark = pytest.mark.server

APPS = Path(__file__).parent / "apps"
BIN = Path(sys.executable).parent
TASK_SECONDS = 2.0
DRAIN = 8.0  # drain_timeout, below every server's graceful timeout here
GRACEFUL = 12  # gunicorn's --graceful-timeout
LEASE = 2.0
SUBMITS = 8  # more than the task threads of every server here: some run, some wait
REGISTRY = "{registry}"  # in a command line: the registry URL of the test


def _gunicorn(worker: str, processes: int) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        command = [sys.executable, "-m", "gunicorn", "-w", str(processes), "-k", worker,
                   "-b", f"127.0.0.1:{port}", "--graceful-timeout", str(GRACEFUL)]
        if worker == "gthread":
            command += ["--threads", "4"]
        help_text = subprocess.run([sys.executable, "-m", "gunicorn", "--help"],
                                   capture_output=True, text=True, timeout=30).stdout
        if "--no-control-socket" in help_text:
            command.append("--no-control-socket")
        return [*command, "drainapp:application"]

    return argv


def _uwsgi_program() -> str | None:
    local = BIN / "uwsgi"
    return str(local) if local.exists() else shutil.which("uwsgi")


def _uwsgi(port: int) -> list[str]:
    return [str(_uwsgi_program()), "--http", f"127.0.0.1:{port}", "--module",
            "drainapp:application", "--pythonpath", str(APPS), "--virtualenv", sys.prefix,
            "--master", "--processes", "1", "--die-on-term", "--enable-threads"]


@dataclass(frozen=True)
class Spec:
    name: str
    package: str
    argv: Callable[[int], list[str]]

    def __str__(self) -> str:
        return self.name


def _cli(port: int) -> list[str]:
    """``wsgi-async serve`` (on waitress): it builds the middleware itself, with the defaults."""
    script = BIN / "wsgi-async"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "wsgi_async"]
    return [*command, "serve", "drainapp:app", "--route", "^/slow$", "--host", "127.0.0.1",
            "--port", str(port), "--task-threads", "2", "--registry", REGISTRY]


SERVERS = [
    Spec("gunicorn-sync", "gunicorn", _gunicorn("sync", 1)),
    Spec("gunicorn-gthread", "gunicorn", _gunicorn("gthread", 3)),  # -w 3
    Spec("waitress", "waitress",
         lambda port: [sys.executable, "-m", "waitress", f"--listen=127.0.0.1:{port}",
                       "drainapp:application"]),
    Spec("uwsgi", "pyuwsgi", _uwsgi),
    Spec("cli-waitress", "waitress", _cli),
]


def require(spec: Spec) -> None:
    """Skip (locally) or fail (under CI) when the server is not installed."""
    missing = importlib.util.find_spec(spec.package) is None
    if spec.name == "uwsgi":
        missing = _uwsgi_program() is None
    if not missing:
        return
    if IN_CI:
        pytest.fail(f"{spec.name} is not installed, and CI requires every server")
    pytest.skip(f"{spec.name} is not installed (pip install 'wsgi-async[test]')")


class Server:
    """One server in its own process group, serving drainapp on ``registry``."""

    def __init__(self, spec: Spec, registry: str, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"{spec.name}.log"
        env = dict(os.environ, PYTHONPATH=str(APPS), WSGI_ASYNC_TEST_REGISTRY=registry,
                   WSGI_ASYNC_TEST_DRAIN=str(DRAIN), WSGI_ASYNC_TEST_LEASE=str(LEASE))
        with open(self.log_path, "wb") as log:
            argv = [registry if arg == REGISTRY else arg for arg in spec.argv(self.port)]
            self.process = subprocess.Popen(argv, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 20
            while True:
                assert self.process.poll() is None, f"{spec.name} exited:\n{self.log()}"
                try:
                    self.request("GET", "/pid")
                    return
                except OSError:
                    assert time.monotonic() < deadline, f"{spec.name} not ready:\n{self.log()}"
                    time.sleep(0.05)
        except BaseException:
            self.kill()
            raise

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")[-6000:]

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str]]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body or None)
            response = connection.getresponse()
            response.read()
            return response.status, dict(response.getheaders())
        finally:
            connection.close()

    def submit(self, path: str, count: int) -> list[str]:
        ids = []
        for index in range(count):
            status, headers = self.request("POST", f"{path}?seconds={TASK_SECONDS}",
                                           f"job-{index}".encode())
            assert status == 202, self.log()
            ids.append(headers["Location"].rsplit("/", 1)[1])
        return ids

    def terminate(self, within: float) -> float:
        """SIGTERM the server; seconds until it exited."""
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {within} s after SIGTERM:\n{self.log()}") from None
        return time.monotonic() - began

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # our child leads its group
        self.process.wait(10)


@pytest.fixture
def redis_url() -> Iterator[str]:
    require_redis()
    prefix = f"wsgi-async-drain-{secrets.token_hex(4)}:"
    yield f"{REDIS_URL}?prefix={prefix}"
    import redis

    with redis.Redis.from_url(REDIS_URL) as keys:
        for key in keys.scan_iter(match=prefix + "*", count=1000):
            keys.delete(key)


def records(registry: Registry, ids: list[str]) -> dict[str, TaskRecord]:
    found = {task_id: registry.get(task_id) for task_id in ids}
    assert all(record is not None for record in found.values()), found
    return {task_id: record for task_id, record in found.items() if record is not None}


def wait_until_running(registry: Registry, ids: list[str]) -> dict[str, TaskRecord]:
    """The tasks once every task thread has picked one up (states stay put while they run)."""
    deadline = time.monotonic() + 10
    while True:
        now = records(registry, ids)
        if sum(r.status is TaskStatus.RUNNING for r in now.values()) >= 2:
            time.sleep(0.3)  # let every process's threads start theirs
            return records(registry, ids)
        assert time.monotonic() < deadline, "no task started"
        time.sleep(0.05)


def assert_done(record: TaskRecord, index: int) -> None:
    assert record.status is TaskStatus.DONE, record
    assert record.response is not None and record.response.status == "200 OK"
    assert record.response.body == f"done:job-{index}".encode()


@pytest.mark.parametrize("spec", SERVERS, ids=str)
def test_sigterm_lets_running_tasks_finish_and_fails_queued_ones(
    spec: Spec, tmp_path: Path
) -> None:
    require(spec)
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    run(spec, url, tmp_path)


@pytest.mark.redis
@pytest.mark.compat("gunicorn-gthread")
def test_sigterm_drain_on_redis(redis_url: str, tmp_path: Path) -> None:
    spec = next(s for s in SERVERS if s.name == "gunicorn-gthread")
    require(spec)
    run(spec, redis_url, tmp_path)


def run(spec: Spec, url: str, tmp_path: Path) -> None:
    server = Server(spec, url, tmp_path)
    registry = open_registry(url)
    try:
        ids = server.submit("/slow", SUBMITS)
        before = wait_until_running(registry, ids)
        took = server.terminate(within=GRACEFUL + 5)
        after = records(registry, ids)
    finally:
        server.kill()
        registry.close()
    running = [i for i, task_id in enumerate(ids) if before[task_id].status is TaskStatus.RUNNING]
    queued = [i for i, task_id in enumerate(ids) if before[task_id].status is TaskStatus.QUEUED]
    print(f"{spec.name} on {url.split(':')[0]}: {len(running)} running, {len(queued)} queued at "
          f"SIGTERM; the server exited {took:.2f} s later (tasks of {TASK_SECONDS} s)")
    assert running and queued, before
    log = server.log()
    for index in running:  # finished within the drain and stored: the app's response
        assert_done(after[ids[index]], index)
    for index in queued:  # never started: a stored 503, not lost
        record = after[ids[index]]
        assert record.status is TaskStatus.FAILED, (record, log)
        assert record.response is not None and record.response.status_code == 503
        assert json.loads(record.response.body)["detail"] == (
            "the server shut down before the task started")
    assert took < DRAIN + 3, log


@pytest.mark.compat("gunicorn-gthread")
def test_replayable_queued_tasks_are_left_for_another_process(tmp_path: Path) -> None:
    """SIGTERM to one gunicorn worker: its running tasks finish there, its queued ones are
    replayed by the other workers once its lease lapses (its replacement, too, may)."""
    spec = next(s for s in SERVERS if s.name == "gunicorn-gthread")
    require(spec)
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    server = Server(spec, url, tmp_path)
    registry = open_registry(url)
    try:
        ids = server.submit("/replay", SUBMITS)
        before = wait_until_running(registry, ids)
        holders = {r.worker for r in before.values() if r.status is TaskStatus.QUEUED}
        assert holders, before
        victim = sorted(str(holder) for holder in holders)[0]
        pid = int(victim.split("-")[0])
        mine = [i for i, task_id in enumerate(ids) if before[task_id].worker == victim]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DRAIN + LEASE * 3 + 15
        while True:
            after = records(registry, ids)
            if all(r.status.is_final for r in after.values()):
                break
            assert time.monotonic() < deadline, (after, server.log())
            # Clients poll meanwhile: every process that answers also reaps lapsed leases.
            for task_id in ids:
                server.request("GET", f"/_async/tasks/{task_id}")
            time.sleep(0.1)
    finally:
        server.kill()
        registry.close()
    for index, task_id in enumerate(ids):
        assert_done(after[task_id], index)
        ran_in = dict(after[task_id].response.headers)["X-Pid"]  # type: ignore[union-attr]
        if index in mine and before[task_id].status is TaskStatus.RUNNING:
            assert ran_in == str(pid) and after[task_id].attempts == 1
        elif index in mine:  # was queued there: run by another process instead
            assert ran_in != str(pid), after[task_id]
    print(f"worker {pid} held {len(mine)} task(s) at SIGTERM; every task ended done")
