"""Shared fixtures: registries of every backend, free ports, service checks.

A test that needs a service (Redis) skips with a reason when it is missing,
except under CI (``CI`` set), where a missing service is a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wsgi_async.registry import MemoryRegistry, Registry, TaskRecord

REDIS_URL = os.environ.get("WSGI_ASYNC_TEST_REDIS", "redis://127.0.0.1:6379/15")
IN_CI = bool(os.environ.get("CI"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--load", action="store_true",
                     help="also run the load tests (marked load; .ci/run does)")


def pytest_configure(config: pytest.Config) -> None:
    """With ``WSGI_ASYNC_COMPAT_JSON`` set, record the server and framework tests' outcomes
    there, for the README's compatibility table (tests/compat.py)."""
    path = os.environ.get("WSGI_ASYNC_COMPAT_JSON")
    if path:
        from compat import Recorder

        config.pluginmanager.register(Recorder(Path(path)), "wsgi-async-compat")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Load tests take minutes: they run with ``--load`` (as in .ci/run), else skip saying so."""
    if config.getoption("--load"):
        return
    skip = pytest.mark.skip(reason="a load test: run with --load (.ci/run does)")
    for item in items:
        if "load" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_redis(url: str = REDIS_URL) -> None:
    """Skip (locally) or fail (under CI) unless Redis answers at ``url``."""
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the install
        if IN_CI:
            pytest.fail(f"redis-py is not installed: {exc}")
        pytest.skip("redis-py is not installed (pip install 'wsgi-async[redis]')")
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"Redis is required under CI and is unreachable at {url}: {exc}")
        pytest.skip(f"Redis is unreachable at {url}: {exc}")


def make_registry(
    kind: str, tmp_path: Path, max_tasks: int = 10_000, tombstone_ttl: float = 86_400.0
) -> Registry:
    if kind == "memory":
        return MemoryRegistry(max_tasks=max_tasks, tombstone_ttl=tombstone_ttl)
    if kind == "sqlite":
        from wsgi_async.registry.sqlite import SQLiteRegistry

        return SQLiteRegistry(tmp_path / "tasks.db", max_tasks=max_tasks,
                              tombstone_ttl=tombstone_ttl)
    if kind == "redis":
        require_redis()
        from wsgi_async.registry.redis import RedisRegistry

        prefix = f"wsgi-async-test:{secrets.token_hex(6)}:"
        return RedisRegistry.from_url(REDIS_URL, max_tasks=max_tasks, prefix=prefix,
                                      tombstone_ttl=tombstone_ttl)
    raise AssertionError(kind)


def new_task(worker: str = "w1", **fields: Any) -> TaskRecord:
    """A queued task record held by ``worker``, with a fresh id."""
    return TaskRecord(id=secrets.token_urlsafe(16), route="^/r", worker=worker, **fields)


def on_read(registry: Registry, task_id: str, nth: int, action: Callable[[], object]) -> None:
    """Call ``action()`` right after the ``nth`` read of ``task_id`` through ``registry.get``.

    A long-poll reads its task once it listens for the task's completion (on
    SQLite the second read, after one read before it subscribes; on Redis the
    first), so that read tells a test that the waiter is really subscribed: a
    completion from then on can only reach it through the wake-up.
    """
    original = registry.get
    reads = 0

    def get(wanted: str) -> TaskRecord | None:
        nonlocal reads
        record = original(wanted)
        if wanted == task_id:
            reads += 1
            if reads == nth:
                action()
        return record

    registry.get = get  # type: ignore[method-assign]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def subscribed(registry: Any) -> bool:
    """Whether this process's Redis listener holds its subscription (PUBSUB NUMSUB)."""
    counts = dict(registry.client.pubsub_numsub(registry.prefix + "done"))
    return int(counts.get((registry.prefix + "done").encode(), 0)) >= 1


def start_listener(registry: Any) -> None:
    """Start the Redis registry's listener and wait until it is subscribed.

    A listener that subscribes wakes every waiter (it may have missed
    completions), which would rescue a lost wake-up: tests start it first.
    """
    registry.wait("no-such-task", 0)
    wait_until(lambda: subscribed(registry))


# Which read of a long-poll follows its subscription: on SQLite the second
# (one read comes before it subscribes), on Redis the first.
SUBSCRIBED_READ = {"sqlite": 2, "redis": 1}

BACKENDS = ["memory", "sqlite", "redis"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def registry(backend: str, tmp_path: Path) -> Iterator[Registry]:
    reg = make_registry(backend, tmp_path)
    yield reg
    _cleanup(reg)


def _cleanup(reg: Registry) -> None:
    prefix = getattr(reg, "prefix", None)
    client = getattr(reg, "client", None)
    if prefix and client is not None:
        for key in client.scan_iter(match=prefix + "*", count=500):
            client.delete(key)
    reg.close()


class RedisServer:
    """A throwaway ``redis-server`` on a loopback port that tests may stop and start.

    With ``data_dir`` it keeps an append-only file there, so its data survives
    a restart the way a production Redis's does; without, it keeps nothing.
    """

    def __init__(self, binary: str, port: int, data_dir: Path | None = None) -> None:
        self.binary = binary
        self.port = port
        self.data_dir = data_dir
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        persistence = ["--appendonly", "no"]
        if self.data_dir is not None:
            persistence = ["--appendonly", "yes", "--appendfsync", "always",
                           "--dir", str(self.data_dir)]
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        probe = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            deadline = time.monotonic() + 10
            while True:
                assert self.process.poll() is None, "redis-server exited"
                try:
                    probe.ping()
                    return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.02)
        finally:
            probe.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


def _redis_binary() -> str:
    require_redis()
    binary = shutil.which("redis-server")
    if binary is None:
        if IN_CI:
            pytest.fail("redis-server is required under CI")
        pytest.skip("redis-server is not installed")
    return binary


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A private Redis without persistence; never the shared one on 6379."""
    private = RedisServer(_redis_binary(), free_port())
    private.start()
    try:
        yield private
    finally:
        private.kill()


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis with an append-only file, so a restart keeps its data."""
    private = RedisServer(_redis_binary(), free_port(), tmp_path)
    private.start()
    try:
        yield private
    finally:
        private.kill()
