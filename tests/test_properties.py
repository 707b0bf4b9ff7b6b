"""Property-based tests (hypothesis): hostile input gets a clean answer, never a crash.

Over status paths, ``Prefer``, ``Idempotency-Key``, ``Content-Length`` lies, chunked
bodies and the status and headers an application returns, the middleware answers a
clean 4xx (or ``202``, or a stored ``500`` for a bad application response), never
raises, never sends CR, LF or another control character in a header, and still runs
a normal task afterwards.  In process through webtest with wsgiref.validate on both
sides (where an input is one no server would hand over, the outer validator is left
out and the checks are made here); then a few properties over real HTTP, raw bytes on
a socket, against a live waitress.

Examples are few (``max_examples`` from the profile below) so the module stays under
a minute; ``WSGI_ASYNC_HYPOTHESIS=thorough`` runs many more.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from wsgiref.validate import validator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from webtest import TestApp

from conftest import free_port
from wsgi_async import AsyncMiddleware
from wsgi_helpers import Environ, echo_app, raw_call

settings.register_profile(
    "fast", max_examples=60, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile(os.environ.get("WSGI_ASYNC_HYPOTHESIS", "fast"))
HTTP_PROFILE = settings(PROFILE, max_examples=max(10, PROFILE.max_examples // 2))

STATUS = "/_async/tasks"
MAX_BODY = 1024
# What a server hands over in a header: latin-1 characters, never CR or LF.
HEADER_TEXT = st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=80)
# Control characters other than tab never belong in a header we send (RFC 9110 5.5).
BAD_IN_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_headers(headers: Iterable[tuple[str, str]]) -> None:
    for name, value in headers:
        assert isinstance(name, str) and isinstance(value, str)
        assert not BAD_IN_HEADER.search(name) and not BAD_IN_HEADER.search(value), (name, value)
        name.encode("latin-1")
        value.encode("latin-1")


# -- the application and the front under test -----------------------------------------------

# What the "/async/respond" task answers, by the token in its query string.
RESPONSES: dict[str, tuple[Any, Any]] = {}


VALID_ECHO = validator(echo_app)


def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Echo (validated), or on "/async/respond" the response a property chose (not validated)."""
    if environ["PATH_INFO"] == "/async/respond":
        status, headers = RESPONSES.pop(environ["QUERY_STRING"])
        start_response(status, headers)
        return [b"body"]
    return VALID_ECHO(environ, start_response)


class Front:
    """One middleware for a whole module: its webtest client and a raw caller."""

    def __init__(self) -> None:
        self.middleware = AsyncMiddleware(
            app, routes=[r"^/async"], max_body_size=MAX_BODY, max_wait=0.05, result_ttl=60,
            max_queued=10_000,
        )
        self.test_app = TestApp(validator(self.middleware))

    def call(self, environ: Environ, *, validate: bool = True) -> tuple[int, list[Any], bytes]:
        """Call the middleware with ``environ`` completed; the answer, its headers checked."""
        target = validator(self.middleware) if validate else self.middleware
        status, headers, body = raw_call(target, environ)
        check_headers(headers)
        return int(status[:3]), headers, body

    def final(self, location: str, *, validate: bool = True) -> tuple[int, list[Any], bytes]:
        """A task's final answer, polled with :meth:`call`."""
        deadline = time.monotonic() + 10
        while True:
            path = urlsplit(location).path  # Location is absolute: poll its path
            answer = self.call({"REQUEST_METHOD": "GET", "PATH_INFO": path},
                               validate=validate)
            if answer[0] != 202 or time.monotonic() > deadline:
                return answer
            time.sleep(0.01)

    def result(self, location: str) -> Any:
        """The final answer of a task, within a few seconds."""
        deadline = time.monotonic() + 10
        while True:
            res = self.test_app.get(location, status="*")
            if res.status_int != 202 or time.monotonic() > deadline:
                check_headers(res.headerlist)
                return res
            time.sleep(0.01)

    def assert_healthy(self) -> None:
        """A normal task still runs, and no job is left holding a place in the pool."""
        res = self.test_app.post("/async/ok", b"still fine", status=202)
        done = self.result(res.headers["Location"])
        assert done.status_int == 201 and done.body == b"echo:still fine"
        pool = self.middleware.pool
        deadline = time.monotonic() + 5
        while pool.free_slots != pool.capacity and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.free_slots == pool.capacity


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    made = Front()
    yield made
    made.middleware.shutdown(wait=True, timeout=5)


def clean_4xx(code: int, body: bytes) -> None:
    assert 400 <= code < 500, code
    document = json.loads(body)
    assert set(document) >= {"error", "detail"} and "Traceback" not in body.decode()


# -- status paths -----------------------------------------------------------------------------

# PATH_INFO as servers give it: the request's bytes, percent-decoded, as latin-1.
SEGMENT = st.one_of(
    st.text(max_size=40).map(lambda text: text.encode("utf-8").decode("latin-1")),
    st.binary(max_size=40).map(lambda raw: raw.decode("latin-1")),
    st.sampled_from(["..", ".", "%2e%2e", "%2F", "", "\\", "\x00", "\n", "..;", "~"]),
    st.from_regex(r"[A-Za-z0-9_-]{22,64}", fullmatch=True),
    st.integers(0, 6000).map(lambda size: "A" * size),
)
STATUS_PATHS = st.lists(SEGMENT, max_size=4).map(lambda parts: f"{STATUS}/" + "/".join(parts))
METHODS = st.sampled_from(["GET", "HEAD", "DELETE", "POST", "PUT", "OPTIONS", "PATCH", "TRACE"])


def test_status_paths(front: Front) -> None:
    @PROFILE
    @given(path=st.one_of(STATUS_PATHS, st.just(STATUS)), method=METHODS)
    def status_path(path: str, method: str) -> None:
        code, _, body = front.call({"PATH_INFO": path, "REQUEST_METHOD": method})
        assert code == (404 if method in ("GET", "HEAD", "DELETE") else 405)
        if method == "HEAD":
            assert body == b""
        else:
            clean_4xx(code, body)

    status_path()
    front.assert_healthy()


MOUNTS = st.one_of(
    st.text(st.sampled_from("/\\.:@%?#a\t"), max_size=12),
    st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=20),
).map(lambda mount: "" if mount in ("", "/") else "/" + mount.removeprefix("/"))  # PEP 3333


def test_location_for_any_mount(front: Front) -> None:
    @PROFILE
    @given(mount=MOUNTS)
    @example(mount="//evil.example")
    @example(mount="/\\evil.example")
    def location(mount: str) -> None:
        code, headers, body = front.call({"SCRIPT_NAME": mount, "PATH_INFO": "/async/mount"})
        assert code == 202
        value = dict(headers)["Location"]
        assert json.loads(body)["location"] == value
        path = value.split("://", 1)[1].partition("/")[2] if "://" in value else value[1:]
        # A path, never "//host" or "/\\host" (which browsers read as another host).
        assert value.startswith(("/", "http://localhost")) and path[:1] not in ("/", "\\")

    location()
    front.assert_healthy()


# -- Prefer and Idempotency-Key -------------------------------------------------------------------

PREFER = st.one_of(
    HEADER_TEXT,
    st.builds(
        "{}, wait={}".format,
        st.sampled_from(["respond-async", "RESPOND-ASYNC", "respond-async;x=1", "return=minimal"]),
        st.one_of(st.integers(-5, 10**30).map(str),
                  st.sampled_from(["", "1.5", "nan", "inf", "1e9", "\u00b2", '"1"', "0x10"])),
    ),
)


def test_prefer_on_submit_and_poll(front: Front) -> None:
    @PROFILE
    @given(prefer=PREFER, body=st.binary(max_size=64))
    def prefer(prefer: str, body: bytes) -> None:
        res = front.test_app.post("/async/prefer", body, headers={"Prefer": prefer}, status="*")
        check_headers(res.headerlist)
        assert res.status_int in (201, 202), res.status
        location = res.headers.get("Location")
        if location is None:  # the result itself, within the wait
            assert res.body == b"echo:" + body
            return
        polled = front.test_app.get(location, headers={"Prefer": prefer}, status="*")
        check_headers(polled.headerlist)
        assert polled.status_int in (201, 202)

    prefer()
    front.assert_healthy()


KEYS = st.one_of(
    HEADER_TEXT,
    st.from_regex(r'"?[\x21-\x7e]{1,255}"?', fullmatch=True),
    st.integers(250, 300).map(lambda size: "k" * size),
)
VALID_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def test_idempotency_keys(front: Front) -> None:
    seen: dict[tuple[str, bytes], str] = {}

    @PROFILE
    @given(key=KEYS, body=st.sampled_from([b"a", b"b"]))
    def idempotency_key(key: str, body: bytes) -> None:
        res = front.test_app.post("/async/key", body, headers={"Idempotency-Key": key},
                                  status="*")
        check_headers(res.headerlist)
        stripped = key.strip()
        if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
            stripped = stripped[1:-1]
        if not VALID_KEY.fullmatch(stripped):
            assert res.status_int == 400
            clean_4xx(res.status_int, res.body)
            return
        other = b"b" if body == b"a" else b"a"
        if (stripped, other) in seen and (stripped, body) not in seen:
            assert res.status_int == 422
            clean_4xx(res.status_int, res.body)
            return
        assert res.status_int == 202
        location = res.headers["Location"]
        assert seen.setdefault((stripped, body), location) == location

    idempotency_key()
    front.assert_healthy()


# -- Content-Length lies and chunked bodies (in process) ------------------------------------

LENGTHS = st.one_of(
    st.integers(0, 2 * MAX_BODY).map(str),
    st.sampled_from(["", " 12", "12 ", "-1", "+5", "1_0", "0x10", "1e3", "\u0661", "\u00b2",
                     "99999999999999999999999", "5, 5", "abc"]),
    HEADER_TEXT,
)


def expected_for_length(length: str, body: bytes) -> int:
    """The README's promise: bad 400, too large 413, shorter than announced 400."""
    if not length:
        return 202
    try:
        size = int(length)
    except ValueError:
        return 400
    if size < 0 or not length.strip().isdigit():
        return 400
    if size > MAX_BODY:
        return 413
    return 400 if len(body) < size else 202


def test_content_length_lies(front: Front) -> None:
    @PROFILE
    @given(length=LENGTHS, body=st.binary(max_size=2 * MAX_BODY))
    def content_length(length: str, body: bytes) -> None:
        # wsgiref.validate refuses a non-numeric CONTENT_LENGTH itself: checked here instead.
        valid = length.isascii() and length.isdigit()
        code, headers, answer = front.call(
            {"CONTENT_LENGTH": length, "wsgi.input": io.BytesIO(body),
             "PATH_INFO": "/async/length"}, validate=valid)
        assert code == expected_for_length(length, body), (code, answer)
        if code == 202:
            res = front.result(json.loads(answer)["location"])
            assert res.status_int == 201 and res.body == b"echo:" + body[: int(length or 0)]
        else:
            clean_4xx(code, answer)

    content_length()
    front.assert_healthy()


def test_chunked_bodies(front: Front) -> None:
    @PROFILE
    @given(
        encoding=st.sampled_from(["chunked", "Chunked", "gzip, chunked", "identity", ""]),
        terminated=st.booleans(),
        body=st.binary(max_size=2 * MAX_BODY),
    )
    def chunked(encoding: str, terminated: bool, body: bytes) -> None:
        environ: Environ = {"HTTP_TRANSFER_ENCODING": encoding, "wsgi.input": io.BytesIO(body),
                            "PATH_INFO": "/async/chunked"}
        if terminated:
            environ["wsgi.input_terminated"] = True
        code, _, answer = front.call(environ)
        if terminated:
            expected = 413 if len(body) > MAX_BODY else 202
        else:
            expected = 411 if "chunked" in encoding.lower() else 202
        assert code == expected, (code, answer)
        if code == 202:
            res = front.result(json.loads(answer)["location"])
            assert res.body == b"echo:" + (body if terminated else b"")
        else:
            clean_4xx(code, answer)

    chunked()
    front.assert_healthy()


# -- what the application returns -------------------------------------------------------------

ANY_TEXT = st.text(max_size=30)
NAME = st.one_of(st.sampled_from(["Content-Type", "Set-Cookie", "X-Thing", "Connection"]),
                 ANY_TEXT)
VALUE = st.one_of(HEADER_TEXT, ANY_TEXT)
HEADER = st.one_of(
    st.tuples(NAME, VALUE),
    st.lists(st.one_of(NAME, VALUE), max_size=3),  # a list, or the wrong size
    st.tuples(NAME, st.one_of(st.binary(max_size=10), st.integers(), st.none())),
    st.tuples(st.binary(max_size=10), VALUE),
)


# A header a server can send: a token and a latin-1 value without controls.
VALID_HEADER = st.tuples(
    st.one_of(st.sampled_from(["Content-Type", "Set-Cookie", "X-Thing", "Keep-Alive", "TE"]),
              st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}", fullmatch=True)),
    st.text(st.characters(codec="latin-1", exclude_categories=("Cc",)), max_size=30),
)


@st.composite
def header_lists(draw: st.DrawFn) -> list[Any]:
    """Headers, mostly valid, sometimes with a ``Connection`` header naming some of them."""
    headers = draw(st.lists(st.one_of(VALID_HEADER, VALID_HEADER, HEADER), max_size=5))
    if draw(st.booleans()):
        names = [header[0] for header in headers
                 if len(header) == 2 and isinstance(header[0], str)]
        listed = draw(st.lists(st.sampled_from([*names, "close", "keep-alive"]), max_size=3))
        headers.insert(draw(st.integers(0, len(headers))), ("Connection", ", ".join(listed)))
    return headers


APP_STATUS = st.one_of(
    st.sampled_from(["200 OK", "205 Reset Content", "204 No Content", "304 Not Modified"]),
    st.sampled_from(["200 OK", "201 Created", "204 No Content", "205 Reset Content",
                     "304 Not Modified", "404 Not Found", "500 Oops"]),
    st.from_regex(r"[1-5][0-9]{2} [^\r\n]{0,20}", fullmatch=True),
    ANY_TEXT,
    st.binary(max_size=10),
)


HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "content-length"}


def test_header_bytes_returned_by_the_app(front: Front) -> None:
    @PROFILE
    @given(status=APP_STATUS, headers=st.one_of(header_lists(), st.tuples(NAME, VALUE)))
    @example(status="205 Reset Content", headers=[("Content-Type", "text/plain")])
    @example(status="200 OK", headers=[("Connection", "close, X-Private"), ("X-Private", "1"),
                                       ("Content-Type", "text/plain")])
    @example(status="200 OK", headers=[["Set-Cookie", "secret"]])
    @example(status="200 OK\r\nSet-Cookie: x", headers=[])
    def app_response(status: Any, headers: Any) -> None:
        token = secrets.token_hex(8)
        RESPONSES[token] = (status, headers)
        res = front.test_app.post(f"/async/respond?{token}", status=202)
        # The outer validator is left out of this poll: it asks of the app's own response
        # what HTTP does not (a Content-Type on every one, none on a 304).
        code, sent, body = front.final(res.headers["Location"], validate=False)
        if code == 500 and body != b"body" and json.loads(body)["reason"] == "invalid_response":
            return  # a stored 500: the response could not be stored as it was
        assert isinstance(status, str) and isinstance(headers, list)
        assert code == int(status[:3])
        assert body == (b"" if status[:3] in ("204", "205", "304") else b"body")
        hop = HOP_BY_HOP | {token.strip().lower() for name, value in headers
                            if name.lower() == "connection" for token in value.split(",")}
        # The app's headers in order, then the middleware's Async-Task naming the task.
        assert sent[-1] == ("Async-Task", f'done;id="{res.json["id"]}"')
        assert [(n, v) for n, v in sent[:-1] if n.lower() != "content-length"] == [
            (n, v) for n, v in headers if n.lower() not in hop]

    app_response()
    front.assert_healthy()


# -- over real HTTP: raw bytes against a live waitress ---------------------------------------

APPS = Path(__file__).parent / "apps"


class Waitress:
    """``tests/apps/serverapp.py`` under waitress, on a free loopback port."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(APPS), *filter(None, [os.environ.get("PYTHONPATH")])]))
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "waitress", f"--listen=127.0.0.1:{self.port}",
                 "--threads=4", "serverapp:application"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            assert self.process.poll() is None, self.log()
            try:
                if self.exchange(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "waitress did not start:\n" + self.log()
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def exchange(self, request: bytes) -> tuple[int | None, list[tuple[str, str]], bytes]:
        """Send raw bytes, half-close, read to the end: status (None if none), headers, body."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:
            return None, [], b""
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name, value.strip()))
        check_headers(headers)
        return status, headers, body

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # our child leads its group
        self.process.wait(10)


@pytest.fixture(scope="module")
def waitress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Waitress]:
    pytest.importorskip("waitress")  # a base dependency: always there
    server = Waitress(tmp_path_factory.mktemp("waitress") / "waitress.log")
    try:
        yield server
    finally:
        server.stop()


def submit_head(path: str, headers: list[str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def assert_still_serves(server: Waitress) -> None:
    status, headers, body = server.exchange(
        submit_head("/slow?seconds=0", ["Content-Length: 2"]) + b"ok")
    assert status == 202, body
    location = dict(headers)["Location"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, _, body = server.exchange(
            f"GET {location} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        if status != 202:
            break
        time.sleep(0.02)
    assert status == 201 and body == b"ok"
    assert server.process.poll() is None


@pytest.mark.server
def test_content_length_lies_over_http(waitress: Waitress) -> None:
    @HTTP_PROFILE
    @given(length=st.one_of(st.integers(0, 2 * MAX_BODY).map(str),
                            st.sampled_from(["-1", "abc", "1e3", " 5", "5, 5", "0x10",
                                             "99999999999999999999"])),
           body=st.binary(max_size=2 * MAX_BODY),
           path=st.sampled_from(["/slow?seconds=0", "/slow%0A?seconds=0"]))
    def length_lie(length: str, body: bytes, path: str) -> None:
        status, _, answer = waitress.exchange(
            submit_head(path, [f"Content-Length: {length}"]) + body)
        # None: the body ended before its announced length, and the server hung up.
        assert status is None or status == 202 or 400 <= status < 500, (status, answer)

    length_lie()
    assert_still_serves(waitress)


@pytest.mark.server
def test_chunked_bodies_over_http(waitress: Waitress) -> None:
    @HTTP_PROFILE
    @given(parts=st.lists(st.binary(min_size=1, max_size=400), max_size=6),
           size_of=st.sampled_from(["{:x}", "{:X}", "{:x};ext=1", "zz", "-{:x}", "0{:x}"]))
    def chunked(parts: list[bytes], size_of: str) -> None:
        encoded = b"".join(size_of.format(len(part)).encode() + b"\r\n" + part + b"\r\n"
                           for part in parts) + b"0\r\n\r\n"
        status, _, answer = waitress.exchange(
            submit_head("/slow?seconds=0", ["Transfer-Encoding: chunked"]) + encoded)
        assert status is not None and (status == 202 or 400 <= status < 500), (status, answer)
        well_formed = "{" in size_of and not size_of.startswith("-")
        if well_formed:
            assert status == (413 if sum(map(len, parts)) > MAX_BODY else 202), answer

    chunked()
    assert_still_serves(waitress)


@pytest.mark.server
def test_refusals_over_http_cannot_forge_log_lines(waitress: Waitress) -> None:
    # "$" matches before a final newline: "/slow%0A" reaches the route, and is refused.
    status, _, _ = waitress.exchange(
        submit_head("/slow%0A", ["Content-Length: 5000"]) + b"x" * 5000)
    assert status == 413
    deadline = time.monotonic() + 5
    while "refused POST /slow" not in waitress.log() and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = [line for line in waitress.log().splitlines() if "exceeds max_body_size" in line]
    assert lines and all("refused POST /slow\\n" in line for line in lines), lines
    assert_still_serves(waitress)
