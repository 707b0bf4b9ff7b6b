"""The Redis registry: tasks shared by every process on every host.

Keys (all under ``prefix``)::

    task:<id>       hash   the record; body as raw bytes, headers as JSON
    request:<id>    string the RequestSnapshot JSON of a pending replayable task
    key:<key>       string idempotency key -> task id
    void:<id>       string a create that failed and was given up (a day)
    tasks           zset   task ids by expiry time (+inf while pending)
    workers         zset   worker ids by lease expiry
    beat            string when a lease was last renewed (by anyone)
    grace           string no reaping before this time (after an outage)
    held:<worker>   set    ids of the pending tasks a worker holds
    stream:<route>  stream the queue of a route (executor="workers"), consumer group
                    ``workers``; an entry is acknowledged and deleted when its task ends
    queued          string how many tasks of the queue wait for a worker (max_queued)
    gone:<id>       string "<why> <owner>": a task's tombstone, laid when it settles (TTL:
                           result_ttl + tombstone_ttl) or is deleted (tombstone_ttl)
    gone            zset   tombstone ids by expiry: at most max_tasks, the oldest dropped
    done            channel ids of tasks that settled or were deleted

Every transition is one Lua script (in :mod:`.redis_scripts`), so it is atomic
and conditional, and it reads the clock with ``TIME`` so that leases and expiry
follow the server's clock, not the hosts'.  Finished tasks vanish by TTL; the
``tasks`` index only counts them for ``max_tasks``.  Nothing ever scans the keyspace.

``wait`` never polls: each process runs one subscriber thread (in
:mod:`.redis_wakeups`) that wakes its local waiters when a task id is published
on ``done``.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, cast

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the Redis registry needs redis-py: pip install 'wsgi-async[redis]'"
    ) from exc

from ..errors import MaybeWritten
from . import redis_scripts as lua
from .base import (
    TOMBSTONE_TTL,
    Capabilities,
    Claimed,
    QueueFull,
    RegistryError,
    RegistryFull,
    RegistryUnavailable,
    RequestSnapshot,
    StoredResponse,
    TaskRecord,
    TaskStatus,
    Tombstone,
    check_tombstone_ttl,
    lost_worker_response,
    require_final,
)
from .redis_wakeups import Listener

__all__ = ["RedisRegistry"]

#: How long a failed create's mark keeps a late run of it from storing the task.
VOID_SECONDS = 86_400

# Errors that mean "Redis cannot be reached right now" (BusyLoadingError is a
# ConnectionError; READONLY is what a demoted primary answers after failover).
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)
# The longest blocking read of the queue: well within the client's socket timeout.
MAX_BLOCK = 2.0
# Consumers (worker processes) that hold nothing and read nothing for this long are
# dropped from the group; a live one that reads again is simply made anew.
PRUNE_AFTER = 600.0


class RedisRegistry:
    """Registry in Redis (``redis://``, ``rediss://``, ``unix://``).

    ``client`` must return bytes (no ``decode_responses``).  One instance is
    shared by the threads of a process; ``close`` releases its connections.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(
        shared=True, queue=True, blocking_wait=True
    )

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "wsgi-async:",
        max_tasks: int = 10_000,
        tombstone_ttl: float = TOMBSTONE_TTL,
    ) -> None:
        _check_options(prefix, max_tasks)
        check_tombstone_ttl(tombstone_ttl)
        # The last two arguments of every script that settles or deletes a task.
        self._tombstones = [str(math.ceil(tombstone_ttl * 1000)), str(max_tasks)]
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("client: decode_responses must be False (bodies are raw bytes)")
        self.client = client
        self.prefix = prefix
        self.max_tasks = max_tasks
        self._channel = prefix + "done"
        self._where = _describe(client)
        self._closed = False
        self._listener: Listener | None = None
        script = client.register_script
        self._create = script(lua.PREAMBLE + lua.CREATE)
        self._start = script(lua.PREAMBLE + lua.START)
        self._finish = script(lua.PREAMBLE + lua.FINISH)
        self._fail = script(lua.PREAMBLE + lua.FAIL)
        self._progress = script(lua.PREAMBLE + lua.PROGRESS)
        self._delete = script(lua.PREAMBLE + lua.DELETE)
        self._heartbeat = script(lua.PREAMBLE + lua.HEARTBEAT)
        self._dead = script(lua.PREAMBLE + lua.DEAD)
        self._reap = script(lua.PREAMBLE + lua.REAP)
        self._expire = script(lua.PREAMBLE + lua.EXPIRE)
        self._recover = script(lua.PREAMBLE + lua.RECOVER)
        self._claim = script(lua.PREAMBLE + lua.CLAIM)
        self._prune = script(lua.PREAMBLE + lua.PRUNE)
        self._groups: set[str] = set()  # streams whose consumer group this process made
        self._next_autoclaim = 0.0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_tasks: int = 10_000,
        prefix: str = "wsgi-async:",
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        tombstone_ttl: float = TOMBSTONE_TTL,
    ) -> RedisRegistry:
        """Open ``url`` with a client that fails fast when Redis is down.

        A call retries once on a connection error (a pooled connection that
        died with a restarted server) and never on a timeout, so a script is
        not run twice behind the caller's back.
        """
        _check_options(prefix, max_tasks)
        timeouts = {"socket_timeout": socket_timeout, "connect_timeout": connect_timeout}
        for name, value in timeouts.items():
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        try:
            return cls(client, prefix=prefix, max_tasks=max_tasks, tombstone_ttl=tombstone_ttl)
        except BaseException:
            client.close()
            raise

    # -- creation and lookup -------------------------------------------------

    def create(
        self,
        record: TaskRecord,
        request: RequestSnapshot | None = None,
        idempotency_key: str | None = None,
    ) -> TaskRecord:
        return self._insert(record, request, idempotency_key, None)

    def _insert(
        self,
        record: TaskRecord,
        request: RequestSnapshot | None,
        idempotency_key: str | None,
        max_queued: int | None,
    ) -> TaskRecord:
        if math.isnan(record.result_ttl):
            raise ValueError(f"result_ttl must be a number of seconds, got {record.result_ttl!r}")
        if max_queued is not None:  # on the queue: no one holds it yet
            record = record.copy()
            record.worker = None
        fields = lua.encode(record, idempotency_key)
        body = fields.pop("body", b"")
        args: list[str | bytes | int] = [
            self.prefix,
            record.id,
            self.max_tasks,
            "" if idempotency_key is None else "k" + idempotency_key,
            "" if request is None else request.to_json(),
            lua.FIELDS_JSON(fields),
            body,
            "" if max_queued is None else max_queued,
        ]
        with self._guard("create a task", sent_write=True):
            reply = self._create(keys=[self._task(record.id)], args=args)
        if reply[0] == b"void":  # settled by recover(): this call had already failed
            raise RegistryUnavailable(f"task {record.id} was given up after a failed create")
        if reply[0] == b"full":
            raise RegistryFull(f"the registry holds its maximum of {self.max_tasks} tasks")
        if reply[0] == b"busy":
            raise QueueFull(f"max_queued ({max_queued}) tasks wait for a worker")
        if reply[0] == b"existing":
            return lua.decode(lua.pairs(reply[1]))
        return record.copy()

    def recover(self, task_id: str) -> TaskRecord | None:
        """After a create of ``task_id`` that raised :class:`MaybeWritten`: the task if
        Redis stored it after all, else ``None``, and a late run of that create (still
        in a stalled server's buffers) will store nothing."""
        with self._guard("recover a task"):
            reply = self._recover(keys=[self._task(task_id)],
                                  args=[self.prefix, task_id, VOID_SECONDS])
        return lua.decode(lua.pairs(reply)) if reply else None

    # -- the queue: Redis Streams, one per route, one consumer group --------------

    def enqueue(
        self,
        record: TaskRecord,
        request: RequestSnapshot,
        idempotency_key: str | None = None,
        *,
        max_queued: int,
    ) -> TaskRecord:
        """``create``, plus an ``XADD`` to the route's stream, in the same script."""
        return self._insert(record, request, idempotency_key, max_queued)

    def claim(
        self, worker: str, routes: Sequence[str], limit: int, wait: float, lease: float
    ) -> list[Claimed]:
        """Read new entries (``XREADGROUP``, blocking) or a lost consumer's (``XAUTOCLAIM``).

        Each entry then becomes a claim in one script that makes ``worker`` the
        task's holder; the entry stays pending (unacknowledged) until the
        task's final state is stored.  ``worker`` is the consumer's name.
        """
        if limit < 1 or not routes:
            return []
        streams = [self.prefix + "stream:" + route for route in routes]
        with self._guard("claim tasks"):
            self._make_groups(streams)
            entries = self._autoclaim(worker, streams, limit, lease)
            if not entries:
                entries = self._read(worker, streams, limit, wait)
            if not entries:
                return []
            with self.client.pipeline(transaction=False) as pipe:
                for stream, entry, task_id in entries:
                    self._claim(keys=[self._task(task_id)],
                                args=[self.prefix, task_id, entry, stream, worker], client=pipe)
                replies = pipe.execute()
        claimed = []
        for reply in replies:
            if not isinstance(reply, list):
                continue
            record = lua.decode(lua.pairs(reply[0]))
            if reply[1] is None:  # cannot happen through enqueue; never run blind
                self.fail(record.id, lost_worker_response(record.id))
                continue
            claimed.append(Claimed(record, RequestSnapshot.from_json(reply[1])))
        return claimed

    def queued(self) -> int:
        with self._guard("count queued tasks"):
            return int(cast("bytes | None", self.client.get(self.prefix + "queued")) or 0)

    def _make_groups(self, streams: list[str]) -> None:
        for stream in streams:
            if stream in self._groups:
                continue
            try:
                self.client.xgroup_create(stream, lua.GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups.add(stream)

    def _autoclaim(
        self, worker: str, streams: list[str], limit: int, lease: float
    ) -> list[tuple[str, str, str]]:
        """Entries pending longer than ``lease`` for a consumer (a lost worker), at most
        once per third of ``lease`` per process."""
        now = time.monotonic()
        if now < self._next_autoclaim:
            return []
        self._next_autoclaim = now + lease / 3
        found: list[tuple[str, str, str]] = []
        for stream in streams:
            self._prune(keys=[stream], args=[self.prefix, worker, int(PRUNE_AFTER * 1000)])
            reply = self.client.xautoclaim(stream, lua.GROUP, worker,
                                           min_idle_time=max(1, int(lease * 1000)),
                                           start_id="0-0", count=limit - len(found))
            found.extend(_entries(stream, reply[1]))
            if len(found) >= limit:
                break
        return found

    def _read(
        self, worker: str, streams: list[str], limit: int, wait: float
    ) -> list[tuple[str, str, str]]:
        # Never block past the socket timeout; 0 would block forever in XREADGROUP.
        block = int(min(wait, MAX_BLOCK) * 1000)
        try:
            reply = self.client.xreadgroup(lua.GROUP, worker, dict.fromkeys(streams, ">"),
                                           count=limit, block=block if block > 0 else None)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._groups.clear()  # the stream was deleted: make the groups again next time
            return []
        found: list[tuple[str, str, str]] = []
        for stream, items in cast("list[tuple[bytes, Any]]", reply or []):
            found.extend(_entries(stream.decode(), items))
        return found

    def get(self, task_id: str) -> TaskRecord | None:
        with self._guard("read a task"):
            fields = cast("dict[bytes, bytes]", self.client.hgetall(self._task(task_id)))
        return lua.decode(fields) if fields else None

    def request(self, task_id: str) -> RequestSnapshot | None:
        with self._guard("read a request"):
            data = self.client.get(self.prefix + "request:" + task_id)
        return None if data is None else RequestSnapshot.from_json(data)

    # -- transitions ---------------------------------------------------------

    def start(self, task_id: str, worker: str) -> TaskRecord | None:
        with self._guard("start a task"):
            reply = self._start(keys=[self._task(task_id)], args=[self.prefix, worker, _token()])
        if reply is None:
            return None
        return lua.decode_json(reply) if isinstance(reply, bytes) else lua.decode(lua.pairs(reply))

    def finish(
        self, task_id: str, worker: str, status: TaskStatus, response: StoredResponse
    ) -> bool:
        require_final(status)
        args: list[str | bytes] = [
            self.prefix, task_id, worker, status.value, response.headers_json(), response.body,
            _token(), *self._tombstones,
        ]
        with self._guard("finish a task"):
            return bool(self._finish(keys=[self._task(task_id)], args=args))

    def fail(self, task_id: str, response: StoredResponse) -> bool:
        return self._settle_pending(task_id, response, TaskStatus.FAILED)

    def cancel(self, task_id: str, response: StoredResponse) -> bool:
        return self._settle_pending(task_id, response, TaskStatus.CANCELLED)

    def _settle_pending(self, task_id: str, response: StoredResponse, status: TaskStatus) -> bool:
        args: list[str | bytes] = [
            self.prefix, task_id, response.headers_json(), response.body, status.value,
            *self._tombstones,
        ]
        with self._guard("fail a task" if status is TaskStatus.FAILED else "cancel a task"):
            return bool(self._fail(keys=[self._task(task_id)], args=args))

    def progress(self, task_id: str, worker: str, document: dict[str, object]) -> bool:
        args = [self.prefix, worker, lua.FIELDS_JSON(document)]
        with self._guard("store progress"):
            return bool(self._progress(keys=[self._task(task_id)], args=args))

    def is_running(self, task_id: str, worker: str) -> bool:
        with self._guard("read a task"):
            status, holder = self.client.hmget(self._task(task_id), "status", "worker")
        return status == b"running" and holder == worker.encode()

    def wait(self, task_id: str, timeout: float) -> TaskRecord | None:
        """Block until the task settles, woken through pub/sub, never by polling."""
        return self.wait_if(task_id, timeout, None)

    def wait_if(
        self, task_id: str, timeout: float, accept: Callable[[TaskRecord], bool] | None
    ) -> TaskRecord | None:
        """:meth:`wait`, but ``None`` at once if the first read is not accepted.

        Lets a caller check a task (its owner) and wait for it in one read.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        listener = self._listener_here()
        if listener is None:  # closed: answer without blocking
            record = self.get(task_id)
            return None if record is None or (accept and not accept(record)) else record
        # Interest is registered before each read, so a completion that lands
        # after the read sets the event and the wait below returns at once.
        with listener.watch(task_id) as woken:
            record = self.get(task_id)
            if record is None or (accept is not None and not accept(record)):
                return None
            while True:
                remaining = deadline - time.monotonic()
                if record.status.is_final or remaining <= 0:
                    return record
                woken.wait(remaining)
                if self._closed:  # close() woke us: answer with what we have
                    return record
                woken.clear()
                latest = self.get(task_id)
                if latest is None:
                    return None
                record = latest

    def delete(self, task_id: str) -> bool:
        args = [self.prefix, task_id, *self._tombstones]
        with self._guard("delete a task"):
            return bool(self._delete(keys=[self._task(task_id)], args=args))

    def gone(self, task_id: str) -> Tombstone | None:
        with self._guard("read a tombstone"):
            value = self.client.get(self.prefix + "gone:" + task_id)
        if value is None:
            return None
        status, _, owner = cast("bytes", value).decode("utf-8").partition(" ")
        return Tombstone(task_id, status, owner or None)

    # -- leases --------------------------------------------------------------

    def heartbeat(self, worker: str, lease: float) -> None:
        if not (isinstance(lease, (int, float)) and math.isfinite(lease)):
            raise ValueError(f"lease must be a number of seconds, got {lease!r}")
        with self._guard("renew a lease"):
            self._heartbeat(args=[self.prefix, worker, repr(float(lease))])

    def retire(self, worker: str) -> None:
        with self._guard("retire a worker"):
            self.client.zrem(self.prefix + "workers", worker)

    def reap(self, worker: str, limit: int = 100) -> list[TaskRecord]:
        """Pick tasks of dead workers, then settle each in its own script.

        Two steps because a lost task's stored 500 names its id and is built
        here; reapers racing on a task are safe, only one removes it from the
        dead worker's held set.  The settling scripts go in one pipeline.
        """
        if limit < 1:
            return []
        with self._guard("reap lost tasks"):
            batches = self._dead(args=[self.prefix, worker, limit])
            if not batches:
                return []
            token = _token()
            with self.client.pipeline(transaction=False) as pipe:
                for dead, ids in batches:
                    for raw in ids:
                        task_id = raw.decode()
                        lost = lost_worker_response(task_id)
                        args: list[str | bytes] = [
                            self.prefix, raw, dead, worker, lost.headers_json(), lost.body, token,
                            *self._tombstones,
                        ]
                        self._reap(keys=[self._task(task_id)], args=args, client=pipe)
                replies = pipe.execute()
        return [lua.decode(lua.pairs(reply)) for reply in replies if isinstance(reply, list)]

    # -- expiry --------------------------------------------------------------

    def expire(self, limit: int = 1000) -> int:
        """Trim the index; the tasks' keys are already gone by TTL."""
        if limit < 1:
            return 0
        with self._guard("expire tasks"):
            return int(self._expire(args=[self.prefix, limit]))

    def close(self) -> None:
        """Stop this process's listener (waking its waiters) and disconnect."""
        with _start_lock:
            self._closed = True
            listener, self._listener = self._listener, None
        if listener is not None and listener.pid == os.getpid():
            listener.stop()
        self.client.close()

    # -- internals -----------------------------------------------------------

    def _task(self, task_id: str) -> str:
        return self.prefix + "task:" + task_id

    def _listener_here(self) -> Listener | None:
        """This process's listener, started on first use and again after a fork."""
        listener = self._listener
        if listener is not None and listener.pid == os.getpid():
            return listener
        with _start_lock:
            if self._closed:
                return None
            listener = self._listener
            if listener is None or listener.pid != os.getpid():
                # A forked child inherits the object but not the parent's thread.
                listener = self._listener = Listener(self.client, self._channel, self._where)
            return listener

    @contextmanager
    def _guard(self, action: str, sent_write: bool = False) -> Iterator[None]:
        """Turn redis-py errors into registry errors.

        With ``sent_write``, an error after connecting (the command may have been
        read, and may yet run) is :class:`MaybeWritten`.
        """
        try:
            yield
        except _UNAVAILABLE as exc:
            if sent_write and "onnecting to" not in str(exc):  # redis-py's connect errors
                raise MaybeWritten(
                    f"Redis registry at {self._where} stopped answering, cannot {action} "
                    f"(it may still be stored): {exc}"
                ) from exc
            raise RegistryUnavailable(
                f"Redis registry at {self._where} is unavailable, cannot {action}: {exc}"
            ) from exc
        except redis.RedisError as exc:
            raise RegistryError(f"Redis registry at {self._where}: cannot {action}: {exc}") from exc


# Guards starting listeners; recreated in a forked child, where it may have
# been copied while held.
_start_lock = threading.Lock()


def _reset_start_lock() -> None:
    global _start_lock
    _start_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_start_lock)


def _token() -> str:
    """Names one call of a script, so that the same call re-sent is recognised."""
    return secrets.token_hex(8)


def _entries(stream: str, items: Any) -> list[tuple[str, str, str]]:
    """``(stream, entry id, task id)`` of stream entries as redis-py gives them."""
    found = []
    for entry, fields in items:
        if not fields or b"id" not in fields:  # deleted meanwhile
            continue
        found.append((stream, entry.decode(), fields[b"id"].decode()))
    return found


def _check_options(prefix: str, max_tasks: int) -> None:
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    if not isinstance(max_tasks, int) or isinstance(max_tasks, bool) or max_tasks < 1:
        raise ValueError(f"max_tasks must be at least 1, got {max_tasks!r}")


def _describe(client: redis.Redis) -> str:
    """Where the client points, for error messages (never the password)."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix:{kwargs['path']} db {kwargs.get('db', 0)}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"

