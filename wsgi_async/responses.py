"""The responses the middleware itself sends: JSON documents and replays.

Everything made here carries ``Cache-Control: no-store`` so no cache keeps
a pending state or hands one client's result to another.  A replay sends a
stored application response exactly as it was captured.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import error_document, json_body, status_line
from .registry.base import StoredResponse
from .types import StartResponse, WSGIEnvironment

NO_STORE = ("Cache-Control", "no-store")
TASK_HEADER = "Async-Task"
PRIVATE = ("Cache-Control", "private")
JSON_TYPE = ("Content-Type", "application/json")


def send_json(
    environ: WSGIEnvironment,
    start_response: StartResponse,
    code: int,
    document: dict[str, object],
    headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    """Answer ``code`` with ``document`` as JSON (no body for ``HEAD``)."""
    body = json_body(document)
    response_headers = [JSON_TYPE, NO_STORE, ("Content-Length", str(len(body)))]
    if headers:
        response_headers.extend(headers)
    start_response(status_line(code), response_headers)
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def send_error(
    environ: WSGIEnvironment,
    start_response: StartResponse,
    code: int,
    detail: str,
    headers: Iterable[tuple[str, str]] = (),
    **extra: object,
) -> list[bytes]:
    """Answer with a JSON error document ``{"error", "detail", ...}``."""
    return send_json(environ, start_response, code, error_document(code, detail, **extra), headers)


def send_empty(
    start_response: StartResponse, code: int, headers: Iterable[tuple[str, str]] = ()
) -> list[bytes]:
    start_response(status_line(code), [NO_STORE, *headers])
    return []


def task_state(state: str, task_id: str | None = None) -> tuple[str, str]:
    """The ``Async-Task`` header: the task a status-path response is about, and its state.

    Every answer on the status path carries it, replays of the application's own
    response included, so that a client tells the application's ``404`` from
    the middleware's "no such task" (``Async-Task: unknown``).  A structured
    field (RFC 8941): a token, then the id as a string parameter.
    """
    return (TASK_HEADER, state if task_id is None else f'{state};id="{task_id}"')


def replay(
    environ: WSGIEnvironment, start_response: StartResponse, stored: StoredResponse,
    private: bool = False, extra: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    """Send a stored response as the application produced it.

    Its own caching headers are kept; with ``private`` (a task bound to an
    owner) a response without ``Cache-Control`` gets ``Cache-Control: private``,
    so no shared cache hands one caller's result to another.  ``extra``
    headers (the middleware's own, e.g. ``Preference-Applied``) go last.
    """
    headers = list(stored.headers)
    if private and not any(name.lower() == "cache-control" for name, _ in headers):
        headers.append(PRIVATE)
    if extra:
        headers.extend(extra)
    start_response(stored.status, headers)
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [stored.body]
