"""The popular thread-per-request recipe for asynchronous Flask endpoints.

This is the baseline ``wsgi_async`` is measured against: the ``@async_api``
decorator Miguel Grinberg described (PyCon 2016 "Flask at Scale" and the
"flack" project), rewritten here from its well-known description:

* a module-level ``tasks`` dict maps a task id to its thread and, once done,
  to the view's return value and a completion timestamp;
* every call of a decorated view starts one new, unbounded
  ``threading.Thread`` that runs the view inside a request context built from
  the original request's WSGI environ, and the caller gets ``202 Accepted``
  with a ``Location`` to ``/status/<id>``;
* ``GET /status/<id>`` answers 202 while the task runs and the view's own
  response when it is done (there is no way to wait: clients poll);
* a background thread drops tasks finished more than five minutes ago.

Minimal adaptations for current Flask, and nothing else:

1. The original started the cleanup thread in a ``before_first_request``
   hook, which Flask 2.3 removed.  Here a ``before_app_request`` hook starts
   it on the first request instead (guarded by a lock, once per process).
2. That cleanup thread is a daemon thread: the original's non-daemon thread
   loops forever, so a server's worker could never exit on SIGTERM.
3. The task runs in ``app.request_context(environ)``: it is the Flask call that
   takes a WSGI environ (``test_request_context`` would take the dict as a URL).

What is deliberately *not* fixed, because it is what is being measured: one
thread per task with no bound, tasks kept in one process's memory, polling.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Blueprint, Flask, abort, current_app, request, url_for
from werkzeug.exceptions import HTTPException, InternalServerError

CLEANUP_INTERVAL = 60.0
KEEP_FINISHED = 5 * 60.0

tasks: dict[str, dict[str, Any]] = {}
tasks_bp = Blueprint("tasks", __name__)

_cleanup_started = False
_cleanup_lock = threading.Lock()


def timestamp() -> float:
    return time.time()


def _clean_old_tasks() -> None:
    """Keep the tasks still running and those finished in the last five minutes."""
    global tasks
    while True:
        cutoff = timestamp() - KEEP_FINISHED
        tasks = {
            task_id: task
            for task_id, task in tasks.items()
            if "completion_timestamp" not in task or task["completion_timestamp"] > cutoff
        }
        time.sleep(CLEANUP_INTERVAL)


@tasks_bp.before_app_request
def _start_cleanup_thread() -> None:
    # Adaptation 1: was @before_first_request (removed in Flask 2.3).
    global _cleanup_started
    if _cleanup_started:
        return
    with _cleanup_lock:
        if _cleanup_started:
            return
        # Adaptation 2: daemon=True, so the process can exit.
        threading.Thread(target=_clean_old_tasks, name="recipe-cleanup", daemon=True).start()
        _cleanup_started = True


def async_api(view: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``view`` in a new thread and answer 202 with the task's status URL."""

    @wraps(view)
    def new_view(*args: Any, **kwargs: Any) -> Any:
        def task_call(app: Flask, environ: dict[str, Any]) -> None:
            # Adaptation 3: request_context(environ), see the module docstring.
            with app.request_context(environ):
                try:
                    tasks[task_id]["return_value"] = view(*args, **kwargs)
                except HTTPException as exc:
                    tasks[task_id]["return_value"] = current_app.handle_http_exception(exc)
                except Exception:
                    tasks[task_id]["return_value"] = InternalServerError()
                    if current_app.debug:
                        raise
                finally:
                    tasks[task_id]["completion_timestamp"] = timestamp()

        task_id = uuid.uuid4().hex
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        tasks[task_id] = {
            "task_thread": threading.Thread(target=task_call, args=(app, request.environ))
        }
        tasks[task_id]["task_thread"].start()
        location = url_for("tasks.get_status", task_id=task_id)
        return "accepted", 202, {"Location": location}

    return new_view


@tasks_bp.route("/status/<task_id>", methods=["GET"])
def get_status(task_id: str) -> Any:
    """202 while the task runs; the view's own response once it is done."""
    task = tasks.get(task_id)
    if task is None:
        abort(404)
    if "return_value" not in task:
        return "", 202, {"Location": url_for("tasks.get_status", task_id=task_id)}
    return task["return_value"]
