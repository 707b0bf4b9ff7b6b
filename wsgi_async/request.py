"""Read a request completely and turn it into something that outlives it.

A task runs after the server has finished with the request, so it gets a new
environ made from a :class:`RequestSnapshot`: the request's ``str`` entries,
its body in memory, and fresh ``wsgi.*`` objects that stay valid.
"""

from __future__ import annotations

import io
import sys
from typing import IO, Any
from wsgiref.util import FileWrapper

from .handle import TaskHandle as TaskHandle
from .model import RequestSnapshot
from .types import WSGIEnvironment

READ_CHUNK = 64 * 1024
# Entries owned by the server or by this request's thread; never copied.
SERVER_PREFIXES = ("wsgi.", "gunicorn.", "waitress.", "uwsgi.", "werkzeug.", "cheroot.",
                   "mod_wsgi.", "wsgi_async.")



class BodyError(Exception):
    """The request body cannot be accepted; carries the HTTP status to answer."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _read_up_to(stream: IO[bytes], limit: int) -> bytes:
    """Read at most ``limit`` bytes, stopping early at the end of the stream."""
    parts = []
    remaining = limit
    while remaining > 0:
        chunk = stream.read(min(READ_CHUNK, remaining))
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def read_body(environ: WSGIEnvironment, max_body_size: int) -> bytes:
    """Read the whole request body, never more than ``max_body_size + 1`` bytes.

    Raises :class:`BodyError` (413, 400 or 411) instead of calling the app.
    """
    stream: IO[bytes] = environ["wsgi.input"]
    raw_length = environ.get("CONTENT_LENGTH", "")
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if raw_length and not chunked:
        try:
            length = int(raw_length)
        except ValueError:
            length = -1
        if length < 0 or not raw_length.strip().isdigit():
            raise BodyError(400, f"invalid Content-Length {raw_length!r}")
        if length > max_body_size:
            raise BodyError(
                413, f"the request body ({length} bytes) exceeds max_body_size ({max_body_size})"
            )
        body = _read_up_to(stream, length)
        if len(body) < length:
            raise BodyError(400, f"the request body ended after {len(body)} of {length} bytes")
        return body
    if environ.get("wsgi.input_terminated"):
        body = _read_up_to(stream, max_body_size + 1)
        if len(body) > max_body_size:
            raise BodyError(413, f"the request body exceeds max_body_size ({max_body_size})")
        return body
    if chunked:
        raise BodyError(
            411,
            "this server does not delimit chunked request bodies; send a Content-Length",
        )
    return b""


def snapshot(environ: WSGIEnvironment, body: bytes) -> RequestSnapshot:
    """Keep the request's JSON-safe entries and its body."""
    # Every server-owned prefix has a dot and CGI names never do: test that first.
    kept = {
        key: value
        for key, value in environ.items()
        if isinstance(value, str) and isinstance(key, str)
        and ("." not in key or not key.startswith(SERVER_PREFIXES))
    }
    if "SCRIPT_NAME" not in kept:
        kept["SCRIPT_NAME"] = ""
    if "PATH_INFO" not in kept:
        kept["PATH_INFO"] = ""
    if "QUERY_STRING" not in kept:
        kept["QUERY_STRING"] = ""
    kept["wsgi.url_scheme"] = str(environ.get("wsgi.url_scheme", "http"))
    kept["CONTENT_LENGTH"] = str(len(body))
    kept.pop("HTTP_TRANSFER_ENCODING", None)
    return RequestSnapshot(kept, body)


class ErrorStream(io.TextIOBase):
    """``wsgi.errors`` for tasks: writes go to ``sys.stderr`` and it stays open."""

    def write(self, text: str) -> int:
        sys.stderr.write(text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        sys.stderr.flush()

    def close(self) -> None:
        """Applications may not close ``wsgi.errors``; ignore it (PEP 3333)."""


ERRORS = ErrorStream()


def task_environ(
    request: RequestSnapshot, task: TaskHandle, *, multiprocess: bool
) -> WSGIEnvironment:
    """A fresh PEP 3333 environ for running ``request`` as ``task``."""
    environ: WSGIEnvironment = dict(request.environ)
    environ["wsgi.version"] = (1, 0)
    environ["wsgi.url_scheme"] = request.environ.get("wsgi.url_scheme", "http")
    environ["wsgi.input"] = io.BytesIO(request.body)
    environ["wsgi.input_terminated"] = True
    environ["wsgi.errors"] = ERRORS
    environ["wsgi.multithread"] = True
    environ["wsgi.multiprocess"] = multiprocess
    environ["wsgi.run_once"] = False
    environ["wsgi.file_wrapper"] = FileWrapper
    environ["wsgi_async.task"] = task
    return environ
