"""Small WSGI apps and clients shared by the middleware tests."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.validate import validator

from webtest import TestApp

from wsgi_async import AsyncMiddleware

Environ = dict[str, Any]


def read_body(environ: Environ) -> bytes:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    return environ["wsgi.input"].read(length) if length else b""


def echo_app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answers 201 with the body it was sent and a few telling headers."""
    body = read_body(environ)
    start_response(
        "201 Created",
        [
            ("Content-Type", "application/octet-stream"),
            ("X-Method", environ["REQUEST_METHOD"]),
            ("X-Query", environ.get("QUERY_STRING", "")),
        ],
    )
    return [b"echo:", body]


def sleeping(
    seconds: float, inner: Callable[..., Iterable[bytes]] = echo_app
) -> Callable[..., Any]:
    def app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        time.sleep(seconds)
        return inner(environ, start_response)

    return app


class Gate:
    """An app that blocks every task until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.calls = 0

    def __call__(self, environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            self.opened.wait(10)
        finally:
            with self.lock:
                self.running -= 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"gate passed"]


class Closing:
    """An iterable that records whether ``close()`` was called, optionally failing mid-way."""

    def __init__(self, chunks: list[Any], fail_after: int | None = None) -> None:
        self.chunks = chunks
        self.fail_after = fail_after
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        for index, chunk in enumerate(self.chunks):
            if self.fail_after is not None and index >= self.fail_after:
                raise RuntimeError("the iterable broke mid-way")
            yield chunk

    def close(self) -> None:
        self.closed = True


def client(
    app: Callable[..., Any], *, validate_inner: bool = True, **options: Any
) -> tuple[AsyncMiddleware, TestApp]:
    """The middleware around ``app``, and a webtest client; validator on both sides."""
    options.setdefault("routes", [r"^/async"])
    inner = validator(app) if validate_inner else app
    middleware = AsyncMiddleware(inner, **options)
    return middleware, TestApp(validator(middleware))


def wait_result(test_app: TestApp, location: str, status: int | str = "*", **kw: Any) -> Any:
    """Fetch a task's final response, holding with ``Prefer: wait``."""
    return test_app.get(location, headers={"Prefer": "wait=10"}, status=status, **kw)


def raw_call(
    app: Any, environ: Environ, without: tuple[str, ...] = ()
) -> tuple[str, list[tuple[str, str]], bytes]:
    """Call ``app`` with a minimal environ completed by ``environ`` and less the keys
    ``without`` (for what webtest would correct); its status, headers and whole body, its
    iterable closed."""
    answer: list[Any] = []
    base: Environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/async", "SCRIPT_NAME": "", "QUERY_STRING": "",
        "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(), "wsgi.multithread": True, "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    base.update(environ)
    for key in without:
        del base[key]

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        answer[:] = [status, headers]
        return lambda data: None

    result = app(base, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return answer[0], answer[1], body
