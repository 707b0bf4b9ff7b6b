"""The HTTP contract of AsyncMiddleware, via webtest, with wsgiref.validate on both sides."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from webtest import TestApp

from wsgi_async import AsyncMiddleware
from wsgi_async.registry import MemoryRegistry, TaskRecord, Tombstone
from wsgi_async.request import BodyError
from wsgi_async.request import read_body as read_request_body
from wsgi_helpers import (
    Closing,
    Environ,
    Gate,
    client,
    echo_app,
    raw_call,
    read_body,
    sleeping,
    wait_result,
)


@pytest.fixture
def cleanup() -> Iterator[list[AsyncMiddleware]]:
    made: list[AsyncMiddleware] = []
    yield made
    for middleware in made:
        middleware.shutdown(wait=True, timeout=5)


def make(
    cleanup: list[AsyncMiddleware], app: Any, **options: Any
) -> tuple[AsyncMiddleware, TestApp]:
    middleware, test_app = client(app, **options)
    cleanup.append(middleware)
    return middleware, test_app


# -- submit and poll -----------------------------------------------------------------


def test_submit_answers_202_at_once_with_a_location(cleanup: list[AsyncMiddleware]) -> None:
    _, app = make(cleanup, sleeping(0.5))
    began = time.monotonic()
    res = app.post("/async/x?q=1", b"payload", status=202)
    assert time.monotonic() - began < 0.4
    location = res.headers["Location"]
    assert location.startswith("http://localhost/_async/tasks/")
    assert res.headers["Retry-After"] == "1"
    assert res.headers["Cache-Control"] == "no-store"
    assert res.content_type == "application/json"
    assert res.json["status"] == "queued"
    assert res.json["location"] == location
    assert res.json["id"] == location.rsplit("/", 1)[1]
    assert len(res.json["id"]) >= 22  # 128 bits or more, URL-safe


def test_pending_then_the_apps_response_byte_for_byte(cleanup: list[AsyncMiddleware]) -> None:
    _, app = make(cleanup, sleeping(0.3))
    payload = bytes(range(256))
    location = app.post("/async/x?q=1", payload).headers["Location"]
    pending = app.get(location, status=202)
    assert pending.json["status"] in ("queued", "running")
    assert set(pending.json) >= {"id", "status", "created_at", "started_at", "progress"}
    assert pending.json["progress"] is None
    assert pending.headers["Location"] == location
    assert pending.headers["Retry-After"] == "1"
    assert pending.headers["Cache-Control"] == "no-store"
    done = wait_result(app, location, status=201)
    assert done.body == b"echo:" + payload
    assert done.headers["Content-Type"] == "application/octet-stream"
    assert done.headers["X-Method"] == "POST"
    assert done.headers["X-Query"] == "q=1"
    assert done.headers["Content-Length"] == str(len(done.body))
    again = app.get(location, status=201)  # results stay until their TTL
    assert again.body == done.body
    head = app.head(location, status=201)
    assert head.body == b""
    assert head.headers["Content-Length"] == str(len(done.body))


def test_location_is_under_script_name(cleanup: list[AsyncMiddleware]) -> None:
    _, app = make(cleanup, echo_app)
    res = app.post("/async", b"", extra_environ={"SCRIPT_NAME": "/mount"}, status=202)
    assert res.headers["Location"].startswith("http://localhost/mount/_async/tasks/")
    task_path = res.headers["Location"][len("http://localhost/mount") :]
    wait_result(app, task_path, status=201, extra_environ={"SCRIPT_NAME": "/mount"})


def test_custom_status_path(cleanup: list[AsyncMiddleware]) -> None:
    _, app = make(cleanup, echo_app, status_path="/jobs/")
    location = app.post("/async", b"x").headers["Location"]
    assert location.startswith("http://localhost/jobs/")
    assert wait_result(app, location, status=201).body == b"echo:x"


def test_task_environ_carries_the_task_handle(cleanup: list[AsyncMiddleware]) -> None:
    seen: dict[str, Any] = {}

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        seen.update(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    _, test_app = make(cleanup, app)
    res = test_app.post(
        "/async",
        b"abc",
        headers={"X-Custom": "yes"},
        extra_environ={
            "gunicorn.socket": object(),
            "waitress.client": object(),
            "uwsgi.core": 1,
            "myapp.note": "kept",
        },
    )
    wait_result(test_app, res.headers["Location"], status=200)
    assert seen["wsgi_async.task"].id == res.json["id"]
    assert seen["wsgi_async.task"].attempt == 1
    assert seen["HTTP_X_CUSTOM"] == "yes"
    assert seen["myapp.note"] == "kept"
    assert seen["CONTENT_LENGTH"] == "3"
    assert not [k for k in seen if k.startswith(("gunicorn.", "waitress.", "uwsgi."))]
    assert seen["wsgi.input_terminated"] is True
    seen["wsgi.errors"].write("still open\n")


def test_file_wrapper_is_buffered(cleanup: list[AsyncMiddleware], tmp_path: Any) -> None:
    data = b"file contents " * 1000
    path = tmp_path / "report.bin"
    path.write_bytes(data)

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](open(path, "rb"), 4096)  # noqa: SIM115

    _, test_app = make(cleanup, app)
    location = test_app.post("/async").headers["Location"]
    assert wait_result(test_app, location, status=200).body == data


# -- pass-through ------------------------------------------------------------------------


def test_unmatched_requests_pass_through_untouched(cleanup: list[AsyncMiddleware]) -> None:
    returned = Closing([b"a", b"b"])

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return returned

    middleware = AsyncMiddleware(app, routes={r"^/async": ["POST"]})
    cleanup.append(middleware)
    environ = {"PATH_INFO": "/other", "REQUEST_METHOD": "GET"}
    assert middleware(environ, lambda *a: None) is returned  # type: ignore[arg-type]
    environ = {"PATH_INFO": "/async", "REQUEST_METHOD": "GET"}  # method not routed
    assert middleware(environ, lambda *a: None) is returned  # type: ignore[arg-type]


def test_pass_through_streams_under_the_validator(cleanup: list[AsyncMiddleware]) -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"one ", b"two"])

    _, test_app = make(cleanup, app)
    assert test_app.get("/plain").body == b"one two"


def test_route_methods_and_options(cleanup: list[AsyncMiddleware]) -> None:
    routes = {r"^/export/\w+$": {"methods": ["POST"], "timeout": 5, "result_ttl": 60}}
    _, app = make(cleanup, echo_app, routes=routes)
    assert app.post("/export/abc", b"", status=202)
    assert app.get("/export/abc", status=201).body == b"echo:"  # GET passes through
    assert app.post("/export/abc/more", b"", status=201)  # no match: passes through


# -- Prefer -----------------------------------------------------------------------------


def test_prefer_wait_is_woken_by_the_completion(cleanup: list[AsyncMiddleware]) -> None:
    _, app = make(cleanup, sleeping(0.3))
    location = app.post("/async", b"").headers["Location"]
    began = time.monotonic()
    res = app.get(location, headers={"Prefer": "wait=10"}, status=201)
    elapsed = time.monotonic() - began
    assert res.body == b"echo:"
    assert elapsed < 1.5, elapsed


def test_prefer_wait_times_out_and_is_capped_by_max_wait(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    _, app = make(cleanup, gate, max_wait=0.5)
    try:
        location = app.post("/async", b"").headers["Location"]
        began = time.monotonic()
        res = app.get(location, headers={"Prefer": "wait=20"}, status=202)
        elapsed = time.monotonic() - began
        assert 0.4 <= elapsed < 3, elapsed
        assert res.json["status"] == "running"
    finally:
        gate.opened.set()


def test_prefer_on_submit(cleanup: list[AsyncMiddleware]) -> None:
    _, app = make(cleanup, sleeping(0.1))
    res = app.post("/async", b"now", headers={"Prefer": "respond-async, wait=10"}, status=201)
    assert res.body == b"echo:now"
    res = app.post("/async", b"", headers={"Prefer": "respond-async"}, status=202)
    assert res.headers["Preference-Applied"] == "respond-async"


# -- status endpoint errors ----------------------------------------------------------------


def test_status_errors(cleanup: list[AsyncMiddleware]) -> None:
    _, app = make(cleanup, echo_app)
    for path in (
        "/_async/tasks/" + "A" * 32,
        "/_async/tasks/bad!id",
        "/_async/tasks",
        "/_async/tasks/",
    ):
        res = app.get(path, status=404)
        assert res.json["error"] == "Not Found"
        assert res.headers["Cache-Control"] == "no-store"
    res = app.post("/_async/tasks/" + "A" * 32, status=405)
    assert res.headers["Allow"] == "GET, HEAD, DELETE"
    assert "POST" in res.json["detail"]


def test_delete(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    _, app = make(cleanup, gate)
    cancelled = app.post("/async", b"").headers["Location"]
    app.delete(cancelled, status=204)  # pending: cancelled (issue 11)
    assert app.get(cancelled, status=410).json["status"] == "cancelled"
    location = app.post("/async", b"").headers["Location"]
    gate.opened.set()
    wait_result(app, location, status=200)
    app.delete(location, status=204)
    assert app.get(location, status=410).json["status"] == "deleted"


# -- request bodies ------------------------------------------------------------------------


class CountingInput(io.RawIOBase):
    """A request stream that counts what is read from it."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        chunk = self.data.read(size)
        self.consumed += len(chunk)
        return chunk


@pytest.mark.parametrize("size", [0, 1, 1024])
def test_bodies_up_to_the_limit_are_accepted(cleanup: list[AsyncMiddleware], size: int) -> None:
    _, app = make(cleanup, echo_app, max_body_size=1024)
    body = b"x" * size
    location = app.post("/async", body, status=202).headers["Location"]
    assert wait_result(app, location, status=201).body == b"echo:" + body


def test_one_byte_over_is_413_and_the_app_is_never_called(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    middleware, app = make(cleanup, gate, max_body_size=1024)
    res = app.post("/async", b"x" * 1025, status=413)
    assert "max_body_size" in res.json["detail"]
    assert res.headers["Cache-Control"] == "no-store"
    stream = CountingInput(b"x" * 5000)
    status, _, _ = raw_call(middleware, {"CONTENT_LENGTH": "5000", "wsgi.input": stream})
    assert status.startswith("413") and stream.consumed == 0
    stream = CountingInput(b"x" * 5000)
    status, _, _ = raw_call(
        middleware,
        {"wsgi.input": stream, "wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"},
    )
    assert status.startswith("413") and stream.consumed <= 1025
    assert gate.calls == 0


def test_chunked_bodies(cleanup: list[AsyncMiddleware]) -> None:
    middleware, app = make(cleanup, echo_app, max_body_size=1024)
    status, _, body = raw_call(
        middleware,
        {
            "wsgi.input": io.BytesIO(b"chunked!"),
            "wsgi.input_terminated": True,
            "HTTP_TRANSFER_ENCODING": "chunked",
        },
    )
    assert status.startswith("202")
    location = json.loads(body)["location"]
    assert wait_result(app, location, status=201).body == b"echo:chunked!"
    status, _, body = raw_call(
        middleware, {"wsgi.input": io.BytesIO(b"?"), "HTTP_TRANSFER_ENCODING": "chunked"}
    )
    assert status.startswith("411"), status
    assert b"Content-Length" in body


@pytest.mark.parametrize("length", ["abc", "-1", "1e3"])
def test_invalid_content_length_is_400(cleanup: list[AsyncMiddleware], length: str) -> None:
    middleware, _ = make(cleanup, echo_app)
    status, _, body = raw_call(middleware, {"CONTENT_LENGTH": length, "wsgi.input": io.BytesIO()})
    assert status.startswith("400")
    assert json.loads(body)["error"] == "Bad Request"


def test_truncated_body_is_400(cleanup: list[AsyncMiddleware]) -> None:
    middleware, _ = make(cleanup, echo_app)
    status, _, _ = raw_call(middleware, {"CONTENT_LENGTH": "10", "wsgi.input": io.BytesIO(b"abc")})
    assert status.startswith("400")


def test_a_body_error_says_what_is_wrong_as_its_message() -> None:
    with pytest.raises(BodyError) as refused:
        read_request_body({"CONTENT_LENGTH": "10", "wsgi.input": io.BytesIO(b"abc")}, 1024)
    assert refused.value.code == 400
    detail = "the request body ended after 3 of 10 bytes"
    assert (str(refused.value), refused.value.detail) == (detail, detail)


# -- bounds --------------------------------------------------------------------------------


def test_full_pool_and_queue_answer_503_and_enqueue_nothing(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    middleware, app = make(cleanup, gate, max_workers=1, max_queued=1)
    try:
        app.post("/async", b"", status=202)
        app.post("/async", b"", status=202)
        res = app.post("/async", b"", status=503)
        assert res.headers["Retry-After"] == "1"
        assert res.headers["Cache-Control"] == "no-store"
        assert "busy" in res.json["detail"]
        assert len(middleware.registry) == 2  # type: ignore[arg-type]
    finally:
        gate.opened.set()


def test_bodies_held_by_pending_tasks_are_bounded(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    # Headers count too (a few KB here): bodies large beside them.
    middleware, app = make(cleanup, gate, max_workers=1, max_body_size=100_000,
                           max_pending_bytes=150_000)
    try:
        app.post("/async", b"x" * 100_000, status=202)
        res = app.post("/async", b"y" * 60_000, status=503)
        assert res.headers["Retry-After"] == "1"
        assert "busy" in res.json["detail"]
        app.post("/async", b"z" * 30_000, status=202)  # still within the budget
        assert len(middleware.registry) == 2  # type: ignore[arg-type]
    finally:
        gate.opened.set()


def test_stored_results_are_bounded_in_memory(cleanup: list[AsyncMiddleware]) -> None:
    _, app = make(
        cleanup, echo_app, max_stored_bytes=3000, max_body_size=2000, max_pending_bytes=3000
    )
    first = app.post("/async", b"a" * 2000).headers["Location"]
    assert wait_result(app, first, status=201).body == b"echo:" + b"a" * 2000
    second = app.post("/async", b"b" * 2000).headers["Location"]
    res = wait_result(app, second, status=507)
    assert res.json["reason"] == "registry_full"
    app.delete(first, status=204)  # frees its bytes
    third = app.post("/async", b"c" * 2000).headers["Location"]
    assert wait_result(app, third, status=201).body == b"echo:" + b"c" * 2000


def test_registry_full_answers_503(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    middleware, app = make(cleanup, gate, max_tasks=2)
    try:
        app.post("/async", b"", status=202)
        app.post("/async", b"", status=202)
        res = app.post("/async", b"", status=503)
        assert res.headers["Retry-After"] == "1"
        assert "too many tasks" in res.json["detail"]
        assert middleware.pool.free_slots == middleware.pool.capacity - 2
    finally:
        gate.opened.set()


def test_concurrent_submits_lose_nothing_and_respect_the_bound(
    cleanup: list[AsyncMiddleware],
) -> None:
    gate = Gate()
    middleware, app = make(cleanup, gate, max_workers=4, max_queued=500)
    locations: list[str] = []
    lock = threading.Lock()

    def submit() -> None:
        for _ in range(25):
            res = app.post("/async", b"", status=202)
            with lock:
                locations.append(res.headers["Location"])

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    gate.opened.set()
    for thread in threads:
        thread.join()
    assert len(set(locations)) == 200
    for location in locations:
        assert wait_result(app, location, status=200).body == b"gate passed"
    assert gate.calls == 200
    assert gate.peak <= 4
    assert middleware.pool.free_slots == middleware.pool.capacity


# -- application failures ------------------------------------------------------------------


SECRET_COOKIE = "session=secret-token\x01"  # a runtime value that must never be logged


def failing(kind: str) -> Any:
    def app(environ: Environ, start_response: Any) -> Any:
        if kind == "raises":
            raise ValueError("secret internal detail")
        if kind == "no_start_response":
            return [b""]
        if kind == "non_bytes":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return ["text, not bytes"]
        if kind == "twice":
            start_response("200 OK", [])
            start_response("200 OK", [])
            return [b"x"]
        if kind == "crlf_header":
            start_response("200 OK", [("X-Evil", "a\r\nSet-Cookie: x=1")])
            return [b"x"]
        if kind == "non_latin1_header":
            start_response("200 OK", [("X-Name", "\u2603")])
            return [b"x"]
        if kind == "bad_status":
            start_response("OK", [])
            return [b"x"]
        if kind == "newline_status":
            start_response("200 OK\n", [])
            return [b"x"]
        if kind == "newline_header_name":
            start_response("200 OK", [("X-Evil\n", "1")])
            return [b"x"]
        if kind == "control_in_value":
            start_response("200 OK", [("Set-Cookie", SECRET_COOKIE)])
            return [b"x"]
        if kind == "system_exit":
            raise SystemExit(3)
        raise AssertionError(kind)

    return app


@pytest.mark.parametrize(
    "kind",
    [
        "raises", "no_start_response", "non_bytes", "twice", "crlf_header", "non_latin1_header",
        "bad_status", "newline_status", "newline_header_name", "control_in_value", "system_exit",
    ],
)
def test_application_failures_store_a_500(
    cleanup: list[AsyncMiddleware], caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    _, app = make(cleanup, failing(kind), validate_inner=False)
    with caplog.at_level(logging.INFO, logger="wsgi_async"):
        location = app.post("/async", b"").headers["Location"]
        res = wait_result(app, location, status=500)
    assert res.content_type == "application/json"
    assert res.json["id"] == location.rsplit("/", 1)[1]
    assert b"Traceback" not in res.body and b"secret" not in res.body
    raised = kind in ("raises", "system_exit")
    assert res.json["reason"] == ("application_error" if raised else "invalid_response")
    assert "secret-token" not in caplog.text  # header values never reach the log
    assert res.headers["Cache-Control"] == "no-store"
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failures and failures[0].exc_info is not None
    # the pool keeps working
    _, ok = make(cleanup, echo_app)
    assert wait_result(ok, ok.post("/async", b"1").headers["Location"], status=201)


def test_iterable_failing_midway_is_closed(cleanup: list[AsyncMiddleware]) -> None:
    iterable = Closing([b"a", b"b", b"c"], fail_after=2)

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iterable

    _, test_app = make(cleanup, app, validate_inner=False)
    wait_result(test_app, test_app.post("/async").headers["Location"], status=500)
    assert iterable.closed


def test_close_is_called_on_success(cleanup: list[AsyncMiddleware]) -> None:
    iterable = Closing([b"a", b"b"])

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iterable

    _, test_app = make(cleanup, app, validate_inner=False)
    assert wait_result(test_app, test_app.post("/async").headers["Location"]).body == b"ab"
    assert iterable.closed


def test_write_callable_and_generator(cleanup: list[AsyncMiddleware]) -> None:
    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        yield b"then "
        yield b""
        yield b"yielded"

    _, test_app = make(cleanup, app)
    res = wait_result(test_app, test_app.post("/async").headers["Location"], status=200)
    assert res.body == b"written then yielded"


def test_exc_info_before_the_body_replaces_the_response(cleanup: list[AsyncMiddleware]) -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise KeyError("missing")
        except KeyError:
            import sys

            start_response(
                "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
            )
        return [b"app's own error page"]

    _, test_app = make(cleanup, app)
    res = wait_result(test_app, test_app.post("/async").headers["Location"], status=500)
    assert res.body == b"app's own error page"


def test_exc_info_after_the_body_fails_the_task(cleanup: list[AsyncMiddleware]) -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"partial")
        try:
            raise KeyError("late")
        except KeyError:
            import sys

            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"never"]

    _, test_app = make(cleanup, app, validate_inner=False)
    res = wait_result(test_app, test_app.post("/async").headers["Location"], status=500)
    assert res.json["reason"] == "application_error"
    assert b"partial" not in res.body


def test_hop_by_hop_headers_are_dropped_and_length_is_set(cleanup: list[AsyncMiddleware]) -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/plain"),
                ("Connection", "close"),
                ("Keep-Alive", "timeout=5"),
                ("Content-Length", "999"),
                ("X-Kept", "yes"),
            ],
        )
        return [b"12345"]

    _, test_app = make(cleanup, app, validate_inner=False)
    res = wait_result(test_app, test_app.post("/async").headers["Location"], status=200)
    names = [name.lower() for name, _ in res.headerlist]
    assert "connection" not in names and "keep-alive" not in names
    assert res.headers["Content-Length"] == "5"
    assert res.headers["X-Kept"] == "yes"


def test_task_timeout_stores_504_and_discards_the_late_result(
    cleanup: list[AsyncMiddleware],
) -> None:
    _, app = make(cleanup, sleeping(1.0), task_timeout=0.3)
    location = app.post("/async", b"").headers["Location"]
    began = time.monotonic()
    res = wait_result(app, location, status=504)
    assert time.monotonic() - began < 0.9  # stored by the watchdog, not by the late thread
    assert res.json["reason"] == "timeout"
    time.sleep(1.0)
    assert app.get(location, status=504).json["reason"] == "timeout"


def test_timeout_stops_a_slow_generator_between_chunks(cleanup: list[AsyncMiddleware]) -> None:
    produced: list[int] = []

    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for index in range(50):
            produced.append(index)
            time.sleep(0.05)
            yield b"x"

    _, test_app = make(cleanup, app, routes={"^/async": {"timeout": 0.3}})
    wait_result(test_app, test_app.post("/async").headers["Location"], status=504)
    time.sleep(0.3)
    assert len(produced) < 20


def test_result_over_max_result_size_is_a_stored_500(cleanup: list[AsyncMiddleware]) -> None:
    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for _ in range(10):
            yield b"y" * 1000

    _, test_app = make(cleanup, app, max_result_size=4096)
    res = wait_result(test_app, test_app.post("/async").headers["Location"], status=500)
    assert res.json["reason"] == "result_too_large"
    assert "max_result_size" in res.json["detail"]


def test_logs_name_the_task_and_never_the_body(
    cleanup: list[AsyncMiddleware], caplog: pytest.LogCaptureFixture
) -> None:
    _, app = make(cleanup, echo_app)
    with caplog.at_level(logging.INFO, logger="wsgi_async"):
        res = app.post("/async", b"top-secret-body")
        wait_result(app, res.headers["Location"], status=201)
        time.sleep(0.1)
    text = caplog.text
    assert res.json["id"] in text
    assert "outcome=done" in text and "duration=" in text and "route=^/async" in text
    assert "top-secret-body" not in text


# -- owners and idempotency ----------------------------------------------------------------


def test_tasks_are_bound_to_their_owner(cleanup: list[AsyncMiddleware]) -> None:
    _, app = make(cleanup, echo_app, owner=lambda environ: environ.get("HTTP_X_USER"))
    location = app.post("/async", b"mine", headers={"X-User": "alice"}).headers["Location"]
    app.get(location, headers={"X-User": "alice", "Prefer": "wait=5"}, status=201)
    app.get(location, headers={"X-User": "mallory"}, status=404)
    app.get(location, status=404)
    assert app.get(location, headers={"X-User": "alice"}, status=201).body == b"echo:mine"


def test_another_owner_never_waits_on_a_pending_task(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    _, app = make(cleanup, gate, owner=lambda environ: environ.get("HTTP_X_USER"))
    location = app.post("/async", b"", headers={"X-User": "alice"}).headers["Location"]
    try:
        began = time.monotonic()
        app.get(location, headers={"X-User": "mallory", "Prefer": "wait=5"}, status=404)
        app.get(location, headers={"Prefer": "wait=5"}, status=404)
        assert time.monotonic() - began < 2
        app.get(location, headers={"X-User": "alice", "Prefer": "wait=1"}, status=202)
    finally:
        gate.opened.set()


def test_idempotency_key(cleanup: list[AsyncMiddleware]) -> None:
    calls: list[bytes] = []

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        calls.append(read_body(environ))
        return echo_app(environ, start_response)

    _, test_app = make(cleanup, app)
    first = test_app.post("/async", b"pay 10", headers={"Idempotency-Key": '"abc-123"'})
    second = test_app.post("/async", b"pay 10", headers={"Idempotency-Key": '"abc-123"'})
    assert first.headers["Location"] == second.headers["Location"]
    wait_result(test_app, first.headers["Location"], status=201)
    conflict = test_app.post(
        "/async", b"pay 99", headers={"Idempotency-Key": "abc-123"}, status=422
    )
    assert "Idempotency-Key" in conflict.json["detail"]
    test_app.post("/async", b"", headers={"Idempotency-Key": "bad key"}, status=400)
    assert calls == [b"pay 10"]


# -- lifecycle ---------------------------------------------------------------------------


def test_shutdown_without_wait_fails_queued_tasks(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    middleware, app = make(cleanup, gate, max_workers=1)
    app.post("/async", b"")
    queued = app.post("/async", b"").headers["Location"]
    time.sleep(0.1)
    middleware.shutdown(wait=False)
    gate.opened.set()
    res = wait_result(app, queued, status=503)
    assert "shut down" in res.json["detail"]
    assert app.post("/async", b"", status=503)


def test_shutdown_with_wait_finishes_queued_tasks(cleanup: list[AsyncMiddleware]) -> None:
    middleware, app = make(cleanup, sleeping(0.05), max_workers=1)
    locations = [app.post("/async", b"").headers["Location"] for _ in range(5)]
    middleware.shutdown(wait=True, timeout=10)
    for location in locations:
        app.get(location, status=201)


def test_memory_registry_under_a_multiprocess_server_warns_once(
    cleanup: list[AsyncMiddleware], caplog: pytest.LogCaptureFixture
) -> None:
    _, app = make(cleanup, echo_app)
    with caplog.at_level(logging.WARNING, logger="wsgi_async"):
        for _ in range(2):
            app.post("/async", b"", extra_environ={"wsgi.multiprocess": True}, status=202)
    warnings = [r for r in caplog.records if "private to each process" in r.getMessage()]
    assert len(warnings) == 1


def test_a_multiprocess_server_on_memory_is_warned_at_its_first_request_and_named_in_404(
    cleanup: list[AsyncMiddleware], caplog: pytest.LogCaptureFixture
) -> None:
    _, app = make(cleanup, echo_app)
    multi = {"wsgi.multiprocess": True}
    with caplog.at_level(logging.WARNING, logger="wsgi_async"):
        app.get("/plain", extra_environ=multi)  # a pass-through request, before any submit
    assert [r for r in caplog.records if "private to each process" in r.getMessage()]
    missing = app.get("/_async/tasks/" + "a" * 32, extra_environ=multi, status=404)
    assert "Likely cause" in missing.json["detail"]
    assert "sqlite:///" in missing.json["detail"]


def test_a_single_process_server_gets_the_plain_404(cleanup: list[AsyncMiddleware]) -> None:
    _, app = make(cleanup, echo_app)
    missing = app.get("/_async/tasks/" + "a" * 32, status=404)
    assert missing.json["detail"] == "No such task: the id is unknown, malformed or expired."


def test_uwsgi_with_several_processes_counts_as_multiprocess(
    cleanup: list[AsyncMiddleware], monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    stand_in = types.ModuleType("uwsgi")
    stand_in.numproc = 4  # type: ignore[attr-defined]
    stand_in.has_threads = 1  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uwsgi", stand_in)
    _, app = make(cleanup, echo_app)
    missing = app.get("/_async/tasks/" + "a" * 32, status=404)
    assert "Likely cause" in missing.json["detail"]


def test_no_worker_thread_can_start_is_a_clean_503(
    cleanup: list[AsyncMiddleware], monkeypatch: pytest.MonkeyPatch
) -> None:
    middleware, app = make(cleanup, echo_app)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)  # the OS is out of threads
    res = app.post("/async", b"", status=503)  # the supervisor cannot start
    assert res.json["detail"] == "No worker could be started."
    assert len(middleware.registry) == 0  # type: ignore[arg-type]
    monkeypatch.undo()
    middleware.supervisor.ensure_started()
    monkeypatch.setattr(threading.Thread, "start", refuse)
    res = app.post("/async", b"", status=503)  # no pool thread can start
    assert res.headers["Retry-After"] == "1"
    assert res.json["detail"] == "No worker could be started."
    monkeypatch.undo()
    assert middleware.pool.free_slots == middleware.pool.capacity
    assert len(middleware.registry) == 1  # type: ignore[arg-type]  # failed, not queued
    location = app.post("/async", b"ok").headers["Location"]
    assert wait_result(app, location, status=201).body == b"echo:ok"


def test_first_requests_at_once_agree_on_the_worker_id(cleanup: list[AsyncMiddleware]) -> None:
    middleware, _ = make(cleanup, echo_app)
    barrier = threading.Barrier(16)
    ids: list[str] = []

    def first_call() -> None:
        barrier.wait(5)
        ids.append(middleware.worker_id())

    threads = [threading.Thread(target=first_call) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(ids) == 16 and len(set(ids)) == 1


def test_a_body_on_204_is_not_replayed(cleanup: list[AsyncMiddleware]) -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("204 No Content", [])
        return [b"must not be sent"]

    _, test_app = make(cleanup, app, validate_inner=False)
    res = wait_result(test_app, test_app.post("/async").headers["Location"], status=204)
    assert res.body == b""
    assert "Content-Length" not in res.headers


def test_a_non_ascii_digit_in_prefer_wait_is_ignored(cleanup: list[AsyncMiddleware]) -> None:
    calls: list[int] = []

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        calls.append(1)
        return echo_app(environ, start_response)

    _, test_app = make(cleanup, app)
    environ = {"HTTP_PREFER": "wait=\u00b2"}
    res = test_app.post("/async", b"", extra_environ=environ, status=202)
    wait_result(test_app, res.headers["Location"], status=201)
    test_app.get(res.headers["Location"], extra_environ=environ, status=201)
    assert calls == [1]


def test_deleted_tasks_do_not_grow_the_expiry_heap(cleanup: list[AsyncMiddleware]) -> None:
    from conftest import new_task
    from wsgi_async.registry import MemoryRegistry, StoredResponse, TaskStatus

    registry = MemoryRegistry(max_tasks=10)
    ok = StoredResponse("200 OK", (), b"")
    for _ in range(5000):
        task = registry.create(new_task(result_ttl=86400))
        registry.start(task.id, "w1")
        registry.finish(task.id, "w1", TaskStatus.DONE, ok)
        registry.delete(task.id)
    assert len(registry._expiry) < 200


def test_deleting_finished_tasks_costs_no_more_than_storing_them() -> None:
    from conftest import new_task
    from wsgi_async.registry import StoredResponse, TaskStatus

    registry = MemoryRegistry()
    ok = StoredResponse("200 OK", (), b"")
    began = time.thread_time()  # this thread's CPU time: the machine's load does not count
    ids = []
    for _ in range(3000):
        task = registry.create(new_task())
        registry.start(task.id, "w1")
        registry.finish(task.id, "w1", TaskStatus.DONE, ok)
        ids.append(task.id)
    stored = time.thread_time() - began
    began = time.thread_time()
    for task_id in ids:
        registry.delete(task_id)
    deleted = time.thread_time() - began
    # Each delete is O(1) (amortised): a few times less than a create, start and finish.
    assert deleted < 3 * stored + 0.05, f"{deleted:.3f} s to delete, {stored:.3f} s to store"


def test_task_record_copy_is_a_full_shallow_copy() -> None:
    import dataclasses

    from wsgi_async.registry.base import StoredResponse, TaskRecord, TaskStatus

    record = TaskRecord(
        id="a" * 32, route="^/r", status=TaskStatus.DONE, created_at=1.0, started_at=2.0,
        finished_at=3.0, worker="w", owner="o", fingerprint="f", attempts=2, replay=True,
        timeout=4.0, result_ttl=5.0, response=StoredResponse("200 OK", (), b"x"),
    )
    copied = record.copy()
    assert copied == dataclasses.replace(record) and copied is not record
    # Every field is copied: a field added later must be added to copy() too.
    assert all(getattr(copied, f.name) is getattr(record, f.name)
               for f in dataclasses.fields(TaskRecord))
    copied.status = TaskStatus.QUEUED
    assert record.status is TaskStatus.DONE


# -- behaviours each pinned by a test that fails when they break --------------------------


def test_delete_by_another_owner_is_404_and_keeps_the_task(cleanup: list[AsyncMiddleware]) -> None:
    _, app = make(cleanup, echo_app, owner=lambda environ: environ.get("HTTP_X_USER"))
    location = app.post("/async", b"mine", headers={"X-User": "alice"}).headers["Location"]
    app.get(location, headers={"X-User": "alice", "Prefer": "wait=5"}, status=201)
    res = app.delete(location, headers={"X-User": "mallory"}, status=404)
    assert res.headers["Cache-Control"] == "no-store"
    app.delete(location, status=404)  # no owner at all
    assert app.get(location, headers={"X-User": "alice"}, status=201).body == b"echo:mine"
    app.delete(location, headers={"X-User": "alice"}, status=204)
    app.get(location, headers={"X-User": "alice"}, status=410)
    app.get(location, headers={"X-User": "mallory"}, status=404)  # not even that it existed


@pytest.mark.parametrize("where", ["option", "route"])
def test_result_ttl_reaches_the_registry(cleanup: list[AsyncMiddleware], where: str) -> None:
    if where == "option":
        _, app = make(cleanup, echo_app, result_ttl=0.5)
    else:
        _, app = make(cleanup, echo_app, routes={"^/async": {"result_ttl": 0.5}})
    location = app.post("/async", b"short-lived").headers["Location"]
    wait_result(app, location, status=201)
    assert app.get(location, status=201).body == b"echo:short-lived"  # within its TTL
    time.sleep(0.7)
    # Expired, read alone (no other request drops it): its tombstone says so.
    assert app.get(location, status=410).json["status"] == "expired"


def test_idempotency_keys_are_scoped_to_the_owner(cleanup: list[AsyncMiddleware]) -> None:
    calls: list[str] = []

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        calls.append(environ["HTTP_X_USER"])
        return echo_app(environ, start_response)

    _, test_app = make(cleanup, app, owner=lambda environ: environ.get("HTTP_X_USER"))
    key = {"Idempotency-Key": "same-key"}
    alice = test_app.post("/async", b"pay", headers={**key, "X-User": "alice"}, status=202)
    bob = test_app.post("/async", b"pay", headers={**key, "X-User": "bob"}, status=202)
    assert alice.headers["Location"] != bob.headers["Location"]
    for user, res in (("alice", alice), ("bob", bob)):
        test_app.get(res.headers["Location"], headers={"X-User": user, "Prefer": "wait=5"},
                     status=201)
    again = test_app.post("/async", b"pay", headers={**key, "X-User": "bob"}, status=202)
    assert again.headers["Location"] == bob.headers["Location"]  # Bob's own retry
    assert sorted(calls) == ["alice", "bob"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/async/a?x=1"), ("POST", "/async/b?x=1"), ("POST", "/async/a?x=2"),
     ("POST", "/async/a"), ("POST", "/async/a?x=1&y")],
)
def test_the_fingerprint_covers_method_path_and_query(
    cleanup: list[AsyncMiddleware], method: str, path: str
) -> None:
    gate = Gate()
    _, app = make(cleanup, gate)
    try:
        key = {"Idempotency-Key": "k-1"}
        first = app.post("/async/a?x=1", b"same", headers=key, status=202)
        res = app.request(path, method=method, body=b"same", headers=key, status=422)
        assert "Idempotency-Key" in res.json["detail"]
        assert res.headers["Cache-Control"] == "no-store"
        again = app.post("/async/a?x=1", b"same", headers=key, status=202)
        assert again.headers["Location"] == first.headers["Location"]
    finally:
        gate.opened.set()
    wait_result(app, first.headers["Location"], status=200)
    assert gate.calls == 1


def raw_headers(
    middleware: AsyncMiddleware, environ: Environ
) -> tuple[str, dict[str, str], bytes]:
    """Call the middleware directly (for what webtest cannot send) and keep the headers."""
    seen: list[tuple[str, list[tuple[str, str]]]] = []
    base = {"REQUEST_METHOD": "POST", "PATH_INFO": "/async", "SERVER_NAME": "x",
            "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO()}
    base.update(environ)
    result = middleware(base, lambda s, h, e=None: seen.append((s, h)))  # type: ignore[arg-type,misc]
    body = b"".join(result)
    status, headers = seen[0]
    return status, dict(headers), body


def test_every_response_the_middleware_makes_is_no_store(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    middleware, app = make(cleanup, gate, max_workers=1, max_queued=1, max_body_size=10)
    answers: dict[int, Any] = {}
    try:
        pending = app.post("/async", b"", headers={"Idempotency-Key": "k"}, status=202)
        answers[202] = pending
        location = pending.headers["Location"]
        answers[405] = app.put(location, status=405)
        answers[404] = app.get("/_async/tasks/" + "A" * 32, status=404)
        answers[413] = app.post("/async", b"x" * 11, status=413)
        answers[400] = app.post("/async", b"", headers={"Idempotency-Key": "a b"}, status=400)
        answers[422] = app.post("/async", b"other", headers={"Idempotency-Key": "k"}, status=422)
        app.post("/async", b"", status=202)  # the queue's one place
        answers[503] = app.post("/async", b"", status=503)
        status, headers, _ = raw_headers(
            middleware, {"wsgi.input": io.BytesIO(b"?"), "HTTP_TRANSFER_ENCODING": "chunked"})
        assert status.startswith("411") and headers["Cache-Control"] == "no-store"
        status, headers, _ = raw_headers(
            middleware, {"CONTENT_LENGTH": "x", "wsgi.input": io.BytesIO()})
        assert status.startswith("400") and headers["Cache-Control"] == "no-store"
    finally:
        gate.opened.set()
    wait_result(app, location, status=200)
    answers[204] = app.delete(location, status=204)
    answers[410] = app.get(location, status=410)
    for code, res in answers.items():
        assert res.status_int == code
        assert res.headers.get("Cache-Control") == "no-store", code


def test_task_ids_carry_192_random_bits(cleanup: list[AsyncMiddleware]) -> None:
    import base64
    import re

    _, app = make(cleanup, echo_app)
    ids = {app.post("/async", b"").json["id"] for _ in range(20)}
    assert len(ids) == 20
    for task_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", task_id), task_id
        assert len(base64.urlsafe_b64decode(task_id)) == 24  # 192 bits


class SignallingRegistry(MemoryRegistry):
    """A memory registry that says when a long-poll has begun to wait in it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Semaphore(0)

    def wait(self, task_id: str, timeout: float) -> TaskRecord | None:
        self.waiting.release()
        return super().wait(task_id, timeout)


@pytest.mark.parametrize("second", ["poll", "submit"])
def test_max_waiters_bounds_the_long_polls_held_at_once(
    cleanup: list[AsyncMiddleware], second: str
) -> None:
    gate = Gate()
    registry = SignallingRegistry()
    _, app = make(cleanup, gate, registry=registry, max_waiters=1)
    location = app.post("/async", b"").headers["Location"]
    held: list[int] = []
    poller = threading.Thread(
        target=lambda: held.append(app.get(location, headers={"Prefer": "wait=10"}).status_int))
    poller.start()
    try:
        assert registry.waiting.acquire(timeout=5)  # the one waiter allowed is held
        began = time.monotonic()
        if second == "poll":
            res = app.get(location, headers={"Prefer": "wait=5"}, status=202)
        else:
            res = app.post("/async", b"", headers={"Prefer": "respond-async, wait=5"},
                           status=202)
        assert time.monotonic() - began < 2  # answered at once, not held
        assert res.json["status"] in ("queued", "running")
    finally:
        gate.opened.set()
        poller.join(10)
    assert held == [200]


def test_max_result_size_is_exact(cleanup: list[AsyncMiddleware]) -> None:
    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        size = int(environ["QUERY_STRING"])
        yield b"a" * (size - 1)
        yield b"b"

    _, test_app = make(cleanup, app, max_result_size=100)
    exact = wait_result(test_app, test_app.post("/async?100").headers["Location"], status=200)
    assert exact.body == b"a" * 99 + b"b"
    over = wait_result(test_app, test_app.post("/async?101").headers["Location"], status=500)
    assert over.json["reason"] == "result_too_large"


@pytest.mark.parametrize("char", [chr(c) for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F]])
def test_every_control_character_in_a_header_value_is_refused(char: str) -> None:
    from wsgi_async.capture import validate_headers
    from wsgi_async.errors import ResponseError

    with pytest.raises(ResponseError, match="X-Value"):
        validate_headers([("X-Value", f"a{char}b")])
    assert validate_headers([("X-Value", "a\tb caf\u00e9")]) == [("X-Value", "a\tb caf\u00e9")]


@pytest.mark.parametrize(
    ("status", "header"),
    [("200 OK", ("X-Del", "a\x7fb")), ("100 Continue", ("X-A", "1")),
     ("199 Early", ("X-A", "1")), ("200 O\x7fK", ("X-A", "1")), ("600 Nope", ("X-A", "1"))],
)
def test_invalid_responses_store_a_500_with_reason_invalid_response(
    cleanup: list[AsyncMiddleware], status: str, header: tuple[str, str]
) -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response(status, [header])
        return [b"x"]

    _, test_app = make(cleanup, app, validate_inner=False)
    res = wait_result(test_app, test_app.post("/async").headers["Location"], status=500)
    assert res.json["reason"] == "invalid_response"
    assert res.json["detail"] == "The application produced an invalid response."


def test_the_lowest_final_status_is_accepted(cleanup: list[AsyncMiddleware]) -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    _, test_app = make(cleanup, app, validate_inner=False)
    assert wait_result(test_app, test_app.post("/async").headers["Location"]).body == b"ok"


def test_non_string_environ_entries_are_not_carried(cleanup: list[AsyncMiddleware]) -> None:
    seen: dict[str, Any] = {}

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        seen.update(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    _, test_app = make(cleanup, app)
    extra = {"myapp.user": object(), "myapp.count": 3, "myapp.flag": True, "myapp.name": "kept"}
    location = test_app.post("/async", b"", extra_environ=extra).headers["Location"]
    wait_result(test_app, location, status=200)
    assert seen["myapp.name"] == "kept"
    assert not {"myapp.user", "myapp.count", "myapp.flag"} & set(seen)


HOP_BY_HOP = ["Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
              "Trailer", "Transfer-Encoding", "Upgrade"]


@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_every_hop_by_hop_header_is_dropped(cleanup: list[AsyncMiddleware], name: str) -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), (name, "x"), ("X-Kept", "1")])
        return [b"12345"]

    _, test_app = make(cleanup, app, validate_inner=False)
    res = wait_result(test_app, test_app.post("/async").headers["Location"], status=200)
    assert name.lower() not in [key.lower() for key, _ in res.headerlist]
    assert res.headers["X-Kept"] == "1" and res.headers["Content-Length"] == "5"
    assert res.body == b"12345"


def test_a_timed_out_generator_is_stopped_at_its_next_chunk(
    cleanup: list[AsyncMiddleware],
) -> None:
    produced: list[int] = []
    stopped = threading.Event()

    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            for index in range(40):
                produced.append(index)
                time.sleep(0.05)
                yield b"x"
        finally:
            stopped.set()

    _, test_app = make(cleanup, app, routes={"^/async": {"timeout": 0.3}})
    wait_result(test_app, test_app.post("/async").headers["Location"], status=504)
    assert stopped.wait(5)
    # About 0.3 / 0.05 = 6 chunks before the deadline, then one more at most.
    assert len(produced) <= 10, len(produced)


def test_head_answers_headers_without_a_body(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    _, app = make(cleanup, gate, routes={"^/async": ["POST", "HEAD"]})
    try:
        submitted = app.head("/async", status=202)  # a routed HEAD is a submit too
        assert submitted.body == b"" and int(submitted.headers["Content-Length"]) > 0
        location = submitted.headers["Location"]
        pending = app.head(location, status=202)
        assert pending.body == b"" and pending.headers["Location"] == location
        assert int(pending.headers["Content-Length"]) == len(app.get(location).body)
        missing = app.head("/_async/tasks/" + "A" * 32, status=404)
        assert missing.body == b"" and int(missing.headers["Content-Length"]) > 0
    finally:
        gate.opened.set()
    wait_result(app, location, status=200)
    done = app.head(location, status=200)
    assert done.body == b"" and done.headers["Content-Length"] == str(len(b"gate passed"))


def test_a_result_replaced_by_a_507_is_logged_as_such(
    cleanup: list[AsyncMiddleware], caplog: pytest.LogCaptureFixture
) -> None:
    _, app = make(
        cleanup, echo_app, max_stored_bytes=3000, max_body_size=2000, max_pending_bytes=3000
    )
    with caplog.at_level(logging.INFO, logger="wsgi_async"):
        wait_result(app, app.post("/async", b"a" * 2000).headers["Location"], status=201)
        second = app.post("/async", b"b" * 2000).json["id"]
        assert wait_result(app, f"/_async/tasks/{second}", status=507)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = [r.getMessage() for r in caplog.records if "outcome=" in r.getMessage()]
            if any(second in line for line in lines):
                break
            time.sleep(0.01)
    line = next(line for line in lines if second in line)
    assert "outcome=failed status=507" in line, line


def test_a_submit_right_after_a_result_is_not_refused_for_its_budget(
    cleanup: list[AsyncMiddleware],
) -> None:
    """A task's place and request bytes are given back before its result is visible."""
    _, app = make(cleanup, echo_app, max_body_size=3000, max_pending_bytes=3000)
    answers: list[int] = []

    class SubmitOnOutcome(logging.Handler):
        # The outcome line is logged once the result is stored, in the task's own
        # thread: a submit from there is the earliest a client could make.
        def emit(self, record: logging.LogRecord) -> None:
            if "outcome=" in record.getMessage() and not answers:
                answers.append(app.post("/async", b"b" * 2000, status="*").status_int)

    logger = logging.getLogger("wsgi_async")
    handler, level = SubmitOnOutcome(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        first = app.post("/async", b"a" * 2000).headers["Location"]
        wait_result(app, first, status=201)
        deadline = time.monotonic() + 5
        while not answers and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert answers == [202]


def test_a_task_gets_a_fresh_pep_3333_environ(cleanup: list[AsyncMiddleware]) -> None:
    seen: list[dict[str, Any]] = []

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        seen.append(dict(environ))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    _, test_app = make(cleanup, app)
    for scheme, multiprocess in (("https", True), ("http", False)):
        extra = {"wsgi.url_scheme": scheme, "wsgi.multiprocess": multiprocess,
                 "wsgi.run_once": True, "wsgi.multithread": False}
        location = test_app.post("/async", b"", extra_environ=extra).headers["Location"]
        wait_result(test_app, location, status=200)
        environ = seen.pop()
        assert environ["wsgi.version"] == (1, 0)
        assert environ["wsgi.url_scheme"] == scheme
        assert environ["wsgi.multiprocess"] is multiprocess
        assert environ["wsgi.multithread"] is True and environ["wsgi.run_once"] is False


def test_without_an_owner_a_key_is_scoped_to_the_credentials(
    cleanup: list[AsyncMiddleware],
) -> None:
    gate = Gate()
    _, app = make(cleanup, gate)
    callers = [{}, {"Authorization": "Bearer b"}, {"Cookie": "s=1"}, {"Authorization": "None"},
               {"Authorization": "Bearer b", "Cookie": "s=1"},
               {"Authorization": "XXXX", "Cookie": "XXXX"}]  # no placeholder stands for none
    try:
        locations = [
            app.post("/async", b"same", headers={"Idempotency-Key": "k", **headers},
                     status=202).headers["Location"]
            for headers in callers
        ]
        assert len(set(locations)) == len(callers)  # a key never crosses callers
        again = app.post("/async", b"same", headers={"Idempotency-Key": "k", **callers[1]})
        assert again.headers["Location"] == locations[1]  # the same caller's retry
    finally:
        gate.opened.set()
    assert "Preference-Applied" not in again.headers  # only for Prefer: respond-async


def test_the_logged_failure_is_the_applications_own_error(
    cleanup: list[AsyncMiddleware], caplog: pytest.LogCaptureFixture
) -> None:
    import traceback

    def late_error_app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"partial")
        try:
            raise KeyError("late")
        except KeyError:
            import sys

            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"never"]

    _, test_app = make(cleanup, late_error_app, validate_inner=False)
    with caplog.at_level(logging.ERROR, logger="wsgi_async"):
        location = test_app.post("/async").headers["Location"]
        assert wait_result(test_app, location, status=500).json["reason"] == "application_error"
    record = next(r for r in caplog.records if r.exc_info is not None)
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    frames = [frame.name for frame in traceback.extract_tb(record.exc_info[2])]
    assert "late_error_app" in frames  # re-raised with the application's traceback


def test_status_lines_and_header_values_are_latin_1() -> None:
    from wsgi_async.capture import validate_headers, validate_status
    from wsgi_async.errors import ResponseError

    assert validate_status("200 Caf\u00e9") == "200 Caf\u00e9"
    with pytest.raises(ResponseError, match="latin-1"):
        validate_status("200 Snow\u2603")
    with pytest.raises(ResponseError, match="latin-1"):
        validate_headers([("X-A", "snow\u2603")])


@pytest.mark.parametrize("header", [["X-A", "1"], ("X-A", "1", "2"), ("X-A",), "X-A: 1"])
def test_each_header_must_be_a_name_value_tuple(header: Any) -> None:
    from wsgi_async.capture import validate_headers
    from wsgi_async.errors import ResponseError

    with pytest.raises(ResponseError, match="is not a"):
        validate_headers([header])


def test_headers_a_connection_header_names_are_dropped() -> None:
    from wsgi_async.capture import finalise_headers

    headers = [("Connection", "X-Private,close"), ("connection", " X-Other "),
               ("X-Private", "1"), ("x-other", "2"), ("X-Kept", "x-kept2"), ("X-Kept2", "4")]
    assert finalise_headers("200 OK", headers, 5) == (
        ("X-Kept", "x-kept2"), ("X-Kept2", "4"), ("Content-Length", "5"))


def test_the_memory_registry_forgets_everything_of_a_deleted_task() -> None:
    import tracemalloc

    from conftest import new_task
    from wsgi_async.registry import RequestSnapshot, StoredResponse, TaskStatus

    registry = MemoryRegistry(max_tasks=10)
    ok = StoredResponse("200 OK", (), b"x" * 100)

    def cycle(index: int) -> None:
        request = RequestSnapshot({"PATH_INFO": "/r"}, b"body" * 25)
        task = registry.create(new_task(f"w{index % 3}", replay=True), request, f"key-{index}")
        if index % 2:  # half finish, half are deleted while queued
            registry.start(task.id, f"w{index % 3}")
            registry.finish(task.id, f"w{index % 3}", TaskStatus.DONE, ok)
        assert registry.delete(task.id)

    for index in range(200):  # warm up the dicts and the heap to their steady size
        cycle(index)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(200, 3200):
            cycle(index)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept for 3000 deleted tasks"
    assert len(registry) == 0


def test_close_ends_the_memory_registrys_waits_at_once() -> None:
    from conftest import new_task

    registry = MemoryRegistry()
    task = registry.create(new_task())
    outcome: list[float] = []

    def waiter() -> None:
        began = time.monotonic()
        registry.wait(task.id, 10)
        outcome.append(time.monotonic() - began)

    thread = threading.Thread(target=waiter)
    thread.start()
    registry.close()  # before or after the wait blocks: either way it ends it
    thread.join(5)
    assert outcome and outcome[0] < 2
    began = time.monotonic()
    registry.wait(task.id, 10)  # closed: never blocks again
    assert time.monotonic() - began < 2


def test_delete_never_long_polls(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    _, app = make(cleanup, gate)
    location = app.post("/async", b"").headers["Location"]
    try:
        began = time.monotonic()
        app.delete(location, headers={"Prefer": "wait=5"}, status=204)  # cancelled
        assert time.monotonic() - began < 2  # answered at once: a DELETE is never held
    finally:
        gate.opened.set()


def test_owner_bound_results_are_private_unless_the_app_says_otherwise(
    cleanup: list[AsyncMiddleware],
) -> None:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        headers = [("Content-Type", "text/plain")]
        if environ["QUERY_STRING"] == "public":
            headers.append(("Cache-Control", "public, max-age=60"))
        start_response("200 OK", headers)
        return [b"ok"]

    _, owned = make(cleanup, app, owner=lambda environ: "alice")
    for query, expected in (("", "private"), ("public", "public, max-age=60")):
        location = owned.post(f"/async?{query}", b"").headers["Location"]
        assert wait_result(owned, location, status=200).headers["Cache-Control"] == expected
    _, shared = make(cleanup, app)
    location = shared.post("/async", b"").headers["Location"]
    assert "Cache-Control" not in wait_result(shared, location, status=200).headers


def test_a_gone_task_says_why_and_which(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    _, app = make(cleanup, gate)
    try:
        cancelled = app.post("/async", b"").headers["Location"]
        app.delete(cancelled, status=204)
        res = app.get(cancelled, status=410)
        assert res.json == {"error": "Gone", "detail": "The task was cancelled.",
                            "id": cancelled.rsplit("/", 1)[1], "status": "cancelled"}
        assert res.headers["Cache-Control"] == "no-store"
    finally:
        gate.opened.set()
    done = app.post("/async", b"").headers["Location"]
    wait_result(app, done, status=200)
    app.delete(done, status=204)
    res = app.get(done, status=410)
    assert res.json == {"error": "Gone", "detail": "The task was deleted.",
                        "id": done.rsplit("/", 1)[1], "status": "deleted"}


class ForeignTombstones(MemoryRegistry):
    """A registry whose tombstones give a reason this version does not know, or none, as
    one written by another version of a shared registry may."""

    reason = ""

    def gone(self, task_id: str) -> Tombstone | None:
        return Tombstone(task_id, self.reason)


@pytest.mark.parametrize(("reason", "state"), [("", "gone"), ("archived", "archived")])
def test_a_task_gone_for_an_unknown_reason_says_it_is_no_longer_kept(
    cleanup: list[AsyncMiddleware], reason: str, state: str
) -> None:
    registry = ForeignTombstones()
    registry.reason = reason
    _, app = make(cleanup, echo_app, registry=registry)
    task_id = "A" * 32
    res = app.get("/_async/tasks/" + task_id, status=410)
    assert res.json == {"error": "Gone", "detail": "The task is no longer kept.",
                        "id": task_id, "status": reason}
    assert res.headers["Async-Task"] == f'{state};id="{task_id}"'


class UnavailableRegistry(MemoryRegistry):
    """A memory registry whose reads fail, as a registry behind a lost network does."""

    down = False
    ERROR = "the registry is unreachable"

    def get(self, task_id: str) -> TaskRecord | None:
        if self.down:
            from wsgi_async.registry import RegistryUnavailable

            raise RegistryUnavailable(self.ERROR)
        return super().get(task_id)


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
def test_a_poll_while_the_registry_is_down_is_a_503(
    cleanup: list[AsyncMiddleware], method: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = UnavailableRegistry()
    _, app = make(cleanup, echo_app, registry=registry)
    location = app.post("/async", b"").headers["Location"]
    wait_result(app, location, status=201)
    registry.down = True
    with caplog.at_level(logging.WARNING, logger="wsgi_async"):
        res = app.request(location, method=method, status=503)
    assert res.headers["Retry-After"] == "1" and res.headers["Cache-Control"] == "no-store"
    task_id = location.rsplit("/", 1)[1]
    assert res.headers["Async-Task"] == f'unavailable;id="{task_id}"'
    assert [record.getMessage() for record in caplog.records] == [
        f"wsgi_async: status of {task_id} unavailable: {UnavailableRegistry.ERROR}"]
    if method != "HEAD":
        assert res.json == {"error": "Service Unavailable",
                            "detail": "The task registry is unavailable."}
    else:
        assert res.body == b"" and int(res.headers["Content-Length"]) > 0
    registry.down = False
    app.get(location, status=201)  # back without a restart


def test_a_browser_gets_a_page_while_the_task_runs(cleanup: list[AsyncMiddleware]) -> None:
    gate = Gate()
    _, app = make(cleanup, gate)
    html = {"Accept": "text/html"}
    try:
        location = app.post("/async", b"").headers["Location"]
        page = app.get(location, headers=html, status=202)
        assert page.content_type == "text/html" and page.headers["Location"] == location
        assert page.headers["Content-Length"] == str(len(page.body)) and location in page.text
        head = app.head(location, headers=html, status=202)
        assert head.body == b"" and head.headers["Content-Length"] == str(len(page.body))
    finally:
        gate.opened.set()


def test_shutdown_finishes_queued_tasks_by_default_and_stops_at_its_timeout() -> None:
    gate = threading.Event()
    ran: list[bytes] = []

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        body = read_body(environ)
        if body == b"held":
            gate.wait(10)
        elif body == b"slow":
            time.sleep(0.3)
        ran.append(body)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

    middleware, test_app = client(app, max_workers=1)
    try:
        test_app.post("/async", b"slow", status=202)
        test_app.post("/async", b"quick", status=202)  # queued behind the slow one
        middleware.shutdown()  # wait=True: the queued task runs first
        assert ran == [b"slow", b"quick"]
    finally:
        middleware.shutdown()
    middleware, test_app = client(app, max_workers=1)
    try:
        test_app.post("/async", b"held", status=202)
        began = time.monotonic()
        middleware.shutdown(wait=True, timeout=0.3)
        assert time.monotonic() - began < 3  # not the 10 s the task holds
    finally:
        gate.set()
        middleware.shutdown()


def long_polls_held(app: TestApp) -> float:
    """The ``wsgi_async_long_polls`` gauge, as served on ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(app.get("/metrics").text):
        if family.name == "wsgi_async_long_polls":
            return float(family.samples[0].value)
    raise AssertionError("no wsgi_async_long_polls gauge on /metrics")


@pytest.mark.parametrize("held", ["poll", "submit"])
def test_a_held_request_counts_as_one_long_poll_until_it_is_answered(
    cleanup: list[AsyncMiddleware], held: str
) -> None:
    gate = Gate()
    _, app = make(cleanup, gate, metrics="/metrics")
    before = long_polls_held(app)
    location = app.post("/async", b"").headers["Location"]
    answers: list[int] = []

    def hold() -> None:
        wait = {"Prefer": "wait=10"}
        if held == "poll":
            answers.append(app.get(location, headers=wait).status_int)
        else:
            answers.append(app.post("/async", b"", headers=wait).status_int)

    waiter = threading.Thread(target=hold)
    waiter.start()
    try:
        deadline = time.monotonic() + 5
        while (during := long_polls_held(app) - before) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert during == 1
    finally:
        gate.opened.set()
        waiter.join(10)
    assert answers == [200]
    assert long_polls_held(app) == before


def test_a_body_of_several_read_chunks_arrives_whole(cleanup: list[AsyncMiddleware]) -> None:
    body = bytes(range(256)) * 1000  # 256,000 bytes: four reads of 64 KiB
    _, test_app = make(cleanup, echo_app, max_body_size=len(body))
    location = test_app.post("/async", body, status=202).headers["Location"]
    assert wait_result(test_app, location, status=201).body == b"echo:" + body


def test_a_server_that_leaves_out_an_empty_script_name_gets_a_location(
    cleanup: list[AsyncMiddleware],
) -> None:
    # PEP 3333 (after CGI) lets a server omit SCRIPT_NAME when it is empty.
    middleware, _ = make(cleanup, echo_app, absolute_location=False)
    status, headers, _ = raw_call(middleware, {}, without=("SCRIPT_NAME",))
    assert status == "202 Accepted"
    assert re.fullmatch(r"/_async/tasks/[\w-]{32}", dict(headers)["Location"])


@pytest.mark.parametrize(
    ("environ", "body", "without", "status", "detail"),
    [
        # A server may leave CONTENT_LENGTH out when there is no body (PEP 3333, CGI).
        ({}, b"", ("CONTENT_LENGTH",), "202", None),
        ({"CONTENT_LENGTH": "+5"}, b"12345", (), "400", "invalid Content-Length '+5'"),
        ({"CONTENT_LENGTH": "5_0"}, b"1" * 50, (), "400", "invalid Content-Length '5_0'"),
        ({"HTTP_TRANSFER_ENCODING": "chunked"}, b"", ("CONTENT_LENGTH",), "411",
         "this server does not delimit chunked request bodies; send a Content-Length"),
        ({"wsgi.input_terminated": True}, b"12345", ("CONTENT_LENGTH",), "413",
         "the request body exceeds max_body_size (4)"),
        ({"wsgi.input_terminated": True}, b"1234", ("CONTENT_LENGTH",), "202", None),
    ],
)
def test_each_way_of_sending_a_body_is_read_or_refused_by_name(
    cleanup: list[AsyncMiddleware], environ: Environ, body: bytes, without: tuple[str, ...],
    status: str, detail: str | None,
) -> None:
    middleware, test_app = make(cleanup, echo_app, max_body_size=4)
    sent = {"CONTENT_LENGTH": "0", **environ, "wsgi.input": io.BytesIO(body)}
    got, headers, answer = raw_call(middleware, sent, without)
    assert got.startswith(status), (got, answer)
    if detail is not None:
        assert json.loads(answer)["detail"] == detail
        return
    location = dict(headers)["Location"]
    assert wait_result(test_app, location, status=201).body == b"echo:" + body


def test_a_retry_that_leaves_out_empty_cgi_keys_is_the_same_request(
    cleanup: list[AsyncMiddleware],
) -> None:
    # QUERY_STRING and PATH_INFO may be left out when empty (PEP 3333): a retry through
    # another server that does so is the same request, not a conflicting one.
    middleware, _ = make(cleanup, echo_app, routes=[r"^/?$"])  # the mount point itself
    key = {"HTTP_IDEMPOTENCY_KEY": "same", "PATH_INFO": ""}
    first, headers, _ = raw_call(middleware, key)
    assert first.startswith("202")
    again, again_headers, body = raw_call(middleware, key, without=("QUERY_STRING",
                                                                     "PATH_INFO"))
    assert again.startswith("202"), body
    assert dict(again_headers)["Location"] == dict(headers)["Location"]
