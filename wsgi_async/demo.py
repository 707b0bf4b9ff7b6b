"""A tiny WSGI application with one slow endpoint, for ``wsgi-async demo``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from urllib.parse import parse_qs

from .types import StartResponse, WSGIEnvironment

MAX_DEMO_SECONDS = 30.0


def demo_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """``POST /reports?seconds=N`` works for N seconds, then echoes what it was sent."""
    path = environ.get("PATH_INFO", "")
    if path == "/reports" and environ["REQUEST_METHOD"] == "POST":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        try:
            seconds = min(float(query.get("seconds", ["3"])[0]), MAX_DEMO_SECONDS)
        except ValueError:
            seconds = 3.0
        length = int(environ.get("CONTENT_LENGTH") or 0)
        payload = environ["wsgi.input"].read(length).decode("utf-8", "replace")
        time.sleep(max(seconds, 0.0))
        task = environ.get("wsgi_async.task")
        body = json.dumps(
            {"report": "ready", "worked_seconds": seconds, "you_sent": payload,
             "task_id": getattr(task, "id", None)}
        ).encode()
        start_response("201 Created", [("Content-Type", "application/json")])
        return [body]
    if path == "/":
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"wsgi_async demo: POST /reports?seconds=3 runs in the background.\n"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]
