"""The ``Prefer`` request header (RFC 7240): the preferences this middleware honours."""

from __future__ import annotations

from dataclasses import dataclass

from werkzeug.http import parse_list_header

from .types import WSGIEnvironment


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
