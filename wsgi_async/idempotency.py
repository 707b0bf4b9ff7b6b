"""``Idempotency-Key``: a retried submit gets the task its first try created.

A key is scoped to its caller (:func:`caller_scope`: the owner, or else the
request's credentials; :func:`scoped_key`), and a task remembers a
:func:`fingerprint` of its request, so that the same key sent with a
different request is told apart (``422``) rather than answered with
another request's task.
"""

from __future__ import annotations

import hashlib
import re

from .model import RequestSnapshot
from .types import WSGIEnvironment

_KEY = re.compile(r"[\x21-\x7e]{1,255}")


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


def fingerprint(request: RequestSnapshot) -> str:
    """A hash of what makes a request the same request: method, target and body."""
    env = request.environ
    target = f"{env.get('REQUEST_METHOD', '')}\0{env.get('PATH_INFO', '')}\0" \
        f"{env.get('QUERY_STRING', '')}\0"
    digest = hashlib.sha256(target.encode("utf-8", "surrogateescape"))
    digest.update(request.body)
    return digest.hexdigest()


def scoped_key(owner: str | None, key: str) -> str:
    """An idempotency key is only shared by requests of the same owner."""
    return hashlib.sha256(f"{owner or ''}\0{key}".encode()).hexdigest()


def caller_scope(environ: WSGIEnvironment, owner: str | None) -> str:
    """Who may share an idempotency key: the owner, else the request's credentials.

    Without an owner, two callers are the same one only if they send the same
    ``Authorization`` and ``Cookie``: a key never crosses callers.  The
    credentials are hashed here and never kept in clear.
    """
    if owner is not None:
        return owner
    credentials = "\0".join(
        str(environ.get(name, "")) for name in ("HTTP_AUTHORIZATION", "HTTP_COOKIE")
    )
    digest = hashlib.sha256(credentials.encode("utf-8", "surrogateescape")).hexdigest()
    return f"credentials:{digest}"
