"""Exceptions and the JSON error documents the middleware answers with.

Every error a client sees is a small JSON object ``{"error": ..., "detail": ...}``
with ``Cache-Control: no-store``; none ever carries a traceback.
"""

from __future__ import annotations

import json
from http import HTTPStatus


class WsgiAsyncError(Exception):
    """Base class of every error this package raises on purpose."""


class RegistryError(WsgiAsyncError):
    """A registry could not do what was asked."""


class RegistryUnavailable(RegistryError):
    """The registry's storage cannot be reached; the request may be retried."""


class MaybeWritten(RegistryUnavailable):
    """The registry stopped answering after a write was sent: it may still be stored."""


class RegistryFull(RegistryError):
    """The registry holds its maximum number of tasks."""


class QueueFull(WsgiAsyncError):
    """Every worker is busy and the waiting queue is full."""


class ResponseError(WsgiAsyncError):
    """The downstream application produced a response that cannot be stored."""


class ResultTooLarge(ResponseError):
    """The downstream application's body exceeded ``max_result_size``."""


class TaskTimeout(WsgiAsyncError):
    """The task ran past its timeout."""


class TaskCancelled(WsgiAsyncError):
    """Raised by ``TaskHandle.check()``: the task was cancelled, its result would be discarded.

    An application may let it propagate: the runner then ends the task quietly
    (no traceback, nothing stored over the cancellation).
    """


# Built once: ``json.dumps`` with options builds a new encoder on every call.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_PHRASES = {status.value: status.phrase for status in HTTPStatus}
_STATUS_LINES = {code: f"{code} {phrase}" for code, phrase in _PHRASES.items()}


def status_line(code: int) -> str:
    """``"404 Not Found"`` for ``404``."""
    line = _STATUS_LINES.get(code)
    return f"{code} {HTTPStatus(code).phrase}" if line is None else line


def json_body(document: dict[str, object]) -> bytes:
    return _ENCODE(document).encode("utf-8")


def error_document(code: int, detail: str, **extra: object) -> dict[str, object]:
    """The JSON error object for status ``code``."""
    phrase = _PHRASES.get(code)
    return {"error": HTTPStatus(code).phrase if phrase is None else phrase, "detail": detail,
            **extra}


def error_parts(
    code: int, detail: str, **extra: object
) -> tuple[str, tuple[tuple[str, str], ...], bytes]:
    """Status line, headers and body of a JSON error response."""
    body = json_body(error_document(code, detail, **extra))
    headers = (
        ("Content-Type", "application/json"),
        ("Cache-Control", "no-store"),
        ("Content-Length", str(len(body))),
    )
    return status_line(code), headers, body
