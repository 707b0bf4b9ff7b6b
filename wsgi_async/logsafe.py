"""Request values made safe to log: one line, no terminal escapes.

A client controls the path, the method and the headers it sends; logged as they
are, a percent-encoded newline writes a line of its own into the log (log
forging), and an escape sequence rewrites a terminal.  Every request value that
reaches a log line goes through :func:`printable` first.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the
# backslash itself, so that an escaped "\n" and a literal backslash-n differ.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
MAX_LOGGED = 1000


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    escaped = _ESCAPES.get(char)
    if escaped is not None:
        return escaped
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object, limit: int = MAX_LOGGED) -> str:
    """``value`` as one printable line: controls escaped, cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}...({len(text)} characters)"
    return _UNSAFE.sub(_escape, text)
