"""The Redis registry's wake-ups: one subscriber thread per process.

``wait`` never polls: the thread wakes local waiters when a task id is
published on the ``done`` channel.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

try:
    import redis
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the Redis registry needs redis-py: pip install 'wsgi-async[redis]'"
    ) from exc

__all__ = ["Listener"]

log = logging.getLogger("wsgi_async.registry.redis")

_POLL = 0.2  # how often the listener checks whether it should stop
_PING_EVERY = 10.0  # ping an idle subscription this often...
_PONG_WITHIN = 5.0  # ...and reconnect if nothing answers within this
_BACKOFF_MIN = 0.05  # listener reconnection delay, doubled up to
_BACKOFF_MAX = 1.0


class Listener:
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

