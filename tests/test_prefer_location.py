"""Opt-in async, Preference-Applied and Vary, absolute Location, RFC 3339 times (issue 11)."""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from webtest import TestApp
from werkzeug.middleware.proxy_fix import ProxyFix

from wsgi_async import AsyncMiddleware
from wsgi_helpers import client, echo_app, wait_result

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def cleanup() -> Iterator[list[AsyncMiddleware]]:
    made: list[AsyncMiddleware] = []
    yield made
    for middleware in made:
        middleware.shutdown(wait=True, timeout=5)


def make(cleanup: list[AsyncMiddleware], app: Any = echo_app, **options: Any) -> TestApp:
    middleware, test_app = client(app, **options)
    cleanup.append(middleware)
    return test_app


# -- mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["option", "route"])
def test_prefer_mode_runs_only_the_requests_that_ask_as_tasks(
    cleanup: list[AsyncMiddleware], where: str
) -> None:
    if where == "option":
        app = make(cleanup, mode="prefer")
    else:
        app = make(cleanup, routes={r"^/async": {"mode": "prefer"}, r"^/always": None})
    direct = app.post("/async/x?q=1", b"sync", status=201)
    assert direct.body == b"echo:sync"  # the application's own response, untouched
    assert "Vary" not in direct.headers and "Cache-Control" not in direct.headers
    accepted = app.post("/async/x", b"async", headers={"Prefer": "respond-async"}, status=202)
    assert accepted.headers["Preference-Applied"] == "respond-async"
    assert "Prefer" in accepted.headers.getall("Vary")
    assert wait_result(app, accepted.headers["Location"], status=201).body == b"echo:async"
    if where == "route":  # a route without the option keeps the default, "always"
        app.post("/always", b"", status=202)


def test_a_bad_mode_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="mode must be one of 'always', 'prefer'"):
        AsyncMiddleware(echo_app, routes=["^/"], mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"routes\['\^/'\]\.mode"):
        AsyncMiddleware(echo_app, routes={"^/": {"mode": "never"}})
    with pytest.raises(TypeError, match="absolute_location must be True or False"):
        AsyncMiddleware(echo_app, routes=["^/"], absolute_location="yes")  # type: ignore[arg-type]


# -- Preference-Applied and Vary ----------------------------------------------------------


@pytest.mark.parametrize(
    ("prefer", "applied"),
    [("wait=5", "wait=5"), ("respond-async, wait=5", "respond-async, wait=5"),
     ("respond-async, wait=100", "respond-async, wait=30")],
)
def test_a_result_within_the_wait_says_which_preferences_it_applied(
    cleanup: list[AsyncMiddleware], prefer: str, applied: str
) -> None:
    app = make(cleanup)
    res = app.post("/async", b"now", headers={"Prefer": prefer}, status=201)
    assert res.body == b"echo:now"
    assert res.headers["Preference-Applied"] == applied
    assert "Prefer" in res.headers.getall("Vary")


def test_every_submit_answer_varies_on_prefer(cleanup: list[AsyncMiddleware]) -> None:
    app = make(cleanup, routes={r"^/async": {"executor": "threads"}})
    res = app.post("/async", b"", status=202)
    assert "Prefer" in res.headers.getall("Vary")
    assert "Preference-Applied" not in res.headers


# -- Location -----------------------------------------------------------------------------


def test_location_is_absolute_and_the_document_matches(cleanup: list[AsyncMiddleware]) -> None:
    app = make(cleanup)
    res = app.post("/async", b"", extra_environ={"HTTP_HOST": "api.example:8080"}, status=202)
    location = res.headers["Location"]
    assert location == f"http://api.example:8080/_async/tasks/{res.json['id']}"
    assert res.json["location"] == location
    pending = app.get(location, extra_environ={"HTTP_HOST": "api.example:8080"})
    assert pending.status_int in (201, 202)


def test_absolute_location_false_gives_the_path(cleanup: list[AsyncMiddleware]) -> None:
    app = make(cleanup, absolute_location=False)
    res = app.post("/async", b"", status=202)
    assert res.headers["Location"] == f"/_async/tasks/{res.json['id']}" == res.json["location"]


@pytest.mark.parametrize(
    ("environ", "origin"),
    [
        ({"HTTP_HOST": "example.com:80"}, "http://example.com"),
        ({"HTTP_HOST": "example.com:443", "wsgi.url_scheme": "https"}, "https://example.com"),
        ({"HTTP_HOST": "[::1]:8443", "wsgi.url_scheme": "https"}, "https://[::1]:8443"),
        ({"HTTP_HOST": "a@evil.example", "SERVER_NAME": "srv", "SERVER_PORT": "8000"},
         "http://srv:8000"),
        ({"HTTP_HOST": "evil.example/x", "SERVER_NAME": "srv", "SERVER_PORT": "80"},
         "http://srv"),
    ],
)
def test_location_is_built_as_werkzeug_builds_the_url(
    cleanup: list[AsyncMiddleware], environ: dict[str, str], origin: str
) -> None:
    app = make(cleanup)
    res = app.post("/async", b"", extra_environ=environ, status=202)
    assert res.headers["Location"] == f"{origin}/_async/tasks/{res.json['id']}"


def test_without_a_host_header_the_server_name_is_used(cleanup: list[AsyncMiddleware]) -> None:
    middleware, _ = client(echo_app)
    cleanup.append(middleware)
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen.update(headers)
        return lambda data: None

    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/async", "SCRIPT_NAME": "/app",
               "SERVER_NAME": "10.0.0.7", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.0",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "CONTENT_LENGTH": "0",
               "wsgi.errors": io.StringIO()}
    b"".join(middleware(environ, start_response))
    assert seen["Location"].startswith("http://10.0.0.7:8000/app/_async/tasks/")


def test_behind_proxy_fix_location_is_the_clients_url(cleanup: list[AsyncMiddleware]) -> None:
    middleware = AsyncMiddleware(echo_app, routes=[r"^/async"])
    cleanup.append(middleware)
    app = TestApp(ProxyFix(middleware, x_for=1, x_proto=1, x_host=1, x_prefix=1))
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "public.example",
               "X-Forwarded-Prefix": "/api", "X-Forwarded-For": "203.0.113.9"}
    res = app.post("/async", b"", headers=headers, status=202)
    assert res.headers["Location"] == f"https://public.example/api/_async/tasks/{res.json['id']}"


def test_a_script_name_cannot_move_the_location_to_another_host(
    cleanup: list[AsyncMiddleware],
) -> None:
    app = make(cleanup)
    res = app.post("/async", b"", extra_environ={"SCRIPT_NAME": "//evil.example"}, status=202)
    assert res.headers["Location"].startswith("http://localhost/evil.example/_async/tasks/")


# -- timestamps ---------------------------------------------------------------------------


def test_timestamps_are_rfc3339_utc_strings(cleanup: list[AsyncMiddleware]) -> None:
    release = threading.Event()

    def slow(environ: Any, start_response: Any) -> Any:
        release.wait(10)
        return echo_app(environ, start_response)

    app = make(cleanup, slow)
    try:
        res = app.post("/async", b"", status=202)
        assert RFC3339.fullmatch(res.json["created_at"]), res.json
        location = res.headers["Location"]
        for _ in range(200):
            pending = app.get(location, status=202).json
            if pending["started_at"] is not None:
                break
        assert RFC3339.fullmatch(pending["started_at"]), pending
        assert pending["created_at"] <= pending["started_at"]
    finally:
        release.set()


def test_a_wait_that_ends_before_the_task_answers_the_state_it_reached(
    cleanup: list[AsyncMiddleware],
) -> None:
    started, gate = threading.Event(), threading.Event()

    def app(environ: Any, start_response: Any) -> Any:
        started.set()
        gate.wait(10)
        return echo_app(environ, start_response)

    test_app = make(cleanup, app)
    try:
        # Queued when stored, running when the wait ends: the 202 says running.
        answer = test_app.post("/async", b"x", headers={"Prefer": "wait=1"}, status=202)
        assert started.is_set()
        assert answer.json["status"] == "running"
        assert answer.headers["Async-Task"].startswith("running;")
        assert "Prefer" in answer.headers.getall("Vary")
        assert "Preference-Applied" not in answer.headers
    finally:
        gate.set()
