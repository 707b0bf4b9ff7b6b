"""The application that tests/test_servers.py serves with every real WSGI server.

``raw_app`` is a plain WSGI application; ``application`` is the same app behind
the middleware, with a small ``max_body_size``:

* ``POST /slow?seconds=S`` (asynchronous) and ``POST /direct/slow?seconds=S``
  (the same handler, passed straight through) read the body, sleep S seconds
  and answer 201 echoing the body byte for byte, with headers;
* ``GET /stream`` (passed through) yields several chunks from a generator;
* ``POST /fail`` (asynchronous) raises;
* ``GET /ready`` answers 200 once the server is up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from urllib.parse import parse_qs

from wsgi_async import AsyncMiddleware

MAX_BODY_SIZE = 1024
ROUTES = {r"^/slow$": ["POST"], r"^/fail$": ["POST"]}
STREAM_CHUNKS = [bytes([65 + i]) * 4000 + b"\n" for i in range(5)]
STREAM_PAUSE = 0.1
SECRET = "s3cr3t-77e1: the signing key is hunter2"

if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def read_body(environ: dict) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH") or ""
    if length.isdigit():
        return stream.read(int(length)) if int(length) else b""
    if environ.get("wsgi.input_terminated"):
        return stream.read()
    return b""


def slow(environ: dict, start_response) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    seconds = min(float(query.get("seconds", ["0.5"])[0]), 10.0)
    body = read_body(environ)
    time.sleep(seconds)
    start_response("201 Created", [
        ("Content-Type", "application/octet-stream"),
        ("X-Echo", environ.get("HTTP_X_TOKEN", "")),
        ("X-Body-Length", str(len(body))),
        ("Set-Cookie", "report=ready; Path=/; HttpOnly"),
        ("Cache-Control", "private, max-age=60"),
    ])
    return [body]


def stream(environ: dict, start_response) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain; charset=us-ascii")])
    for i, chunk in enumerate(STREAM_CHUNKS):
        if i:
            time.sleep(STREAM_PAUSE)
        yield chunk


def raw_app(environ: dict, start_response) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    method = environ.get("REQUEST_METHOD", "GET")
    if path in ("/slow", "/direct/slow") and method == "POST":
        return slow(environ, start_response)
    if path == "/stream" and method == "GET":
        return stream(environ, start_response)
    if path == "/fail" and method == "POST":
        read_body(environ)
        raise RuntimeError(SECRET)
    if path == "/ready":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ready\n"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]


application = AsyncMiddleware(raw_app, routes=ROUTES, max_body_size=MAX_BODY_SIZE)
