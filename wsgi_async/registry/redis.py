"""The Redis registry: tasks shared by every process on every host.

Keys (all under ``prefix``)::

    task:<id>       hash   the record; body as raw bytes, headers as JSON
    request:<id>    string the RequestSnapshot JSON of a pending replayable task
    key:<key>       string idempotency key -> task id
    tasks           zset   task ids by expiry time (+inf while pending)
    workers         zset   worker ids by lease expiry
    held:<worker>   set    ids of the pending tasks a worker holds
    done            channel ids of tasks that settled or were deleted

Every transition is one Lua script, so it is atomic and conditional, and it
reads the clock with ``TIME`` so that leases and expiry follow the server's
clock, not the hosts'.  Finished tasks vanish by TTL; the ``tasks`` index only
counts them for ``max_tasks``.  Nothing ever scans the keyspace.

``wait`` never polls: each process runs one subscriber thread that wakes its
local waiters when a task id is published on ``done``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, cast

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the Redis registry needs redis-py: pip install 'wsgi-async[redis]'"
    ) from exc

from .base import (
    RegistryError,
    RegistryFull,
    RegistryUnavailable,
    RequestSnapshot,
    StoredResponse,
    TaskRecord,
    TaskStatus,
    lost_worker_response,
    require_final,
)

__all__ = ["RedisRegistry"]

log = logging.getLogger(__name__)

# Errors that mean "Redis cannot be reached right now" (BusyLoadingError is a
# ConnectionError; READONLY is what a demoted primary answers after failover).
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)

_POLL = 0.2  # how often the listener checks whether it should stop
_PING_EVERY = 10.0  # ping an idle subscription this often...
_PONG_WITHIN = 5.0  # ...and reconnect if nothing answers within this
_BACKOFF_MIN = 0.05  # listener reconnection delay, doubled up to
_BACKOFF_MAX = 1.0

# -- Lua ---------------------------------------------------------------------
# Every script gets the key prefix as ARGV[1].  Inputs are validated in Python
# first: Redis does not roll a script back when it fails half-way.

_PREAMBLE = """
local P = ARGV[1]
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function stamp(x) return string.format('%.6f', x) end

-- Store a final state, drop the task's bookkeeping, start its TTL, announce it.
local function settle(id, status, headers, body)
  local task = P .. 'task:' .. id
  local now = clock()
  local f = redis.call('HMGET', task, 'worker', 'idem', 'result_ttl')
  redis.call('HSET', task, 'status', status, 'headers', headers, 'body', body,
             'finished_at', stamp(now))
  if f[1] then redis.call('SREM', P .. 'held:' .. f[1], id) end
  redis.call('DEL', P .. 'request:' .. id)
  local ttl = tonumber(f[3])
  if ttl == math.huge then
    redis.call('ZADD', P .. 'tasks', '+inf', id)
  else
    local ms = string.format('%d', math.ceil(ttl * 1000))
    redis.call('ZADD', P .. 'tasks', stamp(now + ttl), id)
    if f[2] and redis.call('GET', P .. 'key:' .. f[2]) == id then
      redis.call('PEXPIRE', P .. 'key:' .. f[2], ms)
    end
    redis.call('PEXPIRE', task, ms)
  end
  redis.call('PUBLISH', P .. 'done', id)
end
"""

# The record's text fields travel as one JSON object: every argument costs the
# client as much as a short round trip's worth of packing.
# KEYS: task.  ARGV: prefix, id, max_tasks, 'k' .. key or '', request or '',
# fields (JSON object of strings), body (stored only when the fields have headers).
_CREATE = """
local id, has_key = ARGV[2], ARGV[4] ~= ''
local key = string.sub(ARGV[4], 2)
if has_key then
  local existing = redis.call('GET', P .. 'key:' .. key)
  if existing then
    local fields = redis.call('HGETALL', P .. 'task:' .. existing)
    if #fields > 0 then return {'existing', fields} end
  end
end
local index = P .. 'tasks'
redis.call('ZREMRANGEBYSCORE', index, '-inf', stamp(clock()))
if redis.call('ZCARD', index) >= tonumber(ARGV[3]) then return {'full'} end
local fields = cjson.decode(ARGV[6])
local flat = {}
for name, value in pairs(fields) do
  flat[#flat + 1] = name
  flat[#flat + 1] = value
end
if fields['headers'] then
  flat[#flat + 1] = 'body'
  flat[#flat + 1] = ARGV[7]
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('ZADD', index, '+inf', id)
if ARGV[5] ~= '' then redis.call('SET', P .. 'request:' .. id, ARGV[5]) end
if has_key then redis.call('SET', P .. 'key:' .. key, id) end
if fields['worker'] then redis.call('SADD', P .. 'held:' .. fields['worker'], id) end
return {'created'}
"""

# KEYS: task.  ARGV: prefix, worker.
_START = """
local s = redis.call('HMGET', KEYS[1], 'status', 'worker')
if s[1] ~= 'queued' or s[2] ~= ARGV[2] then return false end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', stamp(clock()))
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
-- The text fields as one JSON object: far cheaper for the client to read than a
-- flat list (the raw body, if any, cannot travel in JSON: then the flat list).
local flat = redis.call('HGETALL', KEYS[1])
local t = {}
for i = 1, #flat, 2 do
  if flat[i] == 'body' then return flat end
  t[flat[i]] = flat[i + 1]
end
return cjson.encode(t)
"""

# KEYS: task.  ARGV: prefix, id, worker, status, headers, body.
_FINISH = """
local s = redis.call('HMGET', KEYS[1], 'status', 'worker')
if s[1] ~= 'running' or s[2] ~= ARGV[3] then return 0 end
settle(ARGV[2], ARGV[4], ARGV[5], ARGV[6])
return 1
"""

# KEYS: task.  ARGV: prefix, id, headers, body.
_FAIL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
settle(ARGV[2], 'failed', ARGV[3], ARGV[4])
return 1
"""

# KEYS: task.  ARGV: prefix, id.
_DELETE = """
local id = ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local f = redis.call('HMGET', KEYS[1], 'worker', 'idem')
if f[1] then redis.call('SREM', P .. 'held:' .. f[1], id) end
if f[2] and redis.call('GET', P .. 'key:' .. f[2]) == id then
  redis.call('DEL', P .. 'key:' .. f[2])
end
redis.call('DEL', KEYS[1], P .. 'request:' .. id)
redis.call('ZREM', P .. 'tasks', id)
redis.call('PUBLISH', P .. 'done', id)
return 1
"""

# ARGV: prefix, worker, lease.
_HEARTBEAT = """
redis.call('ZADD', P .. 'workers', stamp(clock() + tonumber(ARGV[3])), ARGV[2])
"""

# Reap, step 1: up to `limit` tasks held by workers whose lease lapsed, as
# {worker, {ids}} pairs.  Dead workers that hold nothing are forgotten.
# ARGV: prefix, reaper, limit.
_DEAD = """
local workers = P .. 'workers'
local budget = tonumber(ARGV[3])
local out = {}
local dead = redis.call('ZRANGEBYSCORE', workers, '-inf', stamp(clock()),
                        'LIMIT', 0, budget + 1)
for _, w in ipairs(dead) do
  if budget <= 0 then break end
  if w ~= ARGV[2] then
    local ids = redis.call('SRANDMEMBER', P .. 'held:' .. w, budget)
    if #ids == 0 then
      redis.call('ZREM', workers, w)
    else
      budget = budget - #ids
      out[#out + 1] = {w, ids}
    end
  end
end
return out
"""

# Reap, step 2: settle one task of a dead worker, once: whoever removes it from
# the worker's held set first wins.  Returns the record when requeued, 1 when
# failed, nil when someone else got there first or the worker came back.
# KEYS: task.  ARGV: prefix, id, dead worker, reaper, headers, body.
_REAP = """
local id, dead = ARGV[2], ARGV[3]
local workers = P .. 'workers'
local lease = redis.call('ZSCORE', workers, dead)
if not lease or tonumber(lease) > clock() then return false end
local held = P .. 'held:' .. dead
if redis.call('SREM', held, id) == 0 then return false end
local result = false
local s = redis.call('HMGET', KEYS[1], 'status', 'worker', 'replay')
if (s[1] == 'queued' or s[1] == 'running') and s[2] == dead then
  if s[3] == '1' and redis.call('EXISTS', P .. 'request:' .. id) == 1 then
    redis.call('HSET', KEYS[1], 'status', 'queued', 'worker', ARGV[4])
    redis.call('HDEL', KEYS[1], 'started_at')
    redis.call('SADD', P .. 'held:' .. ARGV[4], id)
    result = redis.call('HGETALL', KEYS[1])
  else
    settle(id, 'failed', ARGV[5], ARGV[6])
    result = 1
  end
end
if redis.call('SCARD', held) == 0 then redis.call('ZREM', workers, dead) end
return result
"""

# ARGV: prefix, limit.
_EXPIRE = """
local index = P .. 'tasks'
local ids = redis.call('ZRANGEBYSCORE', index, '-inf', stamp(clock()), 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do redis.call('ZREM', index, id) end
return #ids
"""


class RedisRegistry:
    """Registry in Redis (``redis://``, ``rediss://``, ``unix://``).

    ``client`` must return bytes (no ``decode_responses``).  One instance is
    shared by the threads of a process; ``close`` releases its connections.
    """

    def __init__(
        self, client: redis.Redis, *, prefix: str = "wsgi-async:", max_tasks: int = 10_000
    ) -> None:
        _check_options(prefix, max_tasks)
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("client: decode_responses must be False (bodies are raw bytes)")
        self.client = client
        self.prefix = prefix
        self.max_tasks = max_tasks
        self._channel = prefix + "done"
        self._where = _describe(client)
        self._closed = False
        self._listener: _Listener | None = None
        script = client.register_script
        self._create = script(_PREAMBLE + _CREATE)
        self._start = script(_PREAMBLE + _START)
        self._finish = script(_PREAMBLE + _FINISH)
        self._fail = script(_PREAMBLE + _FAIL)
        self._delete = script(_PREAMBLE + _DELETE)
        self._heartbeat = script(_PREAMBLE + _HEARTBEAT)
        self._dead = script(_PREAMBLE + _DEAD)
        self._reap = script(_PREAMBLE + _REAP)
        self._expire = script(_PREAMBLE + _EXPIRE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_tasks: int = 10_000,
        prefix: str = "wsgi-async:",
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
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
            return cls(client, prefix=prefix, max_tasks=max_tasks)
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
        if math.isnan(record.result_ttl):
            raise ValueError(f"result_ttl must be a number of seconds, got {record.result_ttl!r}")
        fields = _encode(record, idempotency_key)
        body = fields.pop("body", b"")
        args: list[str | bytes | int] = [
            self.prefix,
            record.id,
            self.max_tasks,
            "" if idempotency_key is None else "k" + idempotency_key,
            "" if request is None else request.to_json(),
            _FIELDS_JSON(fields),
            body,
        ]
        with self._guard("create a task"):
            reply = self._create(keys=[self._task(record.id)], args=args)
        if reply[0] == b"full":
            raise RegistryFull(f"the registry holds its maximum of {self.max_tasks} tasks")
        if reply[0] == b"existing":
            return _decode(_pairs(reply[1]))
        return record.copy()

    def get(self, task_id: str) -> TaskRecord | None:
        with self._guard("read a task"):
            fields = cast("dict[bytes, bytes]", self.client.hgetall(self._task(task_id)))
        return _decode(fields) if fields else None

    def request(self, task_id: str) -> RequestSnapshot | None:
        with self._guard("read a request"):
            data = self.client.get(self.prefix + "request:" + task_id)
        return None if data is None else RequestSnapshot.from_json(data)

    # -- transitions ---------------------------------------------------------

    def start(self, task_id: str, worker: str) -> TaskRecord | None:
        with self._guard("start a task"):
            reply = self._start(keys=[self._task(task_id)], args=[self.prefix, worker])
        if reply is None:
            return None
        return _decode_json(reply) if isinstance(reply, bytes) else _decode(_pairs(reply))

    def finish(
        self, task_id: str, worker: str, status: TaskStatus, response: StoredResponse
    ) -> bool:
        require_final(status)
        args: list[str | bytes] = [
            self.prefix, task_id, worker, status.value, response.headers_json(), response.body
        ]
        with self._guard("finish a task"):
            return bool(self._finish(keys=[self._task(task_id)], args=args))

    def fail(self, task_id: str, response: StoredResponse) -> bool:
        args: list[str | bytes] = [self.prefix, task_id, response.headers_json(), response.body]
        with self._guard("fail a task"):
            return bool(self._fail(keys=[self._task(task_id)], args=args))

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
        with self._guard("delete a task"):
            return bool(self._delete(keys=[self._task(task_id)], args=[self.prefix, task_id]))

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
            with self.client.pipeline(transaction=False) as pipe:
                for dead, ids in batches:
                    for raw in ids:
                        task_id = raw.decode()
                        lost = lost_worker_response(task_id)
                        args: list[str | bytes] = [
                            self.prefix, raw, dead, worker, lost.headers_json(), lost.body
                        ]
                        self._reap(keys=[self._task(task_id)], args=args, client=pipe)
                replies = pipe.execute()
        return [_decode(_pairs(reply)) for reply in replies if isinstance(reply, list)]

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

    def _listener_here(self) -> _Listener | None:
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
                listener = self._listener = _Listener(self.client, self._channel, self._where)
            return listener

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turn redis-py errors into registry errors."""
        try:
            yield
        except _UNAVAILABLE as exc:
            raise RegistryUnavailable(
                f"Redis registry at {self._where} is unavailable, cannot {action}: {exc}"
            ) from exc
        except redis.RedisError as exc:
            raise RegistryError(f"Redis registry at {self._where}: cannot {action}: {exc}") from exc


class _Listener:
    """One process's subscriber thread: wakes local waiters as tasks settle.

    When its connection drops it wakes every waiter (so that each re-checks and
    sees Redis is down), reconnects with a bounded backoff, and wakes them all
    again once subscribed, since completions may have been missed meanwhile.
    """

    def __init__(self, client: redis.Redis, channel: str, where: str) -> None:
        self.pid = os.getpid()
        self._client = client
        self._channel = channel
        self._where = where
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._stopping = threading.Event()
        self._delay = _BACKOFF_MIN
        self._lost = False
        self._thread = threading.Thread(
            target=self._run, name="wsgi-async-redis-listener", daemon=True
        )
        self._thread.start()

    @contextmanager
    def watch(self, task_id: str) -> Iterator[threading.Event]:
        """An event set whenever ``task_id`` may have changed."""
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._waiters.get(task_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiters[task_id]

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5.0)
        self._wake()

    def _wake(self, task_id: str | None = None) -> None:
        with self._lock:
            if task_id is None:
                events = [e for group in self._waiters.values() for e in group]
            else:
                events = list(self._waiters.get(task_id, ()))
        for event in events:
            event.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self._channel)
                self._listen(pubsub)
            except Exception as exc:
                if not self._lost:
                    expected = isinstance(exc, (redis.RedisError, OSError))
                    log.warning(
                        "Redis registry at %s: listener lost its connection (%s); reconnecting",
                        self._where,
                        exc,
                        exc_info=not expected,
                    )
                self._lost = True
            finally:
                with suppress(Exception):
                    pubsub.close()
                self._wake()
            self._stopping.wait(self._delay * random.uniform(0.5, 1.0))
            self._delay = min(self._delay * 2, _BACKOFF_MAX)

    def _listen(self, pubsub: Any) -> None:
        """Dispatch messages until stopped; raise when the connection is gone."""
        heard = time.monotonic()
        pinged = False
        while not self._stopping.is_set():
            message = pubsub.get_message(timeout=_POLL)
            now = time.monotonic()
            if message is None:
                if pinged and now - heard > _PING_EVERY + _PONG_WITHIN:
                    raise redis.ConnectionError("the subscription stopped answering PING")
                if not pinged and now - heard > _PING_EVERY:
                    pubsub.ping()
                    pinged = True
                continue
            heard, pinged = now, False
            if message["type"] == "message":
                self._wake(message["data"].decode("utf-8", "replace"))
            elif message["type"] == "subscribe":
                # (Re)subscribed: anything published while we were away is lost.
                if self._lost:
                    log.info("Redis registry at %s: listener reconnected", self._where)
                self._lost = False
                self._delay = _BACKOFF_MIN
                self._wake()


# Guards starting listeners; recreated in a forked child, where it may have
# been copied while held.
_start_lock = threading.Lock()


def _reset_start_lock() -> None:
    global _start_lock
    _start_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_start_lock)


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


_FIELDS_JSON = json.JSONEncoder(separators=(",", ":")).encode


def _encode(record: TaskRecord, idempotency_key: str | None) -> dict[str, str | bytes]:
    fields: dict[str, str | bytes] = {
        "id": record.id,
        "route": record.route,
        "status": record.status.value,
        "created_at": repr(float(record.created_at)),
        "attempts": str(record.attempts),
        "replay": "1" if record.replay else "0",
        "result_ttl": repr(float(record.result_ttl)),
    }
    optional = {
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "timeout": record.timeout,
    }
    for name, value in optional.items():
        if value is not None:
            fields[name] = repr(float(value))
    if record.worker is not None:
        fields["worker"] = record.worker
    if record.owner is not None:
        fields["owner"] = record.owner
    if record.fingerprint is not None:
        fields["fingerprint"] = record.fingerprint
    if idempotency_key is not None:
        fields["idem"] = idempotency_key
    if record.response is not None:
        fields["headers"] = record.response.headers_json()
        fields["body"] = record.response.body
    return fields


def _pairs(flat: Sequence[bytes] | bytes) -> dict[bytes, bytes]:
    """A Lua HGETALL reply (a flat list), or the JSON object ``_START`` makes of one, as a dict."""
    if isinstance(flat, bytes):
        return {k.encode(): v.encode() for k, v in json.loads(flat).items()}
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _decode(fields: Mapping[bytes, bytes]) -> TaskRecord:
    """A task hash (as HGETALL gives it) as a record."""
    get = fields.get
    started, finished, timeout = get(b"started_at"), get(b"finished_at"), get(b"timeout")
    worker, owner, fingerprint = get(b"worker"), get(b"owner"), get(b"fingerprint")
    response = None
    if b"headers" in fields:
        response = StoredResponse.from_parts(fields[b"headers"].decode("utf-8"), fields[b"body"])
    return TaskRecord(
        id=fields[b"id"].decode("utf-8"),
        route=fields[b"route"].decode("utf-8"),
        status=TaskStatus(fields[b"status"].decode("ascii")),
        created_at=float(fields[b"created_at"]),
        started_at=None if started is None else float(started),
        finished_at=None if finished is None else float(finished),
        worker=None if worker is None else worker.decode("utf-8"),
        owner=None if owner is None else owner.decode("utf-8"),
        fingerprint=None if fingerprint is None else fingerprint.decode("utf-8"),
        attempts=int(fields[b"attempts"]),
        replay=fields[b"replay"] == b"1",
        timeout=None if timeout is None else float(timeout),
        result_ttl=float(fields[b"result_ttl"]),
        response=response,
    )


def _decode_json(data: bytes) -> TaskRecord:
    """A task hash without a body, as the JSON object a script made of it, as a record."""
    fields: dict[str, str] = json.loads(data)
    get = fields.get
    started, finished, timeout = get("started_at"), get("finished_at"), get("timeout")
    response = None
    if "headers" in fields:  # a stored response with an empty body
        response = StoredResponse.from_parts(fields["headers"], b"")
    return TaskRecord(
        id=fields["id"],
        route=fields["route"],
        status=TaskStatus(fields["status"]),
        created_at=float(fields["created_at"]),
        started_at=None if started is None else float(started),
        finished_at=None if finished is None else float(finished),
        worker=get("worker"),
        owner=get("owner"),
        fingerprint=get("fingerprint"),
        attempts=int(fields["attempts"]),
        replay=fields["replay"] == "1",
        timeout=None if timeout is None else float(timeout),
        result_ttl=float(fields["result_ttl"]),
        response=response,
    )
