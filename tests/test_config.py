"""Options and routes are validated once, with errors that name the option and the value."""

from __future__ import annotations

import re
from typing import Any

import pytest

from wsgi_async import AsyncMiddleware
from wsgi_async.config import build_options, literal_prefix


def app(environ: Any, start_response: Any) -> list[bytes]:
    return []


def test_route_forms() -> None:
    options = build_options([r"^/a", re.compile(r"^/b")])
    assert [r.pattern.pattern for r in options.routes] == ["^/a", "^/b"]
    assert all(r.methods is None for r in options.routes)
    options = build_options(
        {
            r"^/a": ["post", "GET"],
            r"^/b": {"methods": ["PUT"], "timeout": 60, "result_ttl": 5, "replay": True},
        }
    )
    first, second = options.routes
    assert first.methods == frozenset({"POST", "GET"})
    assert second.methods == frozenset({"PUT"}) and second.timeout == 60
    assert second.result_ttl == 5 and second.replay is True
    assert options.route_for("/a/x", "POST") is first
    assert options.route_for("/a/x", "DELETE") is None
    assert options.route_for("/x/a", "POST") is None  # re.match anchors at the start
    assert options.timeout_of(first) is None and options.timeout_of(second) == 60
    assert options.result_ttl_of(first) == 300 and options.result_ttl_of(second) == 5


def test_defaults() -> None:
    options = build_options(["^/"])
    assert options.status_path == "/_async/tasks"
    assert (options.max_workers, options.max_queued) == (8, 1000)
    assert options.max_body_size == 10 * 1024 * 1024
    assert options.max_result_size == 100 * 1024 * 1024
    assert (options.result_ttl, options.task_timeout, options.retry_after) == (300, None, 1)
    assert options.max_wait == 30


@pytest.mark.parametrize(
    ("routes", "error", "message"),
    [
        ("^/a", TypeError, "routes must be a list"),
        ([], ValueError, "routes is empty"),
        (["(unclosed"], ValueError, "invalid regex '(unclosed'"),
        ([42], TypeError, "42"),
        ([re.compile(rb"^/a")], TypeError, "not bytes"),
        ({"^/a": "POST"}, TypeError, "methods of '^/a'"),
        ({"^/a": ["P OST"]}, ValueError, "invalid method 'P OST'"),
        ({"^/a": []}, ValueError, "is empty"),
        ({"^/a": {"method": ["POST"]}}, ValueError, "unknown option(s) ['method']"),
        ({"^/a": {"timeout": -1}}, ValueError, "timeout must be a finite number above 0, got -1"),
        ({"^/a": {"replay": "yes"}}, TypeError, "replay of '^/a'"),
    ],
)
def test_bad_routes(routes: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        build_options(routes)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("max_workers", 0, ValueError),
        ("max_workers", 1.5, TypeError),
        ("max_workers", True, TypeError),
        ("max_queued", -3, ValueError),
        ("max_body_size", "10MB", TypeError),
        ("max_result_size", 0, ValueError),
        ("max_pending_bytes", -1, ValueError),
        ("result_ttl", float("nan"), ValueError),
        ("task_timeout", float("inf"), ValueError),
        ("retry_after", 0.5, TypeError),
        ("max_wait", 0, ValueError),
        ("status_path", "tasks", ValueError),
        ("status_path", "/a b", ValueError),
        ("status_path", 3, TypeError),
        ("owner", "header", TypeError),
        ("max_workerz", 3, TypeError),
    ],
)
def test_bad_options_name_the_option_and_value(
    name: str, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        AsyncMiddleware(app, routes=["^/"], **{name: value})
    assert name in str(info.value)
    if name != "max_workerz":
        assert repr(value) in str(info.value)


def test_pending_bytes_must_hold_one_body() -> None:
    with pytest.raises(ValueError, match="max_pending_bytes .1000. must be at least max_body_size"):
        AsyncMiddleware(app, routes=["^/"], max_body_size=2000, max_pending_bytes=1000)


def test_bad_registry() -> None:
    with pytest.raises(ValueError, match="unsupported URL 'mongodb://x'"):
        AsyncMiddleware(app, routes=["^/"], registry="mongodb://x")
    with pytest.raises(TypeError, match="registry must be"):
        AsyncMiddleware(app, routes=["^/"], registry=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="app must be a WSGI callable"):
        AsyncMiddleware("app", routes=["^/"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        (r"^/reports/", "/reports/"),
        (r"/reports/", "/reports/"),
        (r"^/export/\w+$", "/export/"),
        (r"^/billing/run$", "/billing/run"),
        (r"^/ab?c", "/a"),
        (r"^/ab*c", "/a"),
        (r"^/ab{0,2}", "/a"),
        (r"^/ab+", "/ab"),
        (r"^/a.c", "/a"),
        (r"^/a[bc]", "/a"),
        (r"^/a(b)", "/a"),
        (r"^/a|^/b", ""),
        (r"^/(a|b)", ""),
        (r"(?i)^/reports", ""),
        (r"(?x) / a", ""),
        (r"^\/a", ""),
        (r"", ""),
        (r"^", ""),
    ],
)
def test_literal_prefix_is_necessary(pattern: str, prefix: str) -> None:
    regex = re.compile(pattern)
    assert literal_prefix(regex) == prefix
    for path in ("/reports/1", "/export/abc", "/billing/run", "/ac", "/abc", "/abbc", "/a",
                 "/b", "/REPORTS", "/a/b", "/", "", "/ab", "/axc"):
        if regex.match(path):
            assert path.startswith(prefix), (pattern, path)


def test_literal_prefix_respects_flags() -> None:
    assert literal_prefix(re.compile(r"^/reports/", re.IGNORECASE)) == ""
    assert literal_prefix(re.compile(r"^/reports/", re.VERBOSE)) == ""
    assert literal_prefix(re.compile(r"^/reports/", re.MULTILINE)) == "/reports/"


def test_every_option_is_a_typed_keyword_parameter_with_the_options_default() -> None:
    import inspect
    from dataclasses import fields

    from wsgi_async.config import Options

    params = inspect.signature(AsyncMiddleware.__init__).parameters
    defaults = Options(routes=())
    for field in fields(Options):
        if field.name == "routes":
            continue
        param = params[field.name]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, field.name
        assert param.annotation != "Any", field.name
        assert param.default == getattr(defaults, field.name), field.name
        assert f":param {field.name}:" in (AsyncMiddleware.__doc__ or ""), field.name


def test_a_misspelt_option_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="max_worker"):
        AsyncMiddleware(app, routes=["^/"], max_worker=3)  # type: ignore[call-arg]


def test_optional_route_options_may_be_left_out() -> None:
    options = build_options({"^/a": {"methods": ["POST"]}}, task_timeout=None)
    (route,) = options.routes
    assert route.timeout is None and route.result_ttl is None and route.replay is False
    assert options.task_timeout is None


@pytest.mark.parametrize("name", ["max_waiters", "max_workers", "retry_after", "lease_time",
                                  "max_wait", "result_ttl"])
def test_every_bound_is_validated(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        build_options(["^/"], **{name: 0})


def test_pending_bytes_may_equal_the_body_limit() -> None:
    options = build_options(["^/"], max_body_size=100, max_pending_bytes=100)
    assert options.max_pending_bytes == options.max_body_size == 100


@pytest.mark.parametrize(
    ("given", "expected"), [("/jobs/", "/jobs"), ("/Tasks_X/", "/Tasks_X"), ("/a/b", "/a/b")]
)
def test_status_path_forms(given: str, expected: str) -> None:
    assert build_options(["^/"], status_path=given).status_path == expected


@pytest.mark.parametrize(
    ("header", "respond_async", "wait"),
    [("wait=5", False, 5.0), ("respond-async; x=1, wait=5; y", True, 5.0),
     ("wait=5;a;b", False, 5.0), ("wait=X5", False, None), ('wait="7"', False, 7.0)],
)
def test_prefer_parsing(header: str, respond_async: bool, wait: float | None) -> None:
    from wsgi_async.prefer import Preferences, parse_prefer

    assert parse_prefer({"HTTP_PREFER": header}) == Preferences(respond_async, wait)


@pytest.mark.parametrize(("raw", "key"), [('"a"', "a"), ("a", "a"), ('"ab"', "ab")])
def test_idempotency_key_forms(raw: str, key: str) -> None:
    from wsgi_async.idempotency import parse_idempotency_key

    assert parse_idempotency_key({"HTTP_IDEMPOTENCY_KEY": raw}) == key


@pytest.mark.parametrize("raw", ['""', "", "a b", "x" * 256])
def test_bad_idempotency_keys_are_refused(raw: str) -> None:
    from wsgi_async.idempotency import parse_idempotency_key

    with pytest.raises(ValueError, match="Idempotency-Key"):
        parse_idempotency_key({"HTTP_IDEMPOTENCY_KEY": raw})


@pytest.mark.parametrize(("default", "other"), [("always", "prefer"), ("prefer", "always")])
def test_a_route_mode_overrides_the_global_one(default: str, other: str) -> None:
    options = build_options({r"^/a": {"mode": other}, r"^/b": None}, mode=default)
    first, second = options.routes
    assert options.mode_of(first) == other
    assert options.mode_of(second) == default


def test_build_options_names_what_it_does_not_know() -> None:
    # AsyncMiddleware's own signature refuses a misspelt keyword; build_options, which
    # the worker and TaskService users call directly, says which ones.
    with pytest.raises(TypeError) as info:
        build_options(["^/"], max_workerz=3, lease=1)
    assert str(info.value) == "unknown option(s): ['lease', 'max_workerz']"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tombstone_ttl": -1}, "tombstone_ttl must be a finite number above 0, got -1"),
        ({"task_timeout": 0}, "task_timeout must be a finite number above 0, got 0"),
        ({"metrics": "/_async/tasks/metrics"},
         "metrics path '/_async/tasks/metrics' is under status_path '/_async/tasks'"),
        ({"metrics": "/jobs/metrics", "status_path": "/jobs"},
         "metrics path '/jobs/metrics' is under status_path '/jobs'"),
    ],
)
def test_build_options_refuses_each_bad_value_by_name(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        build_options(["^/"], **options)
    assert str(info.value) == message
