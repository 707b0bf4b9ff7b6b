"""Registry outages longer than ``lease_time``, with tasks running in several processes.

gunicorn ``-w 3 -k sync`` serves ``tests/apps/mpapp.py`` on Redis (a private server,
stopped and started again) and on SQLite (another connection holds the write lock).  While
the registry is out no process can renew its lease; once it is back none may be judged
dead for it: nothing alive is reaped, nothing runs twice, every task ends with its
own result.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import RedisServer
from gunicorn_helpers import Gunicorn

pytestmark = pytest.mark.server

APPS = Path(__file__).parent / "apps"
LEASE = 3.0
OUTAGE = 5.0  # longer than the lease
TASK_SECONDS = 8.0  # each task outlives the outage by a couple of seconds


@dataclass
class Outage:
    registry: str
    begin: Callable[[], None]
    end: Callable[[], None]


@pytest.fixture(params=["redis", "sqlite"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    if request.param == "redis":
        # Stopped, not frozen: a frozen Redis runs the heartbeats queued in its sockets
        # the moment it resumes.  Its append-only file keeps the tasks over the restart.
        durable: RedisServer = request.getfixturevalue("durable_redis")
        yield Outage(f"{durable.url}?prefix=outage:&socket_timeout=1", durable.kill,
                     durable.start)
        return
    path = tmp_path / "tasks.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        yield Outage(
            f"sqlite:///{path}",
            lambda: holder.execute("BEGIN EXCLUSIVE"),  # every write waits behind it
            lambda: holder.execute("ROLLBACK"),
        )
    finally:
        holder.close()


class Server(Gunicorn):
    """gunicorn -w 3 serving mpapp on a free loopback port.

    Sync workers, so that concurrent submits spread over the processes (one
    gthread worker would accept them all).
    """

    def __init__(self, registry: str, marks: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(APPS), WSGI_ASYNC_TEST_REGISTRY=registry,
                   WSGI_ASYNC_TEST_LEASE=str(LEASE), WSGI_ASYNC_TEST_MARKS=str(marks))
        super().__init__("mpapp:application",
                         ["-w", "3", "-k", "sync", "--graceful-timeout", "3"],
                         env, marks / "gunicorn.log")


def test_an_outage_longer_than_the_lease_reaps_nobody(outage: Outage, tmp_path: Path) -> None:
    server = Server(outage.registry, tmp_path)
    try:
        submitted: dict[str, bytes] = {}
        lock = threading.Lock()

        def submit(index: int) -> None:
            path = "/replay" if index % 2 else "/work"
            payload = f"task-{index}".encode()
            # The wait holds a sync worker, so that the next submits go to the others.
            status, headers, _ = server.request("POST", f"{path}?sleep={TASK_SECONDS}", payload,
                                                {"Prefer": "respond-async, wait=1"})
            assert status == 202
            with lock:
                submitted[headers["Location"]] = payload

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(submitted) == 12
        ids = {location.rsplit("/", 1)[1] for location in submitted}
        deadline = time.monotonic() + 5
        while len(marks(tmp_path, ids, 1)) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        running = marks(tmp_path, ids, 1)
        assert len(set(running.values())) >= 2, f"tasks ran in one process only: {running}"

        outage.begin()
        time.sleep(OUTAGE)
        outage.end()

        for location, payload in submitted.items():
            status, headers, body = poll_final(server, location, limit=60)
            assert (status, body) == (200, b"done:" + payload), body
            assert headers["X-Attempt"] == "1"  # never reaped, never replayed
        assert marks(tmp_path, ids, 2) == {}, "a task that was still running ran again"
        log = server.log.read_text()
        assert "replaying task" not in log and "worker_lost" not in log
    finally:
        server.stop()


def marks(folder: Path, ids: set[str], attempt: int) -> dict[str, str]:
    """The pid that ran each task's ``attempt`` (mpapp leaves ``<id>.<attempt>`` files)."""
    found = {}
    for task_id in ids:
        mark = folder / f"{task_id}.{attempt}"
        if mark.exists() and mark.read_text():
            found[task_id] = mark.read_text()
    return found


def poll_final(server: Gunicorn, location: str,
               limit: float) -> tuple[int, dict[str, str], bytes]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status, headers, body = server.request("GET", location, headers={"Prefer": "wait=5"})
        if status not in (202, 503):
            return status, headers, body
        time.sleep(0.1)
    raise AssertionError(f"{location} did not finish in {limit} s")
