"""``capture``: what a misbehaving application gets told, word for word.

The runner logs these messages (never the client: it gets a stored 500 with
``reason="invalid_response"``), so they are what an operator reads to find the
bug in the application.  They name the status code or the header, never a
header's value (it may hold a secret).
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from wsgi_async.capture import capture, validate_headers, validate_status
from wsgi_async.errors import ResponseError, ResultTooLarge, TaskTimeout

Environ = dict[str, Any]


def run(app: Any, max_result_size: int = 1000, deadline: float | None = None) -> Any:
    return capture(app, {"REQUEST_METHOD": "GET"}, max_result_size=max_result_size,
                   deadline=deadline)


def answering(status: object, headers: object, body: Iterable[object] = (b"x",)) -> Any:
    def app(environ: Environ, start_response: Any) -> Iterable[object]:
        start_response(status, headers)
        return body

    return app


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ("200OK", "invalid status line (a str of length 5; "
                  "expected a str like '200 OK' without control characters)"),
        (b"200 OK", "invalid status line (a bytes of length 6; "
                    "expected a str like '200 OK' without control characters)"),
        (200, "invalid status line (a int; "
              "expected a str like '200 OK' without control characters)"),
        ("200 caf\u0113", "status line 200 ... is not latin-1"),
        ("103 Early Hints", "informational status 103 cannot be a final response"),
    ],
)
def test_a_bad_status_line_is_described_by_its_type_and_length(
    status: object, message: str
) -> None:
    with pytest.raises(ResponseError) as raised:
        run(answering(status, []))
    assert str(raised.value) == message
    with pytest.raises(ResponseError) as direct:
        validate_status(status)
    assert str(direct.value) == message


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (("X-A", "1"), "headers must be a list, got tuple"),
        ([("X-A", "1"), ["X-Secret", "hunter2"]],
         "header 'X-Secret' is not a (name, value) tuple (a list of length 2)"),
        ([("X-A", "1", "2")], "header 'X-A' is not a (name, value) tuple (a tuple of length 3)"),
        ([("X-A", "1"), "hunter2"], "header #2 is not a (name, value) tuple (a str of length 7)"),
        ([("bad name", "hunter2", "x")],
         "header #1 is not a (name, value) tuple (a tuple of length 3)"),
        ([(1, "hunter2", "x")], "header #1 is not a (name, value) tuple (a tuple of length 3)"),
        ([None], "header #1 is not a (name, value) tuple (a NoneType)"),
        ([("bad name", "hunter2")], "invalid header name (not an HTTP token)"),
        ([(b"X-A", "hunter2")], "invalid header name (not an HTTP token)"),
        ([("X-A", "hunter\n2")], "invalid value for header 'X-A' (control characters)"),
        ([("X-A", b"hunter2")], "invalid value for header 'X-A' (control characters)"),
        ([("X-A", "hunter\u01132")], "value of header 'X-A' is not latin-1"),
    ],
)
def test_a_bad_header_is_named_and_its_value_never_shown(headers: object, message: str) -> None:
    with pytest.raises(ResponseError) as raised:
        run(answering("200 OK", headers))
    assert str(raised.value) == message
    assert "hunter" not in str(raised.value)
    with pytest.raises(ResponseError) as direct:
        validate_headers(headers)
    assert str(direct.value) == message


def test_latin_1_values_and_names_pass_as_they_are() -> None:
    headers = [("X-A", "caf\u00e9\tn\u00e9"), ("X-B", "")]
    assert validate_headers(headers) == headers
    assert validate_status("200 Caf\u00e9") == "200 Caf\u00e9"
    assert validate_status("200 ") == "200 "


def test_misuse_of_start_response_and_write_is_named() -> None:
    def twice(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        start_response("500 Oops", [])
        return [b"x"]

    def body_first(environ: Environ, start_response: Any) -> Iterator[bytes]:
        yield b"x"
        start_response("200 OK", [])

    def never(environ: Environ, start_response: Any) -> Iterable[bytes]:
        return []

    expected = {
        twice: "start_response was called twice without exc_info",
        body_first: "the application produced a body before calling start_response",
        never: "the application returned without calling start_response",
        answering("200 OK", [], ["text"]): "the application produced str, not bytes",
        answering("200 OK", [], [bytearray(b"x")]):
            "the application produced bytearray, not bytes",
    }
    for app, message in expected.items():
        with pytest.raises(ResponseError) as raised:
            run(app)
        assert str(raised.value) == message


def test_an_empty_chunk_before_start_response_is_no_body() -> None:
    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        yield b""
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"late"

    stored = run(app)
    assert (stored.status, stored.body) == ("200 OK", b"late")


def test_the_size_limit_and_the_deadline_say_which_was_passed() -> None:
    with pytest.raises(ResultTooLarge) as raised:
        run(answering("200 OK", [], [b"a" * 6, b"b" * 5]), max_result_size=10)
    assert str(raised.value) == "the response body exceeded max_result_size (10 bytes)"
    with pytest.raises(TaskTimeout) as late:
        run(answering("200 OK", [], [b"x"]), deadline=time.monotonic() - 1)
    assert str(late.value) == "the task ran past its timeout"
    # Before the deadline, nothing is said.
    assert run(answering("200 OK", [], [b"x"]), deadline=time.monotonic() + 60).body == b"x"


def test_exc_info_after_the_body_started_reraises_with_the_applications_traceback() -> None:
    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"partial"
        try:
            raise KeyError("deep in the application")
        except KeyError:
            start_response("500 Oops", [], sys.exc_info())
        yield b"never"

    with pytest.raises(KeyError) as raised:
        run(app)
    # The traceback goes down to where the application raised, not only to the re-raise.
    lines = [frame.line for frame in traceback.extract_tb(raised.value.__traceback__)]
    assert 'raise KeyError("deep in the application")' in lines, lines


def test_exc_info_before_the_body_replaces_the_response() -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("X-First", "1")])
        try:
            raise KeyError("before any body")
        except KeyError:
            start_response("500 Oops", [("X-Second", "1")], sys.exc_info())
        return [b"error page"]

    stored = run(app)
    assert stored.status == "500 Oops" and ("X-Second", "1") in stored.headers
    assert ("X-First", "1") not in stored.headers and stored.body == b"error page"
