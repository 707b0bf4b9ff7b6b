"""What a hostile client, a confused proxy or a sloppy application cannot do through the front.

Idempotency keys never cross callers, a ``Location`` never leaves the host, the log
cannot be forged and never holds a header value, replays are safe for intermediaries,
pending requests are counted with their headers, and stacked middleware runs a task
once.  Through webtest, with wsgiref.validate on both sides unless a test says why not.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit
from wsgiref.validate import validator

import pytest
from webtest import TestApp
from werkzeug.middleware.proxy_fix import ProxyFix

from wsgi_async import AsyncMiddleware
from wsgi_helpers import Environ, Gate, client, echo_app, raw_call, read_body, wait_result


@pytest.fixture
def cleanup() -> Iterator[list[AsyncMiddleware]]:
    made: list[AsyncMiddleware] = []
    yield made
    for middleware in made:
        middleware.shutdown(wait=True, timeout=5)
        middleware.registry.close()  # its wake-up thread must not outlive the test


def make(
    cleanup: list[AsyncMiddleware], app: Any, **options: Any
) -> tuple[AsyncMiddleware, TestApp]:
    middleware, test_app = client(app, **options)
    cleanup.append(middleware)
    return middleware, test_app


def counting(calls: list[bytes]) -> Any:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        body = read_body(environ)
        calls.append(body)
        start_response("201 Created", [("Content-Type", "application/octet-stream")])
        return [b"echo:", body]

    return app


# -- 4. Idempotency keys never cross callers --------------------------------------------------


def test_idempotency_keys_without_owner_are_scoped_by_credentials(
    cleanup: list[AsyncMiddleware],
) -> None:
    calls: list[bytes] = []
    _, app = make(cleanup, counting(calls))
    key = {"Idempotency-Key": "pay-1"}
    alice = app.post("/async", b"pay 10", headers={**key, "Authorization": "Bearer alice"})
    bob = app.post("/async", b"pay 10", headers={**key, "Authorization": "Bearer bob"})
    assert alice.headers["Location"] != bob.headers["Location"]  # bob never reads alice's result
    # A different body under another caller's key is a new task, not a 422 telling the key is used.
    carol = app.post("/async", b"pay 99", headers={**key, "Cookie": "session=carol"}, status=202)
    retry = app.post("/async", b"pay 10", headers={**key, "Authorization": "Bearer alice"})
    assert retry.headers["Location"] == alice.headers["Location"]
    app.post("/async", b"pay 11", headers={**key, "Authorization": "Bearer alice"}, status=422)
    for res in (alice, bob, carol):
        wait_result(app, res.headers["Location"], status=201)
    assert sorted(calls) == [b"pay 10", b"pay 10", b"pay 99"]


def test_credentials_are_never_stored_in_clear(
    cleanup: list[AsyncMiddleware], tmp_path: Path
) -> None:
    _, app = make(cleanup, echo_app, registry=f"sqlite:///{tmp_path / 'tasks.db'}")
    secret = "Bearer token-5f0e8a11c0ffee"
    headers = {"Idempotency-Key": "k", "Authorization": secret, "Cookie": "sid=cookie-77aa91"}
    location = app.post("/async", b"x", headers=headers).headers["Location"]
    wait_result(app, location, status=201)
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.is_file())
    assert b"token-5f0e8a11c0ffee" not in stored and b"cookie-77aa91" not in stored


def test_idempotency_keys_with_an_owner_follow_the_owner(cleanup: list[AsyncMiddleware]) -> None:
    calls: list[bytes] = []
    _, app = make(cleanup, counting(calls), owner=lambda environ: environ.get("HTTP_X_USER"))
    first = app.post("/async", b"a", headers={"Idempotency-Key": "k", "X-User": "alice",
                                              "Cookie": "rotating=1"})
    # The owner is the caller: a rotated cookie does not make a retry a new task.
    again = app.post("/async", b"a", headers={"Idempotency-Key": "k", "X-User": "alice",
                                              "Cookie": "rotating=2"})
    other = app.post("/async", b"a", headers={"Idempotency-Key": "k", "X-User": "mallory"})
    assert first.headers["Location"] == again.headers["Location"] != other.headers["Location"]
    app.get(first.headers["Location"], headers={"X-User": "alice", "Prefer": "wait=10"},
            status=201)


# -- 5. Location never points to another host -------------------------------------------------


def assert_same_host(asked: str, location: str) -> None:
    """``location`` resolved against ``asked`` stays on ``asked``'s host, as browsers see it."""
    if not urlsplit(location).scheme:  # browsers read "///host" and "/\\host" as "//host"
        assert location[:1] == "/" and location[1:2] not in ("/", "\\"), location
    resolved = urlsplit(urljoin(asked, location))
    assert resolved.hostname == urlsplit(asked).hostname, location
    assert "\\" not in location, location
    assert not resolved.path.startswith("//"), location


@pytest.mark.parametrize(
    "script_name", ["//evil.example", "///evil.example/", "//evil.example/app", "/\\evil.example"]
)
def test_location_stays_on_the_host_that_was_asked(
    cleanup: list[AsyncMiddleware], script_name: str
) -> None:
    _, app = make(cleanup, echo_app)
    res = app.post("/async", b"", extra_environ={"SCRIPT_NAME": script_name}, status=202)
    assert_same_host("http://localhost/async", res.headers["Location"])
    assert res.json["location"] == res.headers["Location"]
    task = "/_async/tasks/" + res.json["id"]
    pending = app.get(task, extra_environ={"SCRIPT_NAME": script_name}, status="*")
    if pending.status_int == 202:
        assert_same_host("http://localhost/async", pending.headers["Location"])


def test_location_through_proxyfix_stays_on_the_host(cleanup: list[AsyncMiddleware]) -> None:
    middleware = AsyncMiddleware(validator(echo_app), routes=[r"^/async"])
    cleanup.append(middleware)
    app = TestApp(validator(ProxyFix(validator(middleware), x_prefix=1)))
    for prefix in ("//evil.example", "//evil.example/", "/app//x", "////evil.example"):
        res = app.post("/async", b"", headers={"X-Forwarded-Prefix": prefix}, status=202)
        assert_same_host("http://localhost/async", res.headers["Location"])
    res = app.post("/async", b"", headers={"X-Forwarded-Prefix": "/app"}, status=202)
    assert urlsplit(res.headers["Location"]).path.startswith("/app/_async/tasks/")


@pytest.mark.parametrize("status_path", ["//evil.example/tasks", "///tasks"])
def test_a_status_path_of_another_host_is_refused(status_path: str) -> None:
    with pytest.raises(ValueError, match="status_path"):
        AsyncMiddleware(echo_app, routes=[r"^/async"], status_path=status_path)


# -- 6. max_pending_bytes counts what a pending request holds, headers included ---------------


def test_pending_bytes_count_the_headers(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    middleware, app = make(cleanup, gate, max_workers=1, max_queued=1000, max_body_size=1024,
                           max_pending_bytes=1024 * 1024)
    headers = {f"X-Big-{index}": "h" * 8192 for index in range(50)}  # about 400 KB each
    try:
        codes = [app.post("/async", b"", headers=headers, status="*").status_int
                 for _ in range(10)]
        accepted = codes.count(202)
        assert 1 <= accepted <= 2 and codes.count(503) == 10 - accepted, codes
        assert len(middleware.registry) == accepted  # type: ignore[arg-type]
        refused = app.post("/async", b"", headers=headers, status=503)
        assert refused.headers["Retry-After"] == "1"
    finally:
        gate.opened.set()
    middleware.shutdown(wait=True, timeout=5)
    assert gate.calls == accepted


def test_a_lone_request_of_max_body_size_is_always_admitted(
    cleanup: list[AsyncMiddleware],
) -> None:
    _, app = make(cleanup, echo_app, max_body_size=1000, max_pending_bytes=1000)
    location = app.post("/async", b"x" * 1000, status=202).headers["Location"]
    assert wait_result(app, location, status=201).body == b"echo:" + b"x" * 1000


# -- 9. The log cannot be forged -----------------------------------------------------------------


FORGED = "/async\nWARNING:wsgi_async: task forged accepted\r\x1b[2J\u2028\x85end"


@pytest.mark.parametrize(
    ("environ", "code"),
    [
        ({"CONTENT_LENGTH": "abc"}, 400),
        ({"CONTENT_LENGTH": "10", "wsgi.input": io.BytesIO(b"abc")}, 400),
        ({"HTTP_TRANSFER_ENCODING": "chunked"}, 411),
        ({"CONTENT_LENGTH": "5000"}, 413),
    ],
)
def test_refusal_log_lines_cannot_be_forged(
    cleanup: list[AsyncMiddleware], caplog: pytest.LogCaptureFixture, environ: Environ, code: int
) -> None:
    middleware, _ = make(cleanup, echo_app, max_body_size=1024)
    with caplog.at_level(logging.INFO, logger="wsgi_async"):
        status, _, body = raw_call(middleware, {"PATH_INFO": FORGED,
                                                "REQUEST_METHOD": "POST\nX", **environ})
    assert status.startswith(str(code)) and json.loads(body)["error"]
    messages = [record.getMessage() for record in caplog.records]
    assert messages
    for message in messages:
        assert not any(char in message for char in "\n\r\x1b\u2028\x85"), message
    assert any("/async\\nWARNING" in message for message in messages)


def test_a_percent_encoded_newline_through_webtest(
    cleanup: list[AsyncMiddleware], caplog: pytest.LogCaptureFixture
) -> None:
    _, app = make(cleanup, echo_app, max_body_size=10)
    with caplog.at_level(logging.INFO, logger="wsgi_async"):
        app.post("/async%0AERROR%3Afake", b"x" * 11, status=413)
    assert caplog.records
    assert all("\n" not in record.getMessage() for record in caplog.records)


# -- 10. Header values never reach the log ----------------------------------------------------

SECRET = "session=s3cr3t-v4lue"


@pytest.mark.parametrize(
    "headers",
    [
        [["Set-Cookie", SECRET]],  # a list, not a tuple
        [("Set-Cookie", SECRET, "extra")],
        [("Set-Cookie",)],
        [("Set-Cookie", SECRET.encode())],
        [(b"Set-Cookie", SECRET)],
        [("Set-Cookie", SECRET + "\r\nX: 1")],
        [("Set-Cookie", SECRET + "\u2603")],
        ("Set-Cookie", SECRET),
    ],
)
def test_an_invalid_header_is_named_and_its_value_never_logged(
    cleanup: list[AsyncMiddleware], caplog: pytest.LogCaptureFixture, headers: Any
) -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", headers)
        return [b"x"]

    _, test_app = make(cleanup, app, validate_inner=False)
    with caplog.at_level(logging.INFO, logger="wsgi_async"):
        res = wait_result(test_app, test_app.post("/async").headers["Location"], status=500)
    assert res.json["reason"] == "invalid_response"
    assert "s3cr3t" not in caplog.text
    if isinstance(headers, list) and isinstance(headers[0][0], str):
        assert "Set-Cookie" in caplog.text


def test_a_status_line_carrying_a_header_is_not_logged(
    cleanup: list[AsyncMiddleware], caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response(f"200 OK\r\nSet-Cookie: {SECRET}", [])
        return [b"x"]

    _, test_app = make(cleanup, app, validate_inner=False)
    with caplog.at_level(logging.INFO, logger="wsgi_async"):
        wait_result(test_app, test_app.post("/async").headers["Location"], status=500)
    assert "s3cr3t" not in caplog.text and "status line" in caplog.text


# -- 12. Replays and intermediaries ------------------------------------------------------------


def fixed(status: str, headers: list[tuple[str, str]], body: bytes = b"body") -> Any:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response(status, headers)
        return [body]

    return app


def test_headers_named_in_connection_are_dropped(cleanup: list[AsyncMiddleware]) -> None:
    app = fixed("200 OK", [("Content-Type", "text/plain"), ("Connection", "close, X-Private"),
                           ("Connection", " x-hop2 "), ("X-Private", "internal"),
                           ("X-Hop2", "y"), ("X-Kept", "yes")])
    _, test_app = make(cleanup, app, validate_inner=False)  # the validator refuses Connection
    res = wait_result(test_app, test_app.post("/async").headers["Location"], status=200)
    names = {name.lower() for name, _ in res.headerlist}
    assert not names & {"connection", "x-private", "x-hop2"}
    assert res.headers["X-Kept"] == "yes" and res.body == b"body"


def test_205_replays_no_body(cleanup: list[AsyncMiddleware]) -> None:
    _, test_app = make(cleanup, fixed("205 Reset Content", [("Content-Type", "text/plain")],
                                            b"must not be sent"),
                       validate_inner=False)
    res = wait_result(test_app, test_app.post("/async").headers["Location"], status=205)
    assert res.body == b"" and res.headers.get("Content-Length", "0") == "0"


def test_304_keeps_no_body_and_no_length(cleanup: list[AsyncMiddleware]) -> None:
    _, test_app = make(cleanup, fixed("304 Not Modified", [("ETag", '"v1"')], b""))
    res = wait_result(test_app, test_app.post("/async").headers["Location"], status=304)
    assert res.body == b"" and "Content-Length" not in res.headers
    assert res.headers["ETag"] == '"v1"'


def test_owner_bound_replays_are_private_unless_the_app_says(
    cleanup: list[AsyncMiddleware],
) -> None:
    owner = {"owner": lambda environ: environ.get("HTTP_X_USER")}
    user = {"X-User": "alice"}
    _, bound = make(cleanup, fixed("200 OK", [("Content-Type", "text/plain")]), **owner)
    waiting = {**user, "Prefer": "wait=10"}
    res = bound.get(bound.post("/async", headers=user).headers["Location"], headers=waiting)
    assert res.headers["Cache-Control"] == "private"
    cached = fixed("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")])
    _, own = make(cleanup, cached, **owner)
    res = own.get(own.post("/async", headers=user).headers["Location"], headers=waiting)
    assert res.headers.getall("Cache-Control") == ["max-age=60"]  # the app's own, kept
    _, public = make(cleanup, fixed("200 OK", [("Content-Type", "text/plain")]))
    res = wait_result(public, public.post("/async").headers["Location"], status=200)
    assert "Cache-Control" not in res.headers
    # The one-round-trip submit replays too.
    res = bound.post("/async", headers={**user, "Prefer": "respond-async, wait=5"}, status=200)
    assert res.headers["Cache-Control"] == "private"


# -- 13. Stacked middleware runs a task once ---------------------------------------------------


def test_a_second_middleware_below_passes_a_task_through(cleanup: list[AsyncMiddleware]) -> None:
    calls: list[bytes] = []
    inner = AsyncMiddleware(validator(counting(calls)), routes=[r"^/async"])
    cleanup.append(inner)
    _, app = make(cleanup, inner)
    res = wait_result(app, app.post("/async", b"once").headers["Location"], status=201)
    assert res.body == b"echo:once" and calls == [b"once"]
    assert len(inner.registry) == 0  # type: ignore[arg-type]


def test_the_same_middleware_reached_again_passes_a_task_through(
    cleanup: list[AsyncMiddleware],
) -> None:
    calls: list[bytes] = []
    holder: list[Any] = []

    def dispatch(environ: Environ, start_response: Any) -> Iterable[bytes]:
        # An app that forwards the request internally, through the whole stack again.
        if "test.forwarded" not in environ:
            environ["test.forwarded"] = True
            return holder[0](environ, start_response)  # type: ignore[no-any-return]
        return counting(calls)(environ, start_response)

    middleware, app = make(cleanup, dispatch)
    holder.append(middleware)
    res = wait_result(app, app.post("/async", b"again").headers["Location"], status=201)
    assert res.body == b"echo:again" and calls == [b"again"]
    assert len(middleware.registry) == 1  # type: ignore[arg-type]
