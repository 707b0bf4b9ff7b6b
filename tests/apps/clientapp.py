"""The application tests/test_client.py serves with ``wsgi-async serve``.

Run by the middleware (the ``--route`` options of the test):

* ``POST /long?seconds=S`` sleeps S seconds and answers 201 with the body it was
  sent and a few binary bytes; with ``&html=1`` it answers an HTML page instead;
* ``POST /progress?steps=N&step=S`` reports its progress at each of N steps of S
  seconds (``&html=1``: an HTML result);
* ``POST /fail`` raises.

Passed through: ``/mimic/...``, a server of the pattern written by hand as any
other framework would, to show the client follows the pattern and not this
middleware.  It ignores ``Prefer: wait`` and logs every request it gets:

* ``POST /mimic/jobs?steps=N&step=S&style=STYLE&retry=R&fail=1`` answers 202 with a
  ``Location`` that is relative (``style=relative``, the default), absolute
  (``absolute``), absolute on another origin (``other-origin``: ``localhost``
  instead of ``127.0.0.1``), or a 303 to the status (``see-other-submit``);
* ``GET /mimic/status/<id>`` answers 202 with ``{"status", "progress"}`` and
  ``Retry-After: R`` (and its own ``Location``, unless ``bare=1``) while the N
  steps of S seconds run, then the result directly
  (a 500 with ``fail=1``), or ``303 See Other`` to ``/mimic/result/<id>``
  (``style=see-other``); ``410`` once cancelled;
* ``DELETE /mimic/status/<id>`` cancels (``204``);
* ``GET /mimic/page/<id>`` is the job's ``wsgi_async.status_page`` (or its JSON
  status, with progress, to a client that prefers JSON; each such poll is a step
  done), then an HTML result;
* ``GET /mimic/result/<id>`` is the result; ``GET /mimic/big?size=N`` is N bytes;
* ``GET /mimic/log`` is the JSON list of the requests seen.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable
from urllib.parse import parse_qs

from wsgi_async import status_page

RESULT = b"result:\x00\xff\x01binary\r\n"
HTML_RESULT = b"<!doctype html><title>Report</title><h1 id=done>Report ready</h1>"

_lock = threading.Lock()
_jobs: dict[str, dict] = {}
_log: deque[dict[str, object]] = deque(maxlen=2000)


def _read_body(environ: dict) -> bytes:
    length = environ.get("CONTENT_LENGTH") or ""
    return environ["wsgi.input"].read(int(length)) if length.isdigit() else b""


def _query(environ: dict) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _answer(start_response, status: str, body: bytes = b"",
            headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    start_response(status, [("Content-Length", str(len(body))), *(headers or [])])
    return [body]


def long_task(environ: dict, start_response) -> Iterable[bytes]:
    query = _query(environ)
    body = _read_body(environ)
    time.sleep(min(float(query.get("seconds", "0.5")), 10.0))
    if query.get("html"):
        return _answer(start_response, "200 OK", HTML_RESULT,
                       [("Content-Type", "text/html; charset=utf-8")])
    return _answer(start_response, "201 Created", body + RESULT,
                   [("Content-Type", "application/octet-stream"), ("X-Task", "long")])


def progress_task(environ: dict, start_response) -> Iterable[bytes]:
    """``steps`` steps of ``step`` seconds, each reported with the task's progress()."""
    query = _query(environ)
    steps, step = int(query.get("steps", "5")), min(float(query.get("step", "0.2")), 2.0)
    task = environ["wsgi_async.task"]
    for done in range(steps):
        task.progress(done, steps, f"step {done} of {steps}")
        time.sleep(step)
    if query.get("html"):
        return _answer(start_response, "200 OK", HTML_RESULT,
                       [("Content-Type", "text/html; charset=utf-8")])
    return _answer(start_response, "201 Created", RESULT,
                   [("Content-Type", "application/octet-stream")])


def mimic(environ: dict, start_response) -> Iterable[bytes]:
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO", "")
    host = environ.get("HTTP_HOST", "")
    with _lock:
        _log.append({"method": method, "path": path, "prefer": environ.get("HTTP_PREFER"),
                     "accept": environ.get("HTTP_ACCEPT"),
                     "authorization": "HTTP_AUTHORIZATION" in environ, "host": host,
                     "at": time.monotonic()})
    if path == "/mimic/log":
        with _lock:
            body = json.dumps(list(_log)).encode()
        return _answer(start_response, "200 OK", body, [("Content-Type", "application/json")])
    if path == "/mimic/big":
        size = int(_query(environ).get("size", "0"))
        return _answer(start_response, "200 OK", b"x" * size)
    if path == "/mimic/jobs" and method == "POST":
        return _submit(environ, start_response, host)
    _, _, rest = path.partition("/mimic/")
    kind, _, job_id = rest.partition("/")
    with _lock:
        job = _jobs.get(job_id)
    if job is None:
        return _answer(start_response, "404 Not Found", b"no such job")
    if kind == "result" and method == "GET":
        return _answer(start_response, "200 OK", RESULT,
                       [("Content-Type", "application/octet-stream")])
    if kind == "page" and method == "GET":
        return _page(environ, start_response, job_id, job)
    if kind != "status":
        return _answer(start_response, "404 Not Found", b"no such thing")
    if method == "DELETE":
        job["cancelled"] = True
        return _answer(start_response, "204 No Content")
    return _status(start_response, job_id, job)


def _submit(environ: dict, start_response, host: str) -> list[bytes]:
    query = _query(environ)
    _read_body(environ)
    job_id = secrets.token_urlsafe(12)
    style = query.get("style", "relative")
    job = {
        "started": time.monotonic(), "steps": int(query.get("steps", "3")),
        "step": float(query.get("step", "0.2")), "style": style,
        "retry": query.get("retry", "0"), "fail": bool(query.get("fail")), "cancelled": False,
        "bare": bool(query.get("bare")),
    }
    with _lock:
        _jobs[job_id] = job
    if style == "see-other-submit":
        return _answer(start_response, "303 See Other", b"",
                       [("Location", f"/mimic/status/{job_id}")])
    return _answer(start_response, "202 Accepted", json.dumps({"id": job_id}).encode(), [
        ("Content-Type", "application/json"),
        ("Location", _location(style, host, f"status/{job_id}")),
        ("Retry-After", str(job["retry"])),
    ])


def _location(style: str, host: str, relative: str) -> str:
    if style == "absolute":
        return f"http://{host}/mimic/{relative}"
    if style == "other-origin":
        return f"http://{host.replace('127.0.0.1', 'localhost')}/mimic/{relative}"
    return relative  # relative to /mimic/jobs, so /mimic/<relative>


def _status(start_response, job_id: str, job: dict[str, object]) -> list[bytes]:
    if job["cancelled"]:
        return _answer(start_response, "410 Gone", b'{"status": "cancelled"}',
                       [("Content-Type", "application/json")])
    steps, step, started = job["steps"], job["step"], job["started"]
    done = min(steps, int((time.monotonic() - started) / step))
    if done < steps:
        progress = {"current": done, "total": steps, "percent": round(100 * done / steps, 1),
                    "message": f"step {done} of {steps}"}
        body = json.dumps({"id": job_id, "status": "running", "progress": progress}).encode()
        headers = [("Content-Type", "application/json"), ("Retry-After", str(job["retry"]))]
        if not job["bare"]:
            headers.append(("Location", f"/mimic/status/{job_id}"))
        return _answer(start_response, "202 Accepted", body, headers)
    if job["fail"]:
        return _answer(start_response, "500 Internal Server Error", b'{"error": "it broke"}',
                       [("Content-Type", "application/json")])
    if job["style"] == "see-other":
        return _answer(start_response, "303 See Other", b"",
                       [("Location", f"/mimic/result/{job_id}")])
    return _answer(start_response, "200 OK", RESULT,
                   [("Content-Type", "application/octet-stream")])


def _page(environ: dict, start_response, job_id: str, job: dict) -> list[bytes]:
    """The job's status as wsgi_async.status_page renders it for a browser, or as JSON.

    Here a step is done at each JSON poll, not in time: a browser's virtual time
    (``--virtual-time-budget``) runs the page's timers much faster than the clock.
    """
    steps, html = job["steps"], status_page.prefers_html(environ)
    with _lock:
        done = job["polls"] = min(steps, job.get("polls", 0) + (not html))
    if done >= steps:
        return _answer(start_response, "200 OK", HTML_RESULT,
                       [("Content-Type", "text/html; charset=utf-8")])
    document = {"id": job_id, "status": "running", "progress": {
        "current": done, "total": steps, "percent": round(100 * done / steps, 1),
        "message": f"step {done} of {steps}"}}
    if html:
        page = status_page.render(document, poll_url=environ["PATH_INFO"])
        return _answer(start_response, "202 Accepted", page,
                       [*status_page.HEADERS, ("Retry-After", str(job["retry"]))])
    return _answer(start_response, "202 Accepted", json.dumps(document).encode(),
                   [("Content-Type", "application/json"), ("Retry-After", str(job["retry"]))])


def app(environ: dict, start_response) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    method = environ["REQUEST_METHOD"]
    if path.startswith("/mimic/"):
        return mimic(environ, start_response)
    if path == "/long" and method == "POST":
        return long_task(environ, start_response)
    if path == "/progress" and method == "POST":
        return progress_task(environ, start_response)
    if path == "/fail" and method == "POST":
        _read_body(environ)
        raise RuntimeError("the task failed on purpose")
    if path == "/ready":
        return _answer(start_response, "200 OK", b"ready")
    return _answer(start_response, "404 Not Found", b"not found")
