"""A client for asynchronous request-reply endpoints: submit, follow the 202, return the result.

:func:`call` speaks the pattern, not this server: any ``202 Accepted`` with a
``Location`` (absolute or relative) is followed with long-polls (``Prefer: wait``,
RFC 7240), ``Retry-After`` is honoured when a poll is answered at once, and a
``303 See Other`` (or another redirect) is followed to the result.  Standard
library only.
"""

from __future__ import annotations

import email.message
import email.utils
import http.client
import json
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from .errors import WsgiAsyncError

__all__ = [
    "ClientError",
    "ConnectionFailed",
    "GaveUp",
    "InvalidURL",
    "ProtocolError",
    "Response",
    "ResponseTooLarge",
    "Timeout",
    "TooManyPolls",
    "call",
    "cancel",
]

USER_AGENT = "wsgi-async-client/0.1"
REDIRECTS = frozenset((301, 302, 303, 307, 308))
# Request headers that describe the submitted body: never sent again on a poll.
BODY_HEADERS = frozenset(("content-type", "content-length", "content-encoding",
                          "transfer-encoding", "idempotency-key", "prefer", "expect"))
# Credentials go only to the origin they were given for (as browsers and requests do).
CREDENTIALS = frozenset(("authorization", "cookie", "proxy-authorization"))
MAX_STATUS_DOCUMENT = 1024 * 1024  # a 202 body larger than this is not read for progress
MIN_POLL_INTERVAL = 0.1  # seconds between two polls answered at once, whatever Retry-After says
MAX_RETRY_AFTER = 60.0  # a larger Retry-After is capped (the total timeout still applies)
CHUNK = 64 * 1024

Headers = Mapping[str, str] | Iterable[tuple[str, str]]
ProgressCallback = Callable[[Any], object]


class ClientError(WsgiAsyncError):
    """Base class of the client's errors."""


class InvalidURL(ClientError, ValueError):
    """The URL is not an absolute ``http`` or ``https`` URL with a host."""


class ConnectionFailed(ClientError):
    """The server could not be reached, or broke the connection.

    ``task_url`` is the task being followed, if any: ``call(task_url, method="GET")``
    picks it up again.
    """

    def __init__(self, message: str, url: str, task_url: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.task_url = task_url


class ProtocolError(ClientError):
    """The server answered something the client cannot follow (too many redirects...)."""


class ResponseTooLarge(ClientError):
    """A response body exceeded ``max_response_size``."""


class GaveUp(ClientError):
    """The client stopped following a task before it ended.

    ``task_url`` is the task's URL (``None`` if no ``202`` came yet); ``cancelled``
    says whether a ``DELETE`` was sent and accepted (only with ``cancel_on_timeout``).
    """

    def __init__(self, message: str, task_url: str | None, cancelled: bool = False) -> None:
        super().__init__(message)
        self.task_url = task_url
        self.cancelled = cancelled


class Timeout(GaveUp):
    """``timeout`` seconds passed before the final response."""


class TooManyPolls(GaveUp):
    """``max_polls`` polls were answered ``202``."""


@dataclass(frozen=True)
class Response:
    """A final HTTP response: ``status`` code, ``reason``, ``headers`` in order, ``body``.

    ``url`` is the URL that answered it; ``task_url`` the task that was followed
    (``None`` when the first answer was final).
    """

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    url: str
    task_url: str | None = None

    @property
    def ok(self) -> bool:
        """True for a 2xx or 3xx status."""
        return 200 <= self.status < 400

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default

    def json(self) -> Any:
        """The body decoded as JSON (``ValueError`` if it is not)."""
        return json.loads(self.body)

    @property
    def text(self) -> str:
        """The body decoded with the ``charset`` of its ``Content-Type`` (UTF-8 by default)."""
        message = email.message.Message()
        message["Content-Type"] = self.header("Content-Type", "") or ""
        charset = message.get_content_charset() or "utf-8"
        try:
            return self.body.decode(charset, "replace")
        except LookupError:
            return self.body.decode("utf-8", "replace")


def call(
    url: str,
    method: str = "POST",
    data: bytes | str | None = None,
    headers: Headers | None = None,
    timeout: float | None = None,
    on_progress: ProgressCallback | None = None,
    *,
    cancel_on_timeout: bool = False,
    on_task: Callable[[str], object] | None = None,
    poll_wait: int | None = None,
    max_polls: int = 100_000,
    max_redirects: int = 10,
    max_response_size: int = 100 * 1024 * 1024,
    io_timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Response:
    """Send ``method url`` with ``data`` and ``headers``; follow a 202 to the final response.

    A ``202 Accepted`` with a ``Location`` is polled with ``GET`` and ``Prefer:
    wait=<poll_wait>`` until the answer is something else (``poll_wait`` is 10 s,
    or 1 s with ``on_progress``: a server holds a long-poll until the task ends,
    not until its progress changes); a poll answered ``202``
    at once waits ``Retry-After`` (default 1 s) before the next.  Redirects (``303``
    and the others) are followed, to at most ``max_redirects``.  ``on_progress``
    gets each new progress document: the non-null ``progress`` member of a 202's
    JSON object (``{"current", "total", "percent", "message"}`` here), whenever it
    differs from the last one.  ``on_task`` gets the task URL when it is first known.

    Polls carry ``headers`` except those describing the body (and ``Prefer``,
    replaced); ``Authorization`` and ``Cookie`` go only to the submitted URL's origin.

    Raises :class:`Timeout` when ``timeout`` seconds pass (then, only with
    ``cancel_on_timeout``, the task is sent a ``DELETE``), :class:`TooManyPolls`,
    :class:`InvalidURL`, :class:`ConnectionFailed`, :class:`ProtocolError` or
    :class:`ResponseTooLarge`.  A final 4xx or 5xx is returned, not raised.
    """
    _check_positive(timeout=timeout, io_timeout=io_timeout)
    if poll_wait is None:
        poll_wait = 10 if on_progress is None else 1
    for name, limit in (("poll_wait", poll_wait), ("max_polls", max_polls),
                        ("max_response_size", max_response_size)):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"{name} must be a positive integer, not {limit!r}")
    if isinstance(max_redirects, bool) or not isinstance(max_redirects, int) or max_redirects < 0:
        raise ValueError(f"max_redirects must be a non-negative integer, not {max_redirects!r}")
    body = data.encode("utf-8") if isinstance(data, str) else data
    given = _header_list(headers)
    origin = _origin(_check_url(url))
    deadline = None if timeout is None else time.monotonic() + timeout
    http_ = _Http(deadline, io_timeout, max_response_size, ssl_context)

    target, verb = url, method.upper()
    task_url: str | None = None
    polls = redirects = 0
    polling = False  # whether the last request was a poll of the task
    last_progress: Any = _NOTHING
    initial = True
    try:
        while True:
            extra = [("Prefer", f"wait={poll_wait}")] if polling else []
            sent = given if initial else _carried(given, target, origin, body is not None)
            initial = False
            began = time.monotonic()
            reply = http_.request(verb, target, body, [*sent, *extra],
                                  wait=poll_wait if polling else 0, task_url=task_url)
            location = reply.header("Location")
            if reply.status in REDIRECTS and location:
                redirects += 1
                if redirects > max_redirects:
                    raise ProtocolError(f"more than {max_redirects} redirects from {url}")
                target = _check_url(urljoin(target, location.strip()))
                if reply.status == 303 or (reply.status in (301, 302) and verb != "HEAD"):
                    verb, body = ("HEAD" if verb == "HEAD" else "GET"), None
                continue
            # A 202 with a Location is a task to follow; once following, a 202 without
            # one means the task is still pending at the URL just polled.
            if reply.status != 202 or not (location or task_url):
                return Response(reply.status, reply.reason, reply.headers, reply.body,
                                target, task_url)
            new_url = _check_url(urljoin(target, location.strip())) if location else target
            if new_url != task_url:
                task_url = new_url
                if on_task is not None:
                    on_task(task_url)
            if on_progress is not None:
                progress = _progress_of(reply)
                if progress is not _NOTHING and progress != last_progress:
                    last_progress = progress
                    on_progress(progress)
            polls += 1
            if polls > max_polls:
                raise TooManyPolls(f"the task was still pending after {max_polls} polls",
                                   task_url)
            if polling:
                # Answered at once (no long-poll here): wait as the server asked.
                delay = max(_retry_after(reply), MIN_POLL_INTERVAL) - (time.monotonic() - began)
                if delay > 0:
                    http_.sleep(delay, task_url)
            target, verb, body, polling = task_url, "GET", None, True
    except Timeout as exc:
        if cancel_on_timeout and exc.task_url is not None:
            exc.cancelled = _cancel_quietly(
                exc.task_url, _carried(given, exc.task_url, origin, False), ssl_context)
        raise


def cancel(
    task_url: str,
    headers: Headers | None = None,
    timeout: float = 10.0,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> Response:
    """Send ``DELETE task_url`` and return the answer (``204`` when the server cancelled it)."""
    _check_positive(timeout=timeout)
    http_ = _Http(time.monotonic() + timeout, timeout, MAX_STATUS_DOCUMENT, ssl_context)
    reply = http_.request("DELETE", _check_url(task_url), None, _header_list(headers), 0,
                          task_url)
    return Response(reply.status, reply.reason, reply.headers, reply.body, task_url, task_url)


# -- internals ---------------------------------------------------------------------------

_NOTHING: Any = object()


@dataclass(frozen=True)
class _Reply:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


class _Http:
    """One request at a time over http.client, within a deadline and a size bound."""

    def __init__(self, deadline: float | None, io_timeout: float, max_size: int,
                 context: ssl.SSLContext | None) -> None:
        self.deadline = deadline
        self.io_timeout = io_timeout
        self.max_size = max_size
        self.context = context

    def remaining(self, task_url: str | None) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Timeout(_timeout_message(task_url), task_url)
        return left

    def sleep(self, seconds: float, task_url: str | None) -> None:
        left = self.remaining(task_url)
        time.sleep(seconds if left is None else min(seconds, left))
        self.remaining(task_url)

    def request(self, method: str, url: str, body: bytes | None,
                headers: list[tuple[str, str]], wait: int, task_url: str | None) -> _Reply:
        parts = urlsplit(url)
        io = self.io_timeout + wait
        left = self.remaining(task_url)
        if left is not None:
            io = min(io, left)
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=io,
                context=self.context or ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=io)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            connection.putrequest(method, path, skip_accept_encoding=True)
            names = {k.lower() for k, _ in headers}
            if "user-agent" not in names:
                connection.putheader("User-Agent", USER_AGENT)
            if body is not None and "content-length" not in names:
                connection.putheader("Content-Length", str(len(body)))
            elif body is None and method in ("POST", "PUT", "PATCH"):
                connection.putheader("Content-Length", "0")
            for name, value in headers:
                connection.putheader(name, value)
            connection.endheaders(body)
            response = connection.getresponse()
            reply_headers = tuple(response.getheaders())
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if size > self.max_size:
                    raise ResponseTooLarge(
                        f"the response from {url} is larger than {self.max_size} bytes")
                chunks.append(chunk)
                self.remaining(task_url)
            return _Reply(response.status, response.reason, reply_headers, b"".join(chunks))
        except TimeoutError:
            self.remaining(task_url)  # raises Timeout when the deadline is what ran out
            raise ConnectionFailed(f"no answer from {url} within {io:g} s", url,
                                   task_url) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectionFailed(f"{method} {url} failed: {exc or type(exc).__name__}", url,
                                   task_url) from exc
        finally:
            connection.close()


def _check_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidURL(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidURL(f"not an absolute http(s) URL: {url!r}")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise InvalidURL(f"a URL may not contain spaces or control characters: {url!r}")
    return url


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def _carried(
    given: list[tuple[str, str]], target: str, origin: tuple[str, str, int | None],
    with_body: bool,
) -> list[tuple[str, str]]:
    """The caller's headers for a later request: body headers only with a body (never
    ``Prefer``), credentials only to the first request's origin."""
    same_origin = _origin(target) == origin
    carried = []
    for name, value in given:
        lower = name.lower()
        if lower in BODY_HEADERS and (not with_body or lower == "prefer"):
            continue
        if lower in CREDENTIALS and not same_origin:
            continue
        carried.append((name, value))
    return carried


def _header_list(headers: Headers | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    pairs = [(str(k), str(v)) for k, v in items]
    for name, value in pairs:
        if not name or any(c in name for c in ":\r\n ") or any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid header {name!r}")
    return pairs


def _check_positive(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")


def _retry_after(reply: _Reply) -> float:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date); 1 s when absent or bad."""
    value = (reply.header("Retry-After") or "").strip()
    if not value:
        return 1.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 1.0
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _progress_of(reply: _Reply) -> Any:
    """The progress a 202 reports, or ``_NOTHING``."""
    content_type = (reply.header("Content-Type") or "").lower()
    if "json" not in content_type or not reply.body or len(reply.body) > MAX_STATUS_DOCUMENT:
        return _NOTHING
    try:
        document = json.loads(reply.body)
    except ValueError:
        return _NOTHING
    if not isinstance(document, dict) or document.get("progress") is None:
        return _NOTHING
    return document["progress"]


def _cancel_quietly(task_url: str, headers: list[tuple[str, str]],
                    context: ssl.SSLContext | None) -> bool:
    try:
        return cancel(task_url, headers, ssl_context=context).ok
    except ClientError:
        return False


def _timeout_message(task_url: str | None) -> str:
    if task_url is None:
        return "timed out before the server accepted the request"
    return f"timed out waiting for the task {task_url}"

