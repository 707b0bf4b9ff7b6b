"""WSGI type aliases shared by the modules (PEP 3333)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Protocol, Union

WSGIEnvironment = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
OptExcInfo = Union[ExcInfo, tuple[None, None, None]]  # noqa: UP007 (runtime alias)
WriteCallable = Callable[[bytes], object]


class StartResponse(Protocol):
    def __call__(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: OptExcInfo | None = ...,
        /,
    ) -> WriteCallable: ...


WSGIApplication = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]

__all__ = ["ExcInfo", "OptExcInfo", "StartResponse", "WSGIApplication", "WSGIEnvironment"]
