"""The middleware in front of real framework applications: Flask, Django, Falcon, Bottle, Pyramid.

Each framework gets a small application with a slow route (``POST /reports/<name>``:
reads a JSON body, sleeps, answers 201 JSON with a custom header and a cookie)
and normal routes (``GET /health`` and ``GET /reports/<name>``, which the
``POST``-only route does not match).  The middleware is added in the one line
a user would write, with :func:`wsgiref.validate.validator` on both sides of
it: outside (checking what the middleware sends) and inside, as its
downstream application (checking the environ a task runs with).

Every replayed response is compared with what the same framework application,
without the middleware, answers for the same request: same status line, same
body, same headers in the same order; only ``Date`` and the position of
``Content-Length`` (set from the stored body, last) may differ.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import wsgiref.validate
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import IN_CI
from wsgi_async import AsyncMiddleware

if TYPE_CHECKING:
    from webtest import TestApp, TestResponse

# webtest and pyramid import webob, which imports the ``cgi`` module: on Python 3.11
# and 3.12 that warns on import.  They are imported inside the fixtures, so that
# this exact warning is ignored for this module's tests and nothing else is.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:'cgi' is deprecated and slated for removal in Python 3\.13:DeprecationWarning"
)

ROUTES = {r"^/reports/": ["POST"], r"^/files/": ["GET"]}
WORK_SECONDS = 0.2
SECRET = "s3cr3t-d8f1: the database password is hunter2"
PAYLOAD = {"rows": [1, 2, 3, 4], "title": "Q3 caf\u00e9 \u2603"}
REPORT_CSV = "quarter,total\nQ1,10\nQ2,20\nQ3,\u00e9\n" * 50
WAIT = {"Prefer": "wait=10"}
IGNORED_HEADERS = {"date", "content-length"}


def report_document(name: str, data: dict[str, Any]) -> dict[str, object]:
    """What every framework's slow route answers (before the framework serialises it)."""
    if name == "explode":
        raise RuntimeError(SECRET)
    time.sleep(WORK_SECONDS)
    return {"report": name, "total": sum(data["rows"]), "title": data["title"]}


# -- PEP 3333 vs wsgiref.validate --------------------------------------------------------


class Pep3333InputWrapper(wsgiref.validate.InputWrapper):
    """``wsgiref.validate``'s input check, allowing ``read()`` without a size.

    PEP 3333: "A server should allow read() to be called without an argument,
    and return the entire remainder of the client's input stream."  The
    validator predates that sentence and insists on exactly one argument.  A
    task's environ sets ``wsgi.input_terminated``, so werkzeug (Flask) reads
    the body with a bare ``read()``, which PEP 3333 allows.  Every other check
    of the validator is left as it is.
    """

    def read(self, *args: Any) -> bytes:
        wsgiref.validate.assert_(len(args) <= 1)
        data = self.input.read(*args)
        wsgiref.validate.assert_(type(data) is bytes)
        return data  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _pep3333_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wsgiref.validate, "InputWrapper", Pep3333InputWrapper)


validator = wsgiref.validate.validator


# -- Flask --------------------------------------------------------------------------------


def make_flask(files: Path) -> Any:
    from flask import Flask, jsonify, request, send_file

    app = Flask("flask_reports")
    app.config["PROPAGATE_EXCEPTIONS"] = True

    @app.post("/reports/<name>")
    def create_report(name: str) -> Any:
        response = jsonify(report_document(name, request.get_json()))
        response.status_code = 201
        response.headers["X-Report"] = name
        response.set_cookie("report", name, httponly=True)
        return response

    @app.get("/reports/<name>")
    def show_report(name: str) -> Any:
        return f"report {name} is not ready", 200, {"Content-Type": "text/plain; charset=utf-8"}

    @app.get("/health")
    def health() -> Any:
        return {"ok": True}

    @app.get("/files/<name>")
    def download(name: str) -> Any:
        return send_file(files / name, mimetype="text/csv")

    return app


def wrap_flask(app: Any) -> tuple[Any, AsyncMiddleware]:
    app.wsgi_app = AsyncMiddleware(validator(app.wsgi_app), routes=ROUTES)
    return app, app.wsgi_app


# -- Django -------------------------------------------------------------------------------


def django_create_report(request: Any, name: str) -> Any:
    from django.http import HttpResponse, HttpResponseNotAllowed, JsonResponse

    if request.method == "GET":
        return HttpResponse(f"report {name} is not ready", content_type="text/plain; charset=utf-8")
    if request.method != "POST":
        return HttpResponseNotAllowed(["GET", "POST"])
    response = JsonResponse(report_document(name, json.loads(request.body)), status=201)
    response["X-Report"] = name
    response.set_cookie("report", name, httponly=True)
    return response


def django_health(request: Any) -> Any:
    from django.http import JsonResponse

    return JsonResponse({"ok": True})


def _django_urlpatterns() -> list[Any]:
    from django.urls import path

    return [
        path("reports/<str:name>", django_create_report),
        path("health", django_health),
    ]


def setup_django() -> None:
    """Configure Django once for the whole session; this module is its ROOT_URLCONF."""
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            DEBUG_PROPAGATE_EXCEPTIONS=True,
            SECRET_KEY="wsgi-async-tests-" + "x" * 40,
            ALLOWED_HOSTS=["localhost"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
        django.setup()
    assert __name__ == settings.ROOT_URLCONF, "Django was configured elsewhere in this session"


def __getattr__(name: str) -> Any:
    # Django imports ROOT_URLCONF (this module) and reads ``urlpatterns`` from it.
    if name == "urlpatterns":
        return _django_urlpatterns()
    raise AttributeError(name)


def make_django(files: Path) -> Any:
    setup_django()
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def wrap_django(app: Any) -> tuple[Any, AsyncMiddleware]:
    application = AsyncMiddleware(validator(app), routes=ROUTES)
    return application, application


# -- Falcon -------------------------------------------------------------------------------


def make_falcon(files: Path) -> Any:
    import falcon

    class Reports:
        def on_post(self, req: Any, resp: Any, name: str) -> None:
            resp.media = report_document(name, req.get_media())
            resp.status = falcon.HTTP_201
            resp.set_header("X-Report", name)
            resp.set_cookie("report", name, secure=False)

        def on_get(self, req: Any, resp: Any, name: str) -> None:
            resp.content_type = falcon.MEDIA_TEXT
            resp.text = f"report {name} is not ready"

    class Health:
        def on_get(self, req: Any, resp: Any) -> None:
            resp.media = {"ok": True}

    def reraise(req: Any, resp: Any, ex: Exception, params: Any) -> None:
        # Falcon turns every exception into its own 500; let it reach the server instead.
        raise ex

    app = falcon.App()
    app.add_error_handler(Exception, reraise)
    app.add_route("/reports/{name}", Reports())
    app.add_route("/health", Health())
    return app


def wrap_plain(app: Any) -> tuple[Any, AsyncMiddleware]:
    application = AsyncMiddleware(validator(app), routes=ROUTES)
    return application, application


# -- Bottle -------------------------------------------------------------------------------


def make_bottle(files: Path) -> Any:
    import bottle

    app = bottle.Bottle()
    app.config["catchall"] = False

    @app.post("/reports/<name>")
    def create_report(name: str) -> Any:
        document = report_document(name, bottle.request.json)
        bottle.response.status = 201
        bottle.response.set_header("X-Report", name)
        bottle.response.set_cookie("report", name, path="/", httponly=True)
        return document

    @app.get("/reports/<name>")
    def show_report(name: str) -> Any:
        bottle.response.content_type = "text/plain; charset=utf-8"
        return f"report {name} is not ready"

    @app.get("/health")
    def health() -> Any:
        return {"ok": True}

    return app


# -- Pyramid ------------------------------------------------------------------------------


def make_pyramid(files: Path) -> Any:
    from pyramid.config import Configurator
    from pyramid.response import Response

    def create_report(request: Any) -> Any:
        name = request.matchdict["name"]
        document = report_document(name, request.json_body)
        request.response.status_int = 201
        request.response.headers["X-Report"] = name
        request.response.set_cookie("report", name, httponly=True)
        return document

    def show_report(request: Any) -> Any:
        return Response(f"report {request.matchdict['name']} is not ready",
                        content_type="text/plain", charset="utf-8")

    def health(request: Any) -> Any:
        return {"ok": True}

    with Configurator() as config:
        config.add_route("report", "/reports/{name}")
        config.add_view(create_report, route_name="report", request_method="POST",
                        renderer="json")
        config.add_view(show_report, route_name="report", request_method="GET")
        config.add_route("health", "/health")
        config.add_view(health, route_name="health", renderer="json")
        return config.make_wsgi_app()


# -- the stack under test -----------------------------------------------------------------


@dataclass(frozen=True)
class Framework:
    make: Callable[[Path], Any]
    wrap: Callable[[Any], tuple[Any, AsyncMiddleware]]


FRAMEWORKS = {
    "flask": Framework(make_flask, wrap_flask),
    "django": Framework(make_django, wrap_django),
    "falcon": Framework(make_falcon, wrap_plain),
    "bottle": Framework(make_bottle, wrap_plain),
    "pyramid": Framework(make_pyramid, wrap_plain),
}


@dataclass
class Stack:
    """The same application twice: bare, and behind the middleware."""

    bare: TestApp
    app: TestApp
    middleware: AsyncMiddleware


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "report.csv").write_text(REPORT_CSV, encoding="utf-8")
    return tmp_path


def require(*packages: str) -> None:
    """Skip (locally) or fail (under CI) unless every package is installed."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if IN_CI:
        pytest.fail(f"{', '.join(missing)} not installed, and CI requires every framework")
    pytest.skip(f"{', '.join(missing)} not installed (pip install 'wsgi-async[test]')")


def build_stack(name: str, files: Path, **extra_environ: Any) -> Stack:
    require("webtest", name)
    from webtest import TestApp

    framework = FRAMEWORKS[name]
    bare = TestApp(validator(framework.make(files)))
    wrapped, middleware = framework.wrap(framework.make(files))
    return Stack(bare, TestApp(validator(wrapped), extra_environ=extra_environ), middleware)


@pytest.fixture(params=sorted(FRAMEWORKS))
def stack(request: pytest.FixtureRequest, files: Path) -> Iterator[Stack]:
    built = build_stack(request.param, files)
    try:
        yield built
    finally:
        built.middleware.shutdown(timeout=10)


def comparable(response: TestResponse) -> tuple[str, list[tuple[str, str]], bytes]:
    headers = [(k, v) for k, v in response.headerlist if k.lower() not in IGNORED_HEADERS]
    return response.status, headers, response.body


def assert_same_response(replayed: TestResponse, bare: TestResponse) -> None:
    """The app's response byte for byte, then the middleware's ``Async-Task`` header."""
    name, state = replayed.headerlist[-1]
    assert name == "Async-Task" and state.startswith('done;id="')
    del replayed.headerlist[-1]
    assert comparable(replayed) == comparable(bare)
    assert replayed.headers["Content-Length"] == str(len(replayed.body))
    if "Content-Length" in bare.headers:
        assert replayed.headers["Content-Length"] == bare.headers["Content-Length"]
    assert [k for k, _ in replayed.headerlist].count("Content-Length") == 1


def assert_accepted(response: TestResponse) -> str:
    assert response.status == "202 Accepted"
    location = response.headers["Location"]
    assert location.startswith("http://localhost/_async/tasks/")  # absolute (issue 11)
    assert response.headers["Retry-After"] == "1"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.content_type == "application/json"
    document = response.json
    assert document["id"] == location.rsplit("/", 1)[1]
    assert document["status"] in ("queued", "running")
    assert document["location"] == location
    return location


# -- tests --------------------------------------------------------------------------------


def test_submit_poll_and_replay_byte_for_byte(stack: Stack) -> None:
    began = time.monotonic()
    submitted = stack.app.post_json("/reports/q3?lang=fr", PAYLOAD, status=202)
    assert time.monotonic() - began < WORK_SECONDS
    location = assert_accepted(submitted)
    assert submitted.json["status"] == "queued"

    pending = stack.app.get(location, status=202)
    assert pending.json["status"] in ("queued", "running")
    assert pending.headers["Location"] == location
    assert pending.headers["Cache-Control"] == "no-store"

    replayed = stack.app.get(location, headers=WAIT, status=201)
    bare = stack.bare.post_json("/reports/q3?lang=fr", PAYLOAD, status=201)
    assert_same_response(replayed, bare)
    assert replayed.json == {"report": "q3", "total": 10, "title": PAYLOAD["title"]}
    assert replayed.headers["X-Report"] == "q3"
    assert "report=q3" in replayed.headers["Set-Cookie"]

    # A finished task answers the same again until it is deleted.
    again = stack.app.get(location, status=201)
    del again.headerlist[-1]  # its Async-Task, as the first replay's
    assert comparable(again) == comparable(replayed)
    stack.app.delete(location, status=204)
    stack.app.get(location, status=410)  # deleted: its tombstone says so (issue 11)


def test_prefer_wait_on_submit_answers_with_the_result(stack: Stack) -> None:
    replayed = stack.app.post_json("/reports/q4", PAYLOAD, headers=WAIT, status=201)
    bare = stack.bare.post_json("/reports/q4", PAYLOAD, status=201)
    # The app's response, plus what says how it was chosen (RFC 7240, issue 11).
    assert replayed.headerlist[-3:-1] == [("Preference-Applied", "wait=10"), ("Vary", "Prefer")]
    del replayed.headerlist[-3:-1]
    assert_same_response(replayed, bare)


def test_normal_routes_pass_through_untouched(stack: Stack) -> None:
    for path in ("/health", "/reports/q3"):  # GET /reports/... is not a routed method
        began = time.monotonic()
        direct = stack.app.get(path, status=200)
        assert time.monotonic() - began < WORK_SECONDS
        bare = stack.bare.get(path, status=200)
        assert direct.headerlist == bare.headerlist
        assert direct.body == bare.body
        assert "Location" not in direct.headers
        assert "Cache-Control" not in direct.headers
    assert stack.middleware.pool.free_slots == stack.middleware.pool.capacity


def test_error_in_the_slow_route_is_a_stored_500_without_traceback(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="wsgi_async")
    location = assert_accepted(stack.app.post_json("/reports/explode", PAYLOAD, status=202))
    task_id = location.rsplit("/", 1)[1]

    failed = stack.app.get(location, headers=WAIT, status=500)
    assert failed.status == "500 Internal Server Error"
    assert failed.content_type == "application/json"
    assert failed.headers["Cache-Control"] == "no-store"
    assert failed.json == {
        "error": "Internal Server Error",
        "detail": "The application raised an error while running this task.",
        "id": task_id,
        "reason": "application_error",
    }
    for leak in ("Traceback", "RuntimeError", "hunter2", ".py"):
        assert leak not in failed.text
    # The traceback goes to the log, with the task id.
    logged = [r for r in caplog.records if r.name == "wsgi_async" and task_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert SECRET in str(logged[0].exc_info[1])


class ServerFileWrapper:
    """A server's ``wsgi.file_wrapper``: only valid while the request it came with lasts."""

    def __init__(self, *args: Any) -> None:
        raise AssertionError("a task used the file_wrapper of a request that has ended")


@pytest.mark.compat("flask")
def test_flask_send_file_route_made_async(files: Path) -> None:
    stack = build_stack("flask", files, **{"wsgi.file_wrapper": ServerFileWrapper})
    try:
        location = assert_accepted(stack.app.get("/files/report.csv", status=202))
        replayed = stack.app.get(location, headers=WAIT, status=200)
        bare = stack.bare.get("/files/report.csv", status=200)
        assert_same_response(replayed, bare)
        assert replayed.body == REPORT_CSV.encode("utf-8")
        assert replayed.headers["Content-Type"].startswith("text/csv")
        assert "ETag" in replayed.headers and "Last-Modified" in replayed.headers
    finally:
        stack.middleware.shutdown(timeout=10)


@pytest.mark.compat("flask")
def test_flask_own_error_page_is_replayed(files: Path) -> None:
    """Without PROPAGATE_EXCEPTIONS, Flask answers its own 500 page: that is the stored result."""
    require("webtest", "flask")
    from webtest import TestApp

    bare_app = make_flask(files)
    bare_app.config["PROPAGATE_EXCEPTIONS"] = False
    app, middleware = wrap_flask(make_flask(files))
    app.config["PROPAGATE_EXCEPTIONS"] = False
    try:
        client = TestApp(validator(app))
        location = assert_accepted(client.post_json("/reports/explode", PAYLOAD, status=202))
        replayed = client.get(location, headers=WAIT, status=500)
        bare = TestApp(validator(bare_app)).post_json("/reports/explode", PAYLOAD, status=500)
        assert_same_response(replayed, bare)
        assert "hunter2" not in replayed.text and "Traceback" not in replayed.text
    finally:
        middleware.shutdown(timeout=10)
