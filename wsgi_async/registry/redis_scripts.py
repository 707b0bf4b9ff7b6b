"""The Redis registry's Lua scripts, and how a record travels to and from a task hash.

Every transition is one script, so it is atomic and conditional, and it reads
the clock with ``TIME`` so that leases and expiry follow the server's clock,
not the hosts'.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from .base import StoredResponse, TaskRecord, TaskStatus

__all__ = [
    "CLAIM", "CREATE", "DEAD", "DELETE", "EXPIRE", "FAIL", "FIELDS_JSON", "FINISH", "GROUP",
    "HEARTBEAT", "PREAMBLE", "PROGRESS", "PRUNE", "REAP", "RECOVER", "START", "decode",
    "decode_json", "encode", "pairs",
]

# -- Lua ---------------------------------------------------------------------
# Every script gets the key prefix as ARGV[1].  Inputs are validated in Python
# first: Redis does not roll a script back when it fails half-way.

PREAMBLE = """
local P = ARGV[1]
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function stamp(x) return string.format('%.6f', x) end

-- A task of the queue (executor="workers") leaves it: it no longer counts as
-- queued, and its stream entry is acknowledged and deleted (the stream only holds
-- entries not yet acknowledged, so it never grows without bound).
local function unqueue(task, status, route)
  local q = redis.call('HMGET', task, 'queue', 'entry')
  if q[1] ~= '1' then return end
  if status == 'queued' then redis.call('DECR', P .. 'queued') end
  if q[2] then
    local stream = P .. 'stream:' .. route
    redis.call('XACK', stream, 'workers', q[2])
    redis.call('XDEL', stream, q[2])
    redis.call('HDEL', task, 'entry')
  end
end

-- Put a task of the queue back on it with a new entry (its holder was lost).
local function requeue(task, id, status, route)
  redis.call('HSET', task, 'status', 'queued')
  redis.call('HDEL', task, 'worker', 'started_at', 'progress')
  local entry = redis.call('HGET', task, 'entry')
  local stream = P .. 'stream:' .. route
  if entry then
    redis.call('XACK', stream, 'workers', entry)
    redis.call('XDEL', stream, entry)
  end
  if status ~= 'queued' then redis.call('INCR', P .. 'queued') end
  redis.call('HSET', task, 'entry', redis.call('XADD', stream, '*', 'id', id))
end

-- Scripts that settle or delete a task take the tombstone TTL (ms) and the most
-- tombstones kept as their last two arguments.
local function bury(id, status, owner, ms)
  local index = P .. 'gone'
  local now = clock()
  redis.call('SET', P .. 'gone:' .. id, status .. ' ' .. (owner or ''), 'PX', ms)
  redis.call('ZADD', index, stamp(now + ms / 1000), id)
  local extra = redis.call('ZCARD', index) - tonumber(ARGV[#ARGV])
  if extra > 0 then  -- past the bound: the oldest go first
    local old = redis.call('ZPOPMIN', index, extra)
    for i = 1, #old, 2 do redis.call('DEL', P .. 'gone:' .. old[i]) end
  end
end

-- Store a final state, drop the task's bookkeeping, start its TTL, announce it.
-- Its tombstone is laid now, to outlive it by the tombstone TTL: nothing in
-- Redis runs when a key expires.
local function settle(id, status, headers, body)
  local task = P .. 'task:' .. id
  local now = clock()
  local f = redis.call('HMGET', task, 'worker', 'idem', 'result_ttl', 'status', 'route', 'owner')
  unqueue(task, f[4], f[5])
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
    bury(id, status == 'cancelled' and 'cancelled' or 'expired', f[6],
         math.ceil(ttl * 1000) + tonumber(ARGV[#ARGV - 1]))
  end
  redis.call('PUBLISH', P .. 'done', id)
end
"""

# The record's text fields travel as one JSON object: every argument costs the
# client as much as a short round trip's worth of packing.
# KEYS: task.  ARGV: prefix, id, max_tasks, 'k' .. key or '', request or '',
# fields (JSON object of strings), body (stored only when the fields have headers),
# max_queued or '' (a task of the queue: added to its route's stream, bounded).
CREATE = """
local id, has_key = ARGV[2], ARGV[4] ~= ''
-- Its submit failed and was settled (RECOVER) before this late run: store nothing.
if redis.call('EXISTS', P .. 'void:' .. id) == 1 then return {'void'} end
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
local queue = ARGV[8] ~= nil and ARGV[8] ~= ''
if queue and tonumber(redis.call('GET', P .. 'queued') or '0') >= tonumber(ARGV[8]) then
  return {'busy'}
end
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
if queue then
  local stream = P .. 'stream:' .. fields['route']
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, 'workers', '0', 'MKSTREAM')
  end
  redis.call('HSET', KEYS[1], 'queue', '1', 'entry', redis.call('XADD', stream, '*', 'id', id))
  redis.call('INCR', P .. 'queued')
end
return {'created'}
"""

# After a create that failed once it was sent (a timeout): the task as stored, or,
# when it is not, a mark that makes a late run of that create store nothing.
# KEYS: task.  ARGV: prefix, id, seconds the mark is kept.
RECOVER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGETALL', KEYS[1]) end
redis.call('SET', P .. 'void:' .. ARGV[2], '1', 'EX', ARGV[3])
return false
"""

# A transition that may be re-sent (redis-py sends a command again when the
# connection drops before its reply) carries a token, kept in the task's 'claim'
# field: the same call run again answers as it did the first time.

# KEYS: task.  ARGV: prefix, worker, token.
START = """
local s = redis.call('HMGET', KEYS[1], 'status', 'worker', 'claim')
if s[1] ~= 'queued' or s[2] ~= ARGV[2] then
  if s[1] ~= 'running' or s[2] ~= ARGV[2] or s[3] ~= ARGV[3] then return false end
else
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', stamp(clock()), 'claim', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  if redis.call('HGET', KEYS[1], 'queue') == '1' then redis.call('DECR', P .. 'queued') end
end
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

# KEYS: task.  ARGV: prefix, id, worker, status, headers, body, token, tombstone ms, max.
FINISH = """
local s = redis.call('HMGET', KEYS[1], 'status', 'worker', 'claim')
if s[1] ~= 'running' or s[2] ~= ARGV[3] then
  if s[3] == ARGV[7] and s[2] == ARGV[3]
      and (s[1] == 'done' or s[1] == 'failed' or s[1] == 'cancelled') then
    return 1
  end
  return 0
end
redis.call('HSET', KEYS[1], 'claim', ARGV[7])
settle(ARGV[2], ARGV[4], ARGV[5], ARGV[6])
return 1
"""

# Stored only while the task runs under the writer.  KEYS: task.  ARGV: prefix, worker, JSON.
PROGRESS = """
local s = redis.call('HMGET', KEYS[1], 'status', 'worker')
if s[1] ~= 'running' or s[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[3])
return 1
"""

# Fail or cancel a pending task.  KEYS: task.
# ARGV: prefix, id, headers, body, status ('failed' or 'cancelled'), tombstone ms, max.
FAIL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
settle(ARGV[2], ARGV[5], ARGV[3], ARGV[4])
return 1
"""

# KEYS: task.  ARGV: prefix, id, tombstone ms, max.
DELETE = """
local id = ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local f = redis.call('HMGET', KEYS[1], 'worker', 'idem', 'status', 'route', 'owner')
unqueue(KEYS[1], f[3], f[4])
bury(id, f[3] == 'cancelled' and 'cancelled' or 'deleted', f[5], tonumber(ARGV[3]))
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
HEARTBEAT = """
local now, lease = clock(), tonumber(ARGV[3])
local last = tonumber(redis.call('GET', P .. 'beat'))
if last and now - last > lease / 2 then
  -- Nobody renewed a lease for a while: an outage every worker suffered.  None
  -- is reaped until each has had a whole lease to renew its own.
  local ms = string.format('%d', math.ceil(lease * 1000))
  redis.call('SET', P .. 'grace', stamp(now + lease), 'PX', ms)
end
redis.call('SET', P .. 'beat', stamp(now))
redis.call('ZADD', P .. 'workers', stamp(now + lease), ARGV[2])
"""

# Reap, step 1: up to `limit` tasks held by workers whose lease lapsed, as
# {worker, {ids}} pairs.  Dead workers that hold nothing are forgotten.
# ARGV: prefix, reaper, limit.
DEAD = """
local grace = tonumber(redis.call('GET', P .. 'grace'))
if grace and grace > clock() then return {} end
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
# KEYS: task.  ARGV: prefix, id, dead worker, reaper, headers, body, token, tombstone ms,
# max.
REAP = """
local id, dead = ARGV[2], ARGV[3]
local c = redis.call('HMGET', KEYS[1], 'status', 'worker', 'claim')
if c[1] == 'queued' and c[2] == ARGV[4] and c[3] == ARGV[7] then
  return redis.call('HGETALL', KEYS[1])  -- run again: it was requeued to us
end
local workers = P .. 'workers'
local lease = redis.call('ZSCORE', workers, dead)
if not lease or tonumber(lease) > clock() then return false end
local held = P .. 'held:' .. dead
if redis.call('SREM', held, id) == 0 then return false end
local result = false
local s = redis.call('HMGET', KEYS[1], 'status', 'worker', 'replay', 'queue', 'route')
if (s[1] == 'queued' or s[1] == 'running') and s[2] == dead then
  local has_request = redis.call('EXISTS', P .. 'request:' .. id) == 1
  if s[4] == '1' and has_request and (s[1] == 'queued' or s[3] == '1') then
    -- Back on the queue for any worker (never handed to the reaper: it may be a
    -- web process); a claim that never started goes back even without replay.
    requeue(KEYS[1], id, s[1], s[5])
    result = 2
  elseif s[3] == '1' and has_request then
    redis.call('HSET', KEYS[1], 'status', 'queued', 'worker', ARGV[4], 'claim', ARGV[7])
    redis.call('HDEL', KEYS[1], 'started_at', 'progress')
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

# A worker takes a task it read from its route's stream.  Returns {record, request}
# when the task waited for a holder and is now ``worker``'s; false otherwise: an
# entry of a task that ended (or was requeued under a new entry) is acknowledged
# and deleted, one of a task another worker holds is left alone.
# KEYS: task.  ARGV: prefix, id, entry, stream, worker.
CLAIM = """
local s = redis.call('HMGET', KEYS[1], 'status', 'worker', 'entry')
if (s[1] ~= 'queued' and s[1] ~= 'running') or s[3] ~= ARGV[3] then
  redis.call('XACK', ARGV[4], 'workers', ARGV[3])
  redis.call('XDEL', ARGV[4], ARGV[3])
  return false
end
if s[1] ~= 'queued' or s[2] then return false end
redis.call('HSET', KEYS[1], 'worker', ARGV[5])
redis.call('SADD', P .. 'held:' .. ARGV[5], ARGV[2])
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', P .. 'request:' .. ARGV[2])}
"""

# The consumer group every worker of every host reads the streams in.
GROUP = "workers"

# Forget the consumers (workers) of a stream's group that hold no entry and have
# not read for ``idle`` ms: each worker process has a name of its own, so they
# would pile up across restarts.  Atomic, so a consumer that reads meanwhile is kept.
# KEYS: stream.  ARGV: prefix, reader (kept), idle ms.
PRUNE = """
local gone = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], 'workers')) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= ARGV[2] and tonumber(f['pending']) == 0
      and tonumber(f['idle']) > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], 'workers', f['name'])
    gone = gone + 1
  end
end
return gone
"""

# ARGV: prefix, limit.  The tombstones' own keys expire by TTL: only their index is trimmed.
EXPIRE = """
local index = P .. 'tasks'
local ids = redis.call('ZRANGEBYSCORE', index, '-inf', stamp(clock()), 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do redis.call('ZREM', index, id) end
redis.call('ZREMRANGEBYSCORE', P .. 'gone', '-inf', stamp(clock()))
return #ids
"""


FIELDS_JSON = json.JSONEncoder(separators=(",", ":")).encode


def encode(record: TaskRecord, idempotency_key: str | None) -> dict[str, str | bytes]:
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


def pairs(flat: Sequence[bytes] | bytes) -> dict[bytes, bytes]:
    """A Lua HGETALL reply (a flat list), or the JSON object ``START`` makes of one, as a dict."""
    if isinstance(flat, bytes):
        return {k.encode(): v.encode() for k, v in json.loads(flat).items()}
    return dict(zip(flat[::2], flat[1::2], strict=True))


def decode(fields: Mapping[bytes, bytes]) -> TaskRecord:
    """A task hash (as HGETALL gives it) as a record."""
    get = fields.get
    started, finished, timeout = get(b"started_at"), get(b"finished_at"), get(b"timeout")
    worker, owner, fingerprint = get(b"worker"), get(b"owner"), get(b"fingerprint")
    response = None
    if b"headers" in fields:
        response = StoredResponse.from_parts(fields[b"headers"].decode("utf-8"), fields[b"body"])
    progress = get(b"progress")
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
        progress=None if progress is None else json.loads(progress),
    )


def decode_json(data: bytes) -> TaskRecord:
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
        progress=None if "progress" not in fields else json.loads(fields["progress"]),
    )
