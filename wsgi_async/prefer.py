"""Request headers the middleware reads: ``Prefer`` (RFC 7240) and ``Idempotency-Key``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from werkzeug.http import parse_list_header

from .types import WSGIEnvironment

_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@dataclass(frozen=True, slots=True)
class Preferences:
    """The preferences this middleware honours."""

    respond_async: bool = False
    wait: float | None = None


NO_PREFERENCES = Preferences()


def parse_prefer(environ: WSGIEnvironment) -> Preferences:
    """Parse ``Prefer`` (RFC 7240 section 2); unknown or malformed preferences are ignored."""
    header = environ.get("HTTP_PREFER")
    if not header:
        return NO_PREFERENCES
    respond_async = False
    wait: float | None = None
    for item in parse_list_header(header):
        token, _, value = item.split(";", 1)[0].partition("=")
        name = token.strip().lower()
        value = value.strip().strip('"')
        if name == "respond-async":
            respond_async = True
        elif name == "wait" and wait is None and value.isascii() and value.isdigit():
            wait = float(value)
    return Preferences(respond_async, wait)


def parse_idempotency_key(environ: WSGIEnvironment) -> str | None:
    """The ``Idempotency-Key`` value (a structured-field string or a bare token).

    Raises :class:`ValueError` when the header is present but unusable.
    """
    raw = environ.get("HTTP_IDEMPOTENCY_KEY")
    if not isinstance(raw, str):
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not _KEY.fullmatch(key):
        raise ValueError("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return key
