"""WSGI type aliases (PEP 3333), the standard ones from typeshed when type checking."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

WriteCallable = Callable[[bytes], object]

if TYPE_CHECKING:
    from _typeshed import OptExcInfo as OptExcInfo
    from _typeshed.wsgi import StartResponse as StartResponse
    from _typeshed.wsgi import WSGIApplication as WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment as WSGIEnvironment
else:
    WSGIEnvironment = dict[str, Any]
    StartResponse = Callable[..., WriteCallable]
    WSGIApplication = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]
    OptExcInfo = tuple

__all__ = ["OptExcInfo", "StartResponse", "WSGIApplication", "WSGIEnvironment", "WriteCallable"]
