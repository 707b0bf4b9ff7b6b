"""Graceful shutdown: drain every task service of a process when its server stops it.

Servers stop a process with SIGTERM and give it a graceful timeout before they
kill it: gunicorn signals each worker (which then leaves its loop and exits
through ``sys.exit``, running ``atexit``), waitress dies of the signal's
default action, uWSGI's master stops its workers and runs ``uwsgi.atexit``.
Hooked at each of those places, running tasks finish and are stored within
``drain_timeout``, and queued ones are settled, instead of being lost with
the process.

The SIGTERM handler is installed in the main thread of the process that
serves (at construction, or at its first request there), chaining to the
handler it replaces: a server's own handler runs at once and the drain runs
beside it, ending at exit; where the signal would simply kill the process,
the drain runs in the handler, bounded by ``drain_timeout``, and the signal is
then delivered again with its default action, so the process ends as it would
have.  An ignored SIGTERM, or one handled outside Python (uWSGI's C handlers),
is left alone.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger("wsgi_async")

Handler = Callable[[int, FrameType | None], Any] | int | None


class Drainable(Protocol):
    """What a task service offers the shutdown hooks."""

    @property
    def drain_timeout(self) -> float: ...

    def drain(self, timeout: float | None = None) -> bool: ...


class _State:
    """This process's hooks; a forked child starts afresh."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.services: weakref.WeakSet[Drainable] = weakref.WeakSet()
        self.handler_pid = 0  # where the SIGTERM handler was considered
        self.previous: Handler = None
        self.drainer: threading.Thread | None = None
        self.drained_pid = 0  # where a drain began, and when
        self.began = 0.0
        self.uwsgi_hooked = False


_state = _State()


def register(service: Drainable) -> None:
    """Drain ``service`` when this process is stopped; install the hooks if possible."""
    with _state.lock:
        _state.services.add(service)
        _install_uwsgi_atexit()
    watch()


def watch() -> None:
    """Install the SIGTERM handler if this is the main thread of a process without one yet.

    Cheap enough for every request: after the first call in a process it is a
    comparison of process ids.
    """
    if _state.handler_pid == os.getpid():
        return
    if threading.current_thread() is not threading.main_thread():
        return
    with _state.lock:
        if _state.handler_pid == os.getpid():
            return
        _state.handler_pid = os.getpid()
        try:
            previous = signal.getsignal(signal.SIGTERM)
        except (ValueError, OSError):  # pragma: no cover - no signals here
            return
        # Ignored, or handled outside Python: nothing to chain to, so leave it be.
        if previous is None or previous == signal.SIG_IGN:
            return
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):  # pragma: no cover - not the main interpreter
            return
        _state.previous = previous


def drain_all() -> None:
    """Drain every registered service of this process, all within one bound.

    Each service gets its ``drain_timeout`` from the moment the drain began,
    so several services never add up their bounds.  Idempotent: a drain
    already under way (started by SIGTERM) is joined instead of started again.
    """
    with _state.lock:
        under_way = _state.drained_pid == os.getpid()
        drainer = _state.drainer if under_way else None
        if not under_way:
            _state.drained_pid = os.getpid()
            _state.began = time.monotonic()
        began = _state.began
        services = list(_state.services)
    if drainer is not None:
        drainer.join(max(0.0, began + _longest_bound(services) - time.monotonic()))
    elif not under_way:
        _drain(services, began)


def _drain_in_background() -> None:
    with _state.lock:
        if _state.drained_pid == os.getpid():
            return
        _state.drained_pid = os.getpid()
        _state.began = began = time.monotonic()
        thread = threading.Thread(target=_drain, args=(list(_state.services), began),
                                  name="wsgi-async-drain", daemon=True)
        _state.drainer = thread
    thread.start()


def _drain(services: list[Drainable], began: float) -> None:
    for service in services:
        try:
            service.drain(max(0.0, began + service.drain_timeout - time.monotonic()))
        except Exception:
            log.exception("wsgi_async: draining the task service failed")


def _longest_bound(services: list[Drainable]) -> float:
    return max((service.drain_timeout for service in services), default=0.0) + 1.0


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    previous = _state.previous
    log.info("wsgi_async: SIGTERM: draining tasks")
    if callable(previous):
        # The server stops on its own terms (gunicorn leaves its loop, then exits): the
        # drain runs beside it, and the exit hook waits for it.
        _drain_in_background()
        previous(signum, frame)
        return
    # The signal would have killed the process at once: drain first (bounded), then die of it.
    began = time.monotonic()
    drain_all()
    log.info("wsgi_async: drained in %.2f s; exiting on SIGTERM", time.monotonic() - began)
    for handler in logging.getLogger("wsgi_async").handlers + logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_uwsgi_atexit() -> None:
    """Under uWSGI, also drain from its exit hook (chained to any hook set before)."""
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None or _state.uwsgi_hooked:
        return
    _state.uwsgi_hooked = True
    previous = getattr(uwsgi, "atexit", None)

    def hook() -> None:
        drain_all()
        if callable(previous):
            previous()

    with contextlib.suppress(AttributeError, TypeError):
        setattr(uwsgi, "atexit", hook)  # noqa: B010 - a module attribute uWSGI reads


def _reset() -> None:
    global _state
    services = list(_state.services)
    _state = _State()
    for service in services:
        _state.services.add(service)


atexit.register(drain_all)
os.register_at_fork(after_in_child=_reset)
