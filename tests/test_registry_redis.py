"""What only the Redis registry promises: cross-process wake-ups, surviving a
Redis restart, atomicity under contention, TTL-based expiry and its key layout."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    REDIS_URL,
    RedisServer,
    _cleanup,
    make_registry,
    new_task,
    on_read,
    require_redis,
    start_listener,
    subscribed,
    wait_until,
)
from wsgi_async.registry import (
    RegistryFull,
    RegistryUnavailable,
    RequestSnapshot,
    StoredResponse,
    TaskRecord,
    TaskStatus,
)

pytestmark = pytest.mark.redis

OK = StoredResponse("200 OK", (("Content-Type", "application/octet-stream"),), b"\x00ok\xff")
BOOM = StoredResponse("500 Internal Server Error", (("Content-Type", "text/plain"),), b"boom")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Any]:
    registry = make_registry("redis", tmp_path)
    yield registry
    _cleanup(registry)


# -- storage -------------------------------------------------------------------------


def test_every_field_round_trips(reg: Any) -> None:
    record = TaskRecord(
        id="t-" + secrets.token_hex(8),
        route="^/r\u00e9",
        created_at=1234.5678901,
        worker="w\u00e9",
        owner="o" * 64,
        fingerprint="f" * 64,
        replay=True,
        timeout=2.5,
        result_ttl=42.25,
    )
    snapshot = RequestSnapshot({"PATH_INFO": "/r"}, b"\x00")
    reg.create(record, snapshot, idempotency_key="k\u00e9")
    assert reg.get(record.id) == record  # every field, whatever is added later
    reg.start(record.id, "w\u00e9")
    assert reg.finish(record.id, "w\u00e9", TaskStatus.DONE, OK)
    got = reg.get(record.id)
    assert got.response == OK and got.attempts == 1 and got.fingerprint == "f" * 64
    assert got.started_at <= got.finished_at


def test_keys_expire_by_ttl(reg: Any) -> None:
    client, prefix = reg.client, reg.prefix
    snapshot = RequestSnapshot({"PATH_INFO": "/r"}, b"body")
    task = reg.create(new_task(replay=True, result_ttl=30), snapshot, idempotency_key="k")
    assert client.ttl(prefix + "task:" + task.id) == -1  # pending: kept
    assert client.exists(prefix + "request:" + task.id)
    assert client.smembers(prefix + "held:w1") == {task.id.encode()}
    assert client.zscore(prefix + "tasks", task.id) == float("inf")
    reg.start(task.id, "w1")
    reg.finish(task.id, "w1", TaskStatus.DONE, OK)
    assert 25 < client.ttl(prefix + "task:" + task.id) <= 30
    assert 25 < client.ttl(prefix + "key:k") <= 30
    assert not client.exists(prefix + "request:" + task.id)
    assert client.smembers(prefix + "held:w1") == set()
    assert client.zscore(prefix + "tasks", task.id) < float("inf")


def test_expire_trims_the_index(reg: Any) -> None:
    ids = []
    for _ in range(3):
        task = reg.create(new_task(result_ttl=0.1))
        reg.start(task.id, "w1")
        reg.finish(task.id, "w1", TaskStatus.DONE, OK)
        ids.append(task.id)
    reg.create(new_task())
    time.sleep(0.3)
    assert all(reg.get(i) is None for i in ids)  # gone by TTL already
    assert reg.expire(limit=2) == 2
    assert reg.expire() == 1
    assert reg.expire() == 0
    assert reg.client.zcard(reg.prefix + "tasks") == 1  # the pending one


def test_max_tasks_holds_under_contention(tmp_path: Path) -> None:
    registry = make_registry("redis", tmp_path, max_tasks=25)
    outcomes: list[str] = []
    lock = threading.Lock()

    def submit() -> None:
        for _ in range(10):
            try:
                registry.create(new_task())
                outcome = "created"
            except RegistryFull:
                outcome = "full"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert Counter(outcomes) == {"created": 25, "full": 55}
    finally:
        _cleanup(registry)


def test_options_are_validated() -> None:
    require_redis()
    from wsgi_async.registry.redis import RedisRegistry

    for kwargs, word in [
        ({"max_tasks": 0}, "max_tasks"),
        ({"prefix": ""}, "prefix"),
        ({"socket_timeout": 0}, "socket_timeout"),
        ({"connect_timeout": float("nan")}, "connect_timeout"),
    ]:
        with pytest.raises(ValueError, match=word):
            RedisRegistry.from_url(REDIS_URL, **kwargs)


def test_a_decoding_client_is_refused() -> None:
    require_redis()
    import redis

    from wsgi_async.registry.redis import RedisRegistry

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisRegistry(client)
    finally:
        client.close()


def test_import_error_names_the_extra() -> None:
    code = "import sys; sys.modules['redis'] = None; import wsgi_async.registry.redis"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode != 0
    assert "pip install 'wsgi-async[redis]'" in done.stderr


# -- contention ----------------------------------------------------------------------


def test_every_task_settles_exactly_once_under_stress(reg: Any) -> None:
    """Workers create/start/finish while other threads fail the same tasks."""
    created: list[str] = []
    wins: Counter[str] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(worker: str) -> None:
        try:
            for _ in range(40):
                task = reg.create(new_task(worker))
                with lock:
                    created.append(task.id)
                if reg.start(task.id, worker) is None:
                    continue  # failed before it started
                if reg.finish(task.id, worker, TaskStatus.DONE, OK):
                    with lock:
                        wins[task.id] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def kill(stop: threading.Event) -> None:
        seen = 0
        while not stop.is_set() or seen < len(created):
            with lock:
                batch = created[seen:]
            seen += len(batch)
            for task_id in batch:
                if reg.fail(task_id, BOOM):
                    with lock:
                        wins[task_id] += 1
            time.sleep(0.001)

    stop = threading.Event()
    workers = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(8)]
    killers = [threading.Thread(target=kill, args=(stop,)) for _ in range(2)]
    began = time.monotonic()
    for thread in workers + killers:
        thread.start()
    for thread in workers:
        thread.join(60)
    stop.set()
    for thread in killers:
        thread.join(60)
    elapsed = time.monotonic() - began
    assert not errors
    assert len(created) == 320
    assert all(wins[i] == 1 for i in created), "a task settled twice or never"
    statuses = Counter(reg.get(i).status for i in created)
    assert set(statuses) <= {TaskStatus.DONE, TaskStatus.FAILED}
    for i in range(8):
        assert reg.client.scard(reg.prefix + f"held:w{i}") == 0
    assert elapsed < 30


def test_concurrent_reapers_settle_each_task_once(reg: Any) -> None:
    reg.heartbeat("dead", 0.2)
    snapshot = RequestSnapshot({"PATH_INFO": "/r"}, b"again")
    replayable = {reg.create(new_task("dead", replay=True), snapshot).id for _ in range(20)}
    lost = {reg.create(new_task("dead")).id for _ in range(20)}
    for task_id in list(replayable)[:10] + list(lost)[:10]:
        reg.start(task_id, "dead")
    time.sleep(1.1)
    requeued: list[tuple[str, TaskRecord]] = []
    lock = threading.Lock()

    def reaper(name: str) -> None:
        reg.heartbeat(name, 30)
        for _ in range(20):
            got = reg.reap(name, limit=7)
            with lock:
                requeued.extend((name, record) for record in got)

    threads = [threading.Thread(target=reaper, args=(f"r{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    ids = [record.id for _, record in requeued]
    assert sorted(ids) == sorted(replayable)  # each returned once, to one reaper
    for name, record in requeued:
        assert record.status is TaskStatus.QUEUED and record.worker == name
        assert record.started_at is None
        assert reg.get(record.id).worker == name
        assert reg.client.sismember(reg.prefix + f"held:{name}", record.id)
    for task_id in lost:
        got = reg.get(task_id)
        assert got.status is TaskStatus.FAILED and b"worker_lost" in got.response.body
    assert reg.client.zscore(reg.prefix + "workers", "dead") is None
    assert not reg.client.exists(reg.prefix + "held:dead")


# -- wake-ups ------------------------------------------------------------------------


def _settler(url: str, prefix: str, conn: Connection) -> None:
    """In another process: settle each task id received once told, reporting when it began."""
    from wsgi_async.registry.redis import RedisRegistry

    registry = RedisRegistry.from_url(url, prefix=prefix)
    try:
        conn.send("ready")
        while conn.poll(30):
            message = conn.recv()
            if message is None:
                break
            task_id, how = message
            assert conn.poll(10) and conn.recv() == "go"  # the parent's waiter is subscribed
            began = time.monotonic()
            if how == "finish":
                done = registry.finish(task_id, "child", TaskStatus.DONE, OK)
            else:
                done = registry.fail(task_id, BOOM)
            conn.send((began, done))
    finally:
        registry.close()
        conn.close()


SUBSCRIBED = 1  # a wait listens for its task before its first read


@pytest.mark.parametrize("how", ["finish", "fail"])
def test_a_settle_in_another_process_wakes_the_waiter_within_50ms(reg: Any, how: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_settler, args=(REDIS_URL, reg.prefix, theirs), daemon=True)
    child.start()
    theirs.close()
    latencies: list[float] = []
    expected = TaskStatus.DONE if how == "finish" else TaskStatus.FAILED
    try:
        assert ours.poll(60) and ours.recv() == "ready"
        start_listener(reg)
        for _ in range(21):
            task = reg.create(new_task("child"))
            reg.start(task.id, "child")
            ours.send((task.id, how))
            on_read(reg, task.id, SUBSCRIBED, lambda: ours.send("go"))
            got = reg.wait(task.id, 5)  # one wait: a lost wake-up is not retried
            woke = time.monotonic()
            assert ours.poll(10)
            began, done = ours.recv()
            assert woke - began < 1, "woken by the wait's end, not by the completion"
            assert done and got is not None and got.status is expected
            latencies.append(woke - began)
        ours.send(None)
        child.join(10)
        assert child.exitcode == 0
    finally:
        ours.close()
        stop(child)
    median = statistics.median(latencies)
    assert median < 0.05, f"median wake-up {median * 1000:.1f} ms: {latencies}"


def test_delete_and_close_wake_waiters(reg: Any) -> None:
    deleted = reg.create(new_task())
    pending = reg.create(new_task())
    outcome: dict[str, Any] = {}
    subscribed = threading.Semaphore(0)
    for task in (deleted, pending):
        on_read(reg, task.id, SUBSCRIBED, subscribed.release)
    start_listener(reg)

    def waiter(task_id: str) -> None:
        began = time.monotonic()
        outcome[task_id] = (reg.wait(task_id, 10), time.monotonic() - began)

    threads = [threading.Thread(target=waiter, args=(t.id,)) for t in (deleted, pending)]
    for thread in threads:
        thread.start()
    assert subscribed.acquire(timeout=5) and subscribed.acquire(timeout=5)
    reg.delete(deleted.id)
    threads[0].join(5)
    assert outcome[deleted.id][0] is None and outcome[deleted.id][1] < 1
    reg.close()
    threads[1].join(5)
    record, elapsed = outcome[pending.id]
    assert record.status is TaskStatus.QUEUED and elapsed < 1


def stop(child: Any) -> None:
    """Kill ``child`` if it is still running, and release it."""
    if child.is_alive():
        child.kill()
        child.join(5)
    child.close()


def subscribers(registry: Any) -> int:
    """How many listeners (one per process) hold the registry's subscription."""
    counts = dict(registry.client.pubsub_numsub(registry.prefix + "done"))
    return int(counts.get((registry.prefix + "done").encode(), 0))


def _wait_in_fork(registry: Any, task_id: str, conn: Connection) -> None:
    conn.send("ready")
    registry.wait("no-such-task", 0)  # starts this process's own listener...
    wait_until(lambda: subscribers(registry) >= 2)  # ...beside the parent's
    on_read(registry, task_id, SUBSCRIBED, lambda: conn.send("waiting"))
    got = registry.wait(task_id, 10)
    conn.send(None if got is None else got.status.value)
    conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads (3.12+)
def test_a_forked_child_starts_its_own_listener(reg: Any) -> None:
    start_listener(reg)  # the parent's thread, which the child will not inherit
    task = reg.create(new_task())
    reg.start(task.id, "w1")
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_wait_in_fork, args=(reg, task.id, theirs), daemon=True)
    child.start()
    theirs.close()
    try:
        assert ours.poll(10) and ours.recv() == "ready"
        assert ours.poll(10) and ours.recv() == "waiting"  # subscribed, blocked in wait()
        began = time.monotonic()
        reg.finish(task.id, "w1", TaskStatus.DONE, OK)
        assert ours.poll(5), "the forked child was not woken"
        assert ours.recv() == "done"
        assert time.monotonic() - began < 1
        child.join(10)
    finally:
        ours.close()
        stop(child)



def test_the_registry_survives_a_redis_restart(private_redis: RedisServer) -> None:
    from wsgi_async.registry.redis import RedisRegistry

    registry = RedisRegistry.from_url(private_redis.url, prefix="restart:", connect_timeout=0.5)
    try:
        start_listener(registry)
        task = registry.create(new_task())
        registry.start(task.id, "w1")
        outcome: list[BaseException | TaskRecord | None] = []
        waiting = threading.Event()
        on_read(registry, task.id, SUBSCRIBED, waiting.set)
        waiter = threading.Thread(target=lambda: outcome.append(_catch(registry, task.id)))
        waiter.start()
        assert waiting.wait(5)

        private_redis.kill()
        waiter.join(5)
        assert not waiter.is_alive(), "a waiter was left blocked on a dead Redis"
        assert isinstance(outcome[0], RegistryUnavailable)
        with pytest.raises(RegistryUnavailable, match="unavailable"):
            registry.create(new_task())
        with pytest.raises(RegistryUnavailable):
            registry.get(task.id)
        with pytest.raises(RegistryUnavailable):
            registry.wait(task.id, 1)
        with pytest.raises(RegistryUnavailable):
            registry.finish(task.id, "w1", TaskStatus.DONE, OK)

        private_redis.start()  # same port, empty, no scripts loaded
        assert registry.get(task.id) is None
        registry.heartbeat("w1", 30)
        wait_until(lambda: subscribed(registry))
        for _ in range(5):
            again = registry.create(new_task())
            assert registry.start(again.id, "w1") is not None
            # Finished once the wait listens: only the wake-up can end it early.
            on_read(registry, again.id, SUBSCRIBED,
                    lambda task_id=again.id: registry.finish(task_id, "w1", TaskStatus.DONE, OK))
            began = time.monotonic()
            got = registry.wait(again.id, 5)
            assert got is not None and got.status is TaskStatus.DONE
            assert time.monotonic() - began < 0.5
        assert registry.reap("w1") == [] and registry.expire() == 0
        assert registry.fail(registry.create(new_task()).id, BOOM)
        assert registry.delete(again.id)
    finally:
        registry.close()


def test_no_command_scans_the_keyspace(private_redis: RedisServer) -> None:
    from wsgi_async.registry.redis import RedisRegistry

    registry = RedisRegistry.from_url(private_redis.url, max_tasks=50)
    try:
        registry.heartbeat("gone", 0.05)
        snapshot = RequestSnapshot({"PATH_INFO": "/r"}, b"")
        registry.create(new_task("gone", replay=True), snapshot, idempotency_key="k")
        registry.create(new_task("gone"))
        task = registry.create(new_task(result_ttl=0.05))
        registry.start(task.id, "w1")
        registry.finish(task.id, "w1", TaskStatus.DONE, OK)
        registry.wait(task.id, 1)
        registry.fail(registry.create(new_task()).id, BOOM)
        time.sleep(0.1)
        assert len(registry.reap("w1")) == 1
        registry.expire()
        registry.delete(task.id)
        registry.retire("w1")
        stats = registry.client.info("commandstats")
        used = {name.removeprefix("cmdstat_") for name in stats}
        assert {"evalsha", "zremrangebyscore", "publish"} <= used
        assert not used & {"keys", "scan", "sscan", "hscan", "zscan"}, used
    finally:
        registry.close()


def _catch(registry: Any, task_id: str) -> BaseException | TaskRecord | None:
    try:
        result: TaskRecord | None = registry.wait(task_id, 10)
        return result
    except BaseException as exc:
        return exc


# -- lost replies ----------------------------------------------------------------------


class ReplyDropper:
    """A TCP proxy to Redis that, when armed, cuts a connection instead of passing on
    the reply to the next ``EVALSHA`` of one script: the script ran, its reply was lost,
    and redis-py sends the command again on a new connection."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed: bytes | None = None
        self.dropped = 0
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_reply_to(self, script: str) -> None:
        self.armed = hashlib.sha1(script.encode()).hexdigest().encode()

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            cut = threading.Event()
            with self.lock:
                self.sockets += [client, server]
            threading.Thread(target=self._requests, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client, cut), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        with suppress(OSError):
            while data := client.recv(65536):
                if self.armed and b"EVALSHA" in data and self.armed in data:
                    self.armed = None
                    cut.set()
                server.sendall(data)

    def _replies(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        with suppress(OSError):
            while data := server.recv(65536):
                if cut.is_set():  # the reply is lost with the connection
                    self.dropped += 1
                    break
                client.sendall(data)
        for sock in (client, server):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def dropper(private_redis: RedisServer) -> Iterator[tuple[Any, ReplyDropper]]:
    from wsgi_async.registry.redis import RedisRegistry

    proxy = ReplyDropper(private_redis.port)
    registry = RedisRegistry.from_url(f"redis://127.0.0.1:{proxy.port}/0", prefix="lost:")
    try:
        warm = registry.create(new_task())  # loads the scripts: no NOSCRIPT round trips
        registry.start(warm.id, "w1")
        registry.finish(warm.id, "w1", TaskStatus.DONE, OK)
        yield registry, proxy
    finally:
        registry.close()
        proxy.close()


def test_a_lost_reply_to_start_still_starts_the_task(dropper: tuple[Any, ReplyDropper]) -> None:
    from wsgi_async.registry.redis_scripts import PREAMBLE, START

    registry, proxy = dropper
    task = registry.create(new_task())
    proxy.drop_reply_to(PREAMBLE + START)
    started = registry.start(task.id, "w1")  # ran twice: redis-py re-sent it
    assert proxy.dropped == 1
    assert started is not None and started.status is TaskStatus.RUNNING
    assert started.attempts == 1
    assert registry.start(task.id, "w1") is None  # another start is still refused
    assert registry.finish(task.id, "w1", TaskStatus.DONE, OK)


def test_a_lost_reply_to_finish_still_reports_it_stored(dropper: tuple[Any, ReplyDropper]) -> None:
    from wsgi_async.registry.redis_scripts import FINISH, PREAMBLE

    registry, proxy = dropper
    task = registry.create(new_task())
    registry.start(task.id, "w1")
    proxy.drop_reply_to(PREAMBLE + FINISH)
    assert registry.finish(task.id, "w1", TaskStatus.DONE, OK) is True
    assert proxy.dropped == 1
    assert registry.get(task.id).response == OK
    assert registry.finish(task.id, "w1", TaskStatus.DONE, BOOM) is False  # a late one is not


def test_a_lost_reply_to_reap_still_hands_the_task_over(dropper: tuple[Any, ReplyDropper]) -> None:
    from wsgi_async.registry.redis_scripts import PREAMBLE, REAP

    registry, proxy = dropper
    registry.heartbeat("dead", 0.05)
    snapshot = RequestSnapshot({"PATH_INFO": "/r"}, b"again")
    task = registry.create(new_task("dead", replay=True), snapshot)
    registry.start(task.id, "dead")
    time.sleep(0.2)
    proxy.drop_reply_to(PREAMBLE + REAP)
    requeued = registry.reap("alive")
    assert proxy.dropped == 1
    assert [r.id for r in requeued] == [task.id]  # else queued under "alive", never run
    assert registry.start(task.id, "alive").attempts == 2
