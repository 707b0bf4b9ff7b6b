"""Drive a WSGI application to completion and buffer its whole response.

This is the server side of PEP 3333 for a task: ``start_response`` with and
without ``exc_info``, the ``write()`` callable, any iterable, and ``close()``
called on it whatever happens.  What comes out is validated before it is
stored, so a replay can never be corrupt.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import NoReturn

from .errors import ResponseError, ResultTooLarge, TaskTimeout
from .model import StoredResponse
from .types import OptExcInfo, WriteCallable, WSGIApplication, WSGIEnvironment

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STATUS = re.compile(r"[1-5][0-9]{2} [^\x00-\x08\x0a-\x1f\x7f]*")
# Control characters other than tab never belong in a header value (RFC 9110 5.5).
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# 204, 205 and 304 have no content (RFC 9110 15.3.5, 15.3.6, 15.4.5); 205 says so with
# Content-Length: 0, the other two have no length of their own.
_NO_BODY_CODES = ("204", "205", "304")
_NO_LENGTH_CODES = ("204", "304")
# Hop-by-hop headers (RFC 9110 7.6.1, werkzeug's list) and the length, which is recomputed.
_DROPPED = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
     "trailer", "transfer-encoding", "upgrade", "content-length"}
)


def validate_status(status: object) -> str:
    """Return ``status`` if it is a PEP 3333 status line, else raise."""
    # Messages give the code at most: a broken status line may carry a header and its value.
    if not isinstance(status, str) or not _STATUS.fullmatch(status):
        raise ResponseError(f"invalid status line ({_described(status)}; "
                            "expected a str like '200 OK' without control characters)")
    if not status.isascii():
        try:
            status.encode("latin-1")
        except UnicodeEncodeError:
            raise ResponseError(f"status line {status[:3]} ... is not latin-1") from None
    if int(status[:3]) < 200:
        raise ResponseError(f"informational status {status[:3]} cannot be a final response")
    return status


def validate_headers(headers: object) -> list[tuple[str, str]]:
    """Return ``headers`` as a list of pairs if every one is valid, else raise."""
    if not isinstance(headers, list):
        raise ResponseError(f"headers must be a list, got {type(headers).__name__}")
    checked = []
    # Messages name the header, never its value: values may hold secrets.
    for index, header in enumerate(headers):
        if not (isinstance(header, tuple) and len(header) == 2):
            raise ResponseError(f"header {_header_name(header, index)} is not a (name, value) "
                                f"tuple ({_described(header)})")
        name, value = header
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise ResponseError("invalid header name (not an HTTP token)")
        if not isinstance(value, str) or _BAD_VALUE.search(value):
            raise ResponseError(f"invalid value for header {name!r} (control characters)")
        if not value.isascii():
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                raise ResponseError(f"value of header {name!r} is not latin-1") from None
        checked.append((name, value))
    return checked


def _header_name(header: object, index: int) -> str:
    """A header's name if it has one that is a token, else its position: never its value."""
    if isinstance(header, (tuple, list)) and header and isinstance(header[0], str) \
            and _TOKEN.fullmatch(header[0]):
        return repr(header[0])
    return f"#{index + 1}"


def _described(value: object) -> str:
    """What ``value`` is, without what it holds."""
    if isinstance(value, (str, bytes, tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


def finalise_headers(
    status: str, headers: list[tuple[str, str]], body_size: int
) -> tuple[tuple[str, str], ...]:
    """Drop hop-by-hop headers and set ``Content-Length`` from the stored body.

    Hop-by-hop are the fixed ones and those a ``Connection`` header names
    (RFC 9110 7.6.1): they were meant for the first hop, never for a replay.
    """
    dropped = _DROPPED.union(
        token.strip().lower() for name, value in headers if name.lower() == "connection"
        for token in value.split(",")
    )
    kept = [
        (name, value) for name, value in headers if name.lower() not in dropped
    ]
    if status[:3] not in _NO_LENGTH_CODES:
        kept.append(("Content-Length", str(body_size)))
    return tuple(kept)


class _Collector:
    """The ``start_response`` and ``write`` a task's application is given."""

    def __init__(self, max_size: int, deadline: float | None) -> None:
        self.max_size = max_size
        self.deadline = deadline
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0

    @property
    def body_started(self) -> bool:
        return self.size > 0

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> WriteCallable:
        if exc_info is not None and exc_info[0] is not None:
            try:
                if self.body_started:
                    _reraise(exc_info)
            finally:
                exc_info = None
        elif self.status is not None:
            raise ResponseError("start_response was called twice without exc_info")
        self.headers = validate_headers(headers)
        self.status = validate_status(status)
        return self.write

    def write(self, data: bytes) -> None:
        if self.status is None:
            raise ResponseError("write() was called before start_response")
        self.add(data)

    def add(self, data: object) -> None:
        if not isinstance(data, bytes):
            raise ResponseError(f"the application produced {type(data).__name__}, not bytes")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TaskTimeout("the task ran past its timeout")
        if not data:
            return
        if self.status is None:
            raise ResponseError("the application produced a body before calling start_response")
        self.size += len(data)
        if self.size > self.max_size:
            self.chunks.clear()
            raise ResultTooLarge(
                f"the response body exceeded max_result_size ({self.max_size} bytes)"
            )
        self.chunks.append(data)


def _reraise(exc_info: OptExcInfo) -> NoReturn:
    error = exc_info[1]
    assert error is not None
    raise error.with_traceback(exc_info[2])


def capture(
    app: WSGIApplication,
    environ: WSGIEnvironment,
    *,
    max_result_size: int,
    deadline: float | None = None,
) -> StoredResponse:
    """Run ``app`` on ``environ`` and return its complete, validated response.

    Raises what the application raises, :class:`ResponseError` for a response
    that breaks PEP 3333, :class:`ResultTooLarge` past ``max_result_size`` and
    :class:`TaskTimeout` once ``deadline`` (a ``time.monotonic`` value) passes.
    """
    collector = _Collector(max_result_size, deadline)
    result: Iterable[bytes] | None = None
    try:
        result = app(environ, collector.start_response)
        for chunk in result:
            collector.add(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if collector.status is None:
        raise ResponseError("the application returned without calling start_response")
    # 204, 205 and 304 have no body (RFC 9110 6.4.1): keep none to replay.
    body = b"" if collector.status[:3] in _NO_BODY_CODES else b"".join(collector.chunks)
    collector.chunks.clear()
    headers = finalise_headers(collector.status, collector.headers, len(body))
    return StoredResponse(collector.status, headers, body)
