"""Shared registries across real processes: gunicorn -w 3 on SQLite and on Redis.

Submits land on one process and polls on others; a worker process killed with
SIGKILL leaves no task running forever; a replayable task is run again by a
live process.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REDIS_URL, require_redis
from gunicorn_helpers import Gunicorn

pytestmark = pytest.mark.server

APPS = Path(__file__).parent / "apps"
LEASE = 1.5


class Server(Gunicorn):
    """A gunicorn with three gthread worker processes serving mpapp."""

    def __init__(self, registry: str, marks: Path, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(APPS), WSGI_ASYNC_TEST_REGISTRY=registry,
                   WSGI_ASYNC_TEST_LEASE=str(LEASE), WSGI_ASYNC_TEST_MARKS=str(marks))
        super().__init__(
            "mpapp:application",
            ["-w", "3", "-k", "gthread", "--threads", "4", "--graceful-timeout", "3", *extra],
            env, marks / "gunicorn.log",
        )


def drop_keys(prefix: str) -> None:
    import redis

    with redis.Redis.from_url(REDIS_URL) as keys:
        for key in keys.scan_iter(match=prefix + "*", count=1000):
            keys.delete(key)


@pytest.fixture(params=["sqlite", "redis"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    prefix = f"wsgi-async-mp-{secrets.token_hex(4)}:"
    if request.param == "redis":
        require_redis()
        registry = f"{REDIS_URL}?prefix={prefix}"
    else:
        registry = f"sqlite:///{tmp_path / 'tasks.db'}"
    srv = Server(registry, tmp_path)
    try:
        yield srv
    finally:
        srv.stop()
        if request.param == "redis":
            drop_keys(prefix)


def poll_final(srv: Server, location: str, limit: float = 30) -> tuple[int, dict[str, str], bytes]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status, headers, body = srv.request("GET", location, headers={"Prefer": "wait=5"})
        if status != 202:
            return status, headers, body
    raise AssertionError(f"{location} did not finish in {limit} s")


def test_hundreds_of_tasks_across_processes_nothing_lost(server: Server) -> None:
    locations: dict[str, bytes] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def submit(worker: int) -> None:
        for index in range(50):
            payload = f"{worker}-{index}".encode()
            status, headers, _ = server.request("POST", "/work", payload)
            if status != 202:
                with lock:
                    errors.append(f"submit answered {status}")
                continue
            with lock:
                locations[headers["Location"]] = payload

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(locations) == 300
    ran_in: set[str] = set()
    for location, payload in locations.items():
        status, headers, body = poll_final(server, location)
        assert status == 200, body
        assert body == b"done:" + payload
        ran_in.add(headers["X-Pid"])
    assert len(ran_in) >= 2, "every task ran in one process: the test proves nothing"


def running_pid(marks: Path, task_id: str, attempt: int = 1, limit: float = 10) -> int:
    mark = marks / f"{task_id}.{attempt}"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if mark.exists() and mark.read_text():
            return int(mark.read_text())
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} attempt {attempt} never started")


def test_a_killed_worker_process_fails_its_task(server: Server, tmp_path: Path) -> None:
    status, headers, _ = server.request("POST", "/work?sleep=60", b"x")
    assert status == 202
    location = headers["Location"]
    task_id = location.rsplit("/", 1)[1]
    pid = running_pid(tmp_path, task_id)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    status, _, body = poll_final(server, location, limit=LEASE * 3 + 10)
    settled_after = time.monotonic() - killed_at
    assert status == 500
    document = json.loads(body)
    assert document["reason"] == "worker_lost"
    assert "Traceback" not in body.decode()
    print(f"lost task settled {settled_after:.2f} s after SIGKILL (lease {LEASE} s)")
    assert settled_after < LEASE * 2 + 5


def test_a_replayable_task_runs_again_elsewhere(server: Server, tmp_path: Path) -> None:
    status, headers, _ = server.request("POST", "/replay?sleep=60", b"again")
    assert status == 202
    location = headers["Location"]
    task_id = location.rsplit("/", 1)[1]
    first = running_pid(tmp_path, task_id, attempt=1)
    os.kill(first, signal.SIGKILL)
    status, headers, body = poll_final(server, location, limit=LEASE * 3 + 10)
    assert status == 200, body
    assert body == b"done:again"
    assert headers["X-Attempt"] == "2"
    assert int(headers["X-Pid"]) != first
    assert running_pid(tmp_path, task_id, attempt=2) != first


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_preload_forks_after_the_middleware_is_built(kind: str, tmp_path: Path) -> None:
    """With --preload the middleware (and its registry) is built in the master."""
    prefix = f"wsgi-async-mp-{secrets.token_hex(4)}:"
    if kind == "redis":
        require_redis()
        registry = f"{REDIS_URL}?prefix={prefix}"
    else:
        registry = f"sqlite:///{tmp_path / 'tasks.db'}"
    srv = Server(registry, tmp_path, "--preload")
    try:
        locations = []
        for index in range(30):
            status, headers, _ = srv.request("POST", "/work", str(index).encode())
            assert status == 202
            locations.append(headers["Location"])
        pids = set()
        for index, location in enumerate(locations):
            status, headers, body = poll_final(srv, location)
            assert (status, body) == (200, b"done:" + str(index).encode())
            pids.add(headers["X-Pid"])
        assert str(srv.process.pid) not in pids  # the master never runs tasks
    finally:
        srv.stop()
        if kind == "redis":
            drop_keys(prefix)


def connections_to_each_worker(srv: Server, count: int) -> dict[int, http.client.HTTPConnection]:
    """Keep-alive connections, one per worker process: each answers ``/pid`` with its own."""
    found: dict[int, http.client.HTTPConnection] = {}
    spare: list[http.client.HTTPConnection] = []
    for _ in range(200):
        connection = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        connection.request("GET", "/pid")
        pid = int(connection.getresponse().read())
        if pid in found:
            spare.append(connection)
        else:
            found[pid] = connection
        if len(found) == count:
            break
    for connection in spare:
        connection.close()
    assert len(found) == count, f"reached only the workers {sorted(found)}"
    return found


def ask(connection: http.client.HTTPConnection, method: str, path: str,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection.request(method, path, body=b"" if method == "POST" else None,
                       headers=headers or {})
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def test_progress_and_cancel_cross_worker_processes(server_kind: str, tmp_path: Path) -> None:
    """Submit on one gunicorn worker, follow and cancel it from the other."""
    prefix = f"wsgi-async-mp-{secrets.token_hex(4)}:"
    if server_kind == "redis":
        require_redis()
        registry = f"{REDIS_URL}?prefix={prefix}"
    else:
        registry = f"sqlite:///{tmp_path / 'tasks.db'}"
    srv = Server(registry, tmp_path, "-w", "2", "--keep-alive", "60")
    connections: dict[int, http.client.HTTPConnection] = {}
    try:
        connections = connections_to_each_worker(srv, 2)
        (here, submitter), (there, follower) = connections.items()
        status, headers, _ = ask(submitter, "POST", "/follow")
        assert status == 202
        location = headers["Location"]
        task_id = location.rsplit("/", 1)[1]
        assert running_pid(tmp_path, task_id) == here
        deadline = time.monotonic() + 10
        progress = None
        while time.monotonic() < deadline:
            status, _, body = ask(follower, "GET", location)
            assert status == 202
            progress = json.loads(body)["progress"]
            if progress is not None and progress["current"] >= 3:
                break
            time.sleep(0.1)
        assert progress is not None and progress["message"].endswith(f"in {here}"), progress
        print(f"seen from worker {there}: {progress}")
        cancelled_at = time.time()
        status, _, _ = ask(follower, "DELETE", location)
        assert status == 204
        mark = tmp_path / f"{task_id}.cancelled"
        deadline = time.monotonic() + 10
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        noticed_at, pid = mark.read_text().split()
        latency = float(noticed_at) - cancelled_at
        print(f"worker {pid} noticed the cancel from worker {there} after {latency:.3f} s")
        assert int(pid) == here
        assert latency < 2.0  # "about a second": the handle checks every 0.5 s
        for connection in (submitter, follower):
            status, _, body = ask(connection, "GET", location)
            assert status == 410 and json.loads(body)["status"] == "cancelled"
        time.sleep(0.2)  # the late result was offered, and refused
        status, _, body = ask(submitter, "GET", location)
        assert status == 410 and json.loads(body)["status"] == "cancelled"
    finally:
        for connection in connections.values():
            connection.close()
        srv.stop()
        if server_kind == "redis":
            drop_keys(prefix)


@pytest.fixture(params=["sqlite", "redis"])
def server_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)
