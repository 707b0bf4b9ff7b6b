"""Black box over real HTTP against real WSGI servers, each started as a subprocess.

One suite runs against every server: the ``wsgi-async serve`` CLI (on waitress,
and with ``--dev`` on werkzeug), wsgiref, waitress, gunicorn (gthread and sync
workers), uWSGI and cheroot, all serving ``tests/apps/serverapp.py`` on a free
loopback port.  Only :mod:`http.client` talks to them.  A server whose package is missing is
skipped locally and fails under CI (``CI`` set).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import pytest

from conftest import IN_CI, free_port

pytestmark = pytest.mark.server

APPS = Path(__file__).parent / "apps"
BIN = Path(sys.executable).parent
READY_WITHIN = 15.0
POLL_WITHIN = 15.0

# What tests/apps/serverapp.py does; written out here so the suite checks it from outside.
MAX_BODY_SIZE = 1024
CLI_MAX_BODY_SIZE = 10 * 1024 * 1024  # the CLI builds the middleware with the default
STREAM_CHUNKS = [bytes([65 + i]) * 4000 + b"\n" for i in range(5)]
STREAM_PAUSE = 0.1
SECRET = "hunter2"
TASK_SECONDS = 0.6
# Headers a server adds or rewrites on any response; everything else comes from the app.
SERVER_HEADERS = {"date", "server", "content-length", "transfer-encoding", "connection",
                  "keep-alive"}


# -- HTTP ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> dict[str, object]:
        document = json.loads(self.body)
        assert isinstance(document, dict)
        return document

    def app_part(self) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Status, reason, the application's headers in order, and the body."""
        headers = [(k, v) for k, v in self.headers if k.lower() not in SERVER_HEADERS]
        return self.status, self.reason, headers, self.body


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    *,
    chunked: bool = False,
    timeout: float = 20.0,
) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.connect()
        # Hold the request until it is complete, then send it at once.  A server may answer
        # (411, 413) before reading the body and close: body bytes still arriving after that
        # get the connection reset, which would hide the answer.  Corked, the request is in
        # the server's receive buffer whole, as it would be from a client on a fast network.
        cork = body is not None and hasattr(socket, "TCP_CORK")
        if cork:
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        connection.request(method, path, body=body, headers=headers or {},
                           encode_chunked=chunked)
        if cork:
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        response = connection.getresponse()
        return Reply(response.status, response.reason, response.getheaders(), response.read())
    finally:
        connection.close()


# -- servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    name: str
    package: str | None  # the module that must be importable for the server to exist
    argv: Callable[[int], list[str]]
    max_body_size: int = MAX_BODY_SIZE
    delimits_chunked: bool = True  # sets wsgi.input_terminated for a chunked request body
    executable: str | None = None  # a program that must exist besides the package

    def __str__(self) -> str:
        return self.name


def _cli(*extra: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        script = BIN / "wsgi-async"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "wsgi_async"]
        return [*command, "serve", "serverapp:raw_app", "--route", "^/slow$", "--route",
                "^/fail$", "--host", "127.0.0.1", "--port", str(port), "--log-level", "INFO",
                *extra]

    return argv


def _gunicorn(worker: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        command = [sys.executable, "-m", "gunicorn", "-w", "1", "-k", worker,
                   "-b", f"127.0.0.1:{port}", "--graceful-timeout", "2"]
        if worker == "gthread":
            command += ["--threads", "4"]
        if _gunicorn_has_control_socket():
            # gunicorn 25+ opens ~/.gunicorn/gunicorn.ctl; two servers would share it.
            command.append("--no-control-socket")
        return [*command, "serverapp:application"]

    return argv


def _gunicorn_has_control_socket() -> bool:
    from gunicorn.config import KNOWN_SETTINGS

    return any("--no-control-socket" in (setting.cli or []) for setting in KNOWN_SETTINGS)


def _uwsgi_program() -> str | None:
    local = BIN / "uwsgi"
    return str(local) if local.exists() else shutil.which("uwsgi")


def uwsgi_argv(port: int, *extra: str) -> list[str]:
    return [str(_uwsgi_program()), "--http", f"127.0.0.1:{port}",
            "--module", "serverapp:application", "--pythonpath", str(APPS),
            "--virtualenv", sys.prefix, "--master", "--processes", "1", "--die-on-term",
            *extra]


SERVERS = [
    ServerSpec("cli-waitress", "waitress", _cli(), max_body_size=CLI_MAX_BODY_SIZE),
    ServerSpec("cli-dev-werkzeug", "werkzeug", _cli("--dev"), max_body_size=CLI_MAX_BODY_SIZE),
    ServerSpec("wsgiref", "wsgiref",
               lambda port: [sys.executable, str(APPS / "wsgiref_runner.py"), str(port)],
               delimits_chunked=False),
    ServerSpec("waitress", "waitress",
               lambda port: [sys.executable, "-m", "waitress", f"--listen=127.0.0.1:{port}",
                             "--threads=4", "serverapp:application"]),
    ServerSpec("gunicorn-gthread", "gunicorn", _gunicorn("gthread")),
    ServerSpec("gunicorn-sync", "gunicorn", _gunicorn("sync")),
    ServerSpec("uwsgi", None,
               lambda port: uwsgi_argv(port, "--enable-threads", "--need-app"),
               delimits_chunked=False, executable="uwsgi"),
    ServerSpec("cheroot", "cheroot",
               lambda port: [sys.executable, "-m", "cheroot", "--bind", f"127.0.0.1:{port}",
                             "serverapp:application"]),
]


def require(spec: ServerSpec) -> None:
    """Skip (locally) or fail (under CI) when the server is not installed."""
    problem = None
    if spec.package is not None and importlib.util.find_spec(spec.package) is None:
        problem = f"the {spec.package!r} package is not installed"
    elif spec.executable == "uwsgi" and _uwsgi_program() is None:
        problem = "the uwsgi program is not installed"
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"{spec.name}: {problem}, and CI requires every server")
    pytest.skip(f"{spec.name}: {problem} (pip install 'wsgi-async[test]')")


class Server:
    """One server subprocess (in its own process group) and its log."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path) -> None:
        self.name = name
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(APPS), *filter(None, [os.environ.get("PYTHONPATH")])]))
        try:
            self.process = subprocess.Popen(argv, env=env, stdout=self._log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self._log.close()
            raise

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_ready(self, accept: Callable[[Reply], bool]) -> None:
        deadline = time.monotonic() + READY_WITHIN
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if accept(self.request("GET", "/ready", timeout=2)):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready in {READY_WITHIN} s:\n{self.log()[-4000:]}")

    def request(self, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
                headers: dict[str, str] | None = None, *, chunked: bool = False,
                timeout: float = 20.0) -> Reply:
        return http_request(self.port, method, path, body, headers, chunked=chunked,
                            timeout=timeout)

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # our child is the group leader
        except ProcessLookupError:
            pass
        finally:
            try:
                self.process.wait(timeout=10)
            finally:
                self._log.close()


def start(name: str, argv: list[str], port: int, log_dir: Path,
          accept: Callable[[Reply], bool] = lambda reply: reply.status == 200) -> Server:
    server = Server(name, argv, port, log_dir)
    try:
        server.wait_ready(accept)
    except BaseException:
        server.stop()
        raise
    return server


@dataclass
class Running:
    spec: ServerSpec
    server: Server

    def request(self, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
                headers: dict[str, str] | None = None, *, chunked: bool = False) -> Reply:
        return self.server.request(method, path, body, headers, chunked=chunked)

    def log_tail(self) -> str:
        return f"--- {self.spec.name} log ---\n{self.server.log()[-4000:]}"


@pytest.fixture(scope="module", params=SERVERS, ids=str)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Running]:
    spec: ServerSpec = request.param
    require(spec)
    port = free_port()
    server = start(spec.name, spec.argv(port), port, tmp_path_factory.mktemp(spec.name))
    try:
        yield Running(spec, server)
    finally:
        server.stop()


# -- helpers ------------------------------------------------------------------------------


def assert_accepted(reply: Reply) -> str:
    """Check a 202; return the path of its (absolute) Location, to request on this server."""
    assert reply.status == 202, reply
    location = reply.header("Location")
    # Absolute, on the host the request named, whatever the server (issue 11).
    assert location is not None and location.startswith("http://127.0.0.1:"), location
    path = urlsplit(location).path
    assert path.startswith("/_async/tasks/")
    assert reply.header("Retry-After") == "1"
    assert reply.header("Cache-Control") == "no-store"
    assert reply.header("Content-Type") == "application/json"
    document = reply.json()
    assert document["id"] == location.rsplit("/", 1)[1]
    assert document["status"] in ("queued", "running")
    assert document["location"] == location
    return path


def poll(served: Running, location: str, *, within: float = POLL_WITHIN) -> list[Reply]:
    """GET ``location`` until it is not 202; every reply, the final one last."""
    replies = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        reply = served.request("GET", location)
        replies.append(reply)
        if reply.status != 202:
            return replies
        time.sleep(0.05)
    raise AssertionError(f"{location} still pending after {within} s: {replies[-1]}")


def wait_for(served: Running, location: str, seconds: int = 10) -> Reply:
    return served.request("GET", location, headers={"Prefer": f"wait={seconds}"})


def assert_same_as_direct(replayed: Reply, direct: Reply) -> None:
    """The replay is the application's response byte for byte, as the server sent it directly,
    then the middleware's ``Async-Task`` header naming the finished task."""
    status, reason, headers, body = replayed.app_part()
    said = [value for name, value in headers if name == "Async-Task"]
    assert len(said) == 1 and said[0].startswith('done;id="'), headers
    rest = [(name, value) for name, value in headers if name != "Async-Task"]
    assert (status, reason, rest, body) == direct.app_part()
    assert replayed.header("Content-Length") == str(len(replayed.body))


# -- the suite ----------------------------------------------------------------------------

BODY = bytes(range(256)) * 2
TOKEN = {"X-Token": "tok-42", "Content-Type": "application/octet-stream"}


def test_submit_answers_at_once_then_poll_then_result(served: Running) -> None:
    began = time.monotonic()
    submitted = served.request("POST", f"/slow?seconds={TASK_SECONDS}", BODY, TOKEN)
    took = time.monotonic() - began
    location = assert_accepted(submitted)
    assert took < min(1.0, TASK_SECONDS), f"the submit took {took:.3f} s"
    assert submitted.json()["status"] == "queued"

    replies = poll(served, location)
    finished = time.monotonic() - began
    assert len(replies) >= 2, "the first poll should find the task still running"
    for pending in replies[:-1]:
        assert pending.status == 202
        assert pending.json()["status"] in ("queued", "running")
        assert urlsplit(pending.header("Location") or "").path == location
        assert pending.header("Cache-Control") == "no-store"
    assert finished >= TASK_SECONDS

    replayed = replies[-1]
    direct = served.request("POST", "/direct/slow?seconds=0", BODY, TOKEN)
    assert direct.status == 201
    assert_same_as_direct(replayed, direct)
    assert replayed.status == 201 and replayed.body == BODY
    assert replayed.header("X-Echo") == "tok-42"
    assert replayed.header("Set-Cookie") == "report=ready; Path=/; HttpOnly"

    assert served.request("GET", location).app_part() == replayed.app_part()
    assert served.request("DELETE", location).status == 204
    assert served.request("GET", location).status == 410  # deleted (issue 11)


def test_prefer_wait(served: Running) -> None:
    # On the poll: one request that returns once the task is done.
    location = assert_accepted(served.request("POST", "/slow?seconds=0.5", BODY, TOKEN))
    began = time.monotonic()
    done = wait_for(served, location)
    assert done.status == 201 and done.body == BODY
    assert time.monotonic() - began < 5

    # On the submit: the result comes back instead of the 202.
    direct = served.request("POST", "/direct/slow?seconds=0", BODY, TOKEN)
    at_once = served.request("POST", "/slow?seconds=0.3", BODY, {**TOKEN, "Prefer": "wait=10"})
    # Plus what says how it was chosen (RFC 7240, issue 11): the app's response otherwise.
    assert at_once.header("Preference-Applied") == "wait=10"
    assert at_once.header("Vary") == "Prefer"
    said = {"preference-applied", "vary"}
    at_once.headers[:] = [(k, v) for k, v in at_once.headers if k.lower() not in said]
    assert_same_as_direct(at_once, direct)

    # A wait shorter than the task answers 202 when it runs out, not later.
    location = assert_accepted(served.request("POST", "/slow?seconds=2", BODY, TOKEN))
    began = time.monotonic()
    pending = wait_for(served, location, seconds=1)
    waited = time.monotonic() - began
    assert pending.status == 202, pending
    assert 0.9 <= waited < 1.9, f"Prefer: wait=1 held {waited:.3f} s"


def test_streaming_route_passes_through(served: Running) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=20)
    try:
        began = time.monotonic()
        connection.request("GET", "/stream")
        response = connection.getresponse()
        first = response.read1(65536)
        first_after = time.monotonic() - began
        body = first + response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()
    assert response.status == 200
    assert body == b"".join(STREAM_CHUNKS)
    assert first and STREAM_CHUNKS[0].startswith(first[:4000])
    # Streamed: the first chunk arrives while the generator still sleeps between chunks.
    assert first_after < STREAM_PAUSE * (len(STREAM_CHUNKS) - 1), f"first chunk {first_after:.3f} s"
    assert "location" not in headers and "cache-control" not in headers


def test_body_size_limit(served: Running) -> None:
    limit = served.spec.max_body_size
    location = assert_accepted(served.request("POST", "/slow?seconds=0", b"x" * limit))
    done = wait_for(served, location)
    assert done.status == 201 and done.header("X-Body-Length") == str(limit)
    assert done.body == b"x" * limit

    too_big = served.request("POST", "/slow?seconds=0", b"x" * (limit + 1))
    assert too_big.status == 413, too_big
    assert too_big.header("Content-Type") == "application/json"
    assert f"exceeds max_body_size ({limit})" in str(too_big.json()["detail"])


def chunks(total: int, size: int = 300) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        part = bytes([97 + (sent // size) % 26]) * min(size, total - sent)
        sent += len(part)
        yield part


def test_chunked_request_body(served: Running) -> None:
    body = b"".join(chunks(700))
    reply = served.request("POST", "/slow?seconds=0", chunks(700), TOKEN, chunked=True)
    if not served.spec.delimits_chunked:
        # No wsgi.input_terminated and no Content-Length: the body cannot be told apart.
        assert reply.status == 411, reply
        assert reply.json() == {
            "error": "Length Required",
            "detail": "this server does not delimit chunked request bodies; send a Content-Length",
        }
        return
    done = wait_for(served, assert_accepted(reply))
    assert done.status == 201 and done.body == body
    assert done.header("X-Body-Length") == "700"

    limit = served.spec.max_body_size
    too_big = served.request("POST", "/slow?seconds=0", chunks(limit + 1, 64 * 1024), TOKEN,
                             chunked=True)
    assert too_big.status == 413, too_big


def test_thirty_concurrent_submits_all_finish(served: Running) -> None:
    def submit(i: int) -> Reply:
        try:
            return served.request("POST", "/slow?seconds=0.2", f"job-{i}".encode(),
                                  {"X-Token": str(i)})
        except OSError as exc:
            raise AssertionError(f"submit {i} failed: {exc!r}\n{served.log_tail()}") from exc

    with ThreadPoolExecutor(max_workers=30) as pool:
        submitted = list(pool.map(submit, range(30)))
    locations = [assert_accepted(reply) for reply in submitted]
    assert len(set(locations)) == 30

    deadline = time.monotonic() + 30
    results: dict[int, Reply] = {}
    lock = threading.Lock()

    def finish(i: int) -> None:
        while time.monotonic() < deadline:
            try:
                reply = wait_for(served, locations[i])
            except OSError as exc:
                raise AssertionError(f"poll {i} failed: {exc!r}\n{served.log_tail()}") from exc
            if reply.status != 202:
                with lock:
                    results[i] = reply
                return

    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(finish, range(30)))
    assert sorted(results) == list(range(30)), f"tasks left pending\n{served.log_tail()}"
    for i, reply in results.items():
        assert reply.status == 201, f"{reply}\n{served.log_tail()}"
        assert reply.body == f"job-{i}".encode()
        assert reply.header("X-Echo") == str(i)


def test_failing_route_is_a_stored_500_without_traceback(served: Running) -> None:
    location = assert_accepted(served.request("POST", "/fail", b"{}"))
    task_id = location.rsplit("/", 1)[1]
    failed = wait_for(served, location)
    assert failed.status == 500
    assert failed.header("Content-Type") == "application/json"
    assert failed.header("Cache-Control") == "no-store"
    assert failed.json() == {
        "error": "Internal Server Error",
        "detail": "The application raised an error while running this task.",
        "id": task_id,
        "reason": "application_error",
    }
    for leak in (b"Traceback", b"RuntimeError", SECRET.encode(), b".py"):
        assert leak not in failed.body
    # The traceback is in the server's log instead.
    deadline = time.monotonic() + 5
    while SECRET not in served.server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = served.server.log()
    assert SECRET in log and "Traceback" in log and task_id in log


# -- uWSGI without --enable-threads -------------------------------------------------------


@pytest.mark.compat("uwsgi")
def test_uwsgi_without_enable_threads(tmp_path: Path) -> None:
    """uWSGI started without --enable-threads (nor --threads).

    Where that leaves Python threads off (uWSGI logs "Python threads support is
    disabled"), the pool's threads would never run: the middleware must fail
    loudly.  Where uWSGI enables threads anyway (2.0.31 does: its --enable-threads
    is a stub "true by default", and it logs "python threads support enabled"),
    tasks must run, also while the worker sits idle between requests.
    """
    spec = next(s for s in SERVERS if s.name == "uwsgi")
    require(spec)
    port = free_port()
    server = start("uwsgi-no-threads", uwsgi_argv(port), port, tmp_path, accept=lambda r: True)
    try:
        log = server.log()
        if "Python threads support is disabled" in log:
            reply = server.request("POST", "/slow?seconds=0", b"x")
            assert reply.status in (500, 503) or "--enable-threads" in server.log()
            assert "--enable-threads" in server.log()
            assert reply.status != 202, "a task was accepted that no thread will ever run"
            return
        assert "python threads support enabled" in log, log[-4000:]
        assert "--enable-threads" not in log, "a false alarm: this uWSGI has threads"
        location = assert_accepted(server.request("POST", "/slow?seconds=0.2", b"idle"))
        time.sleep(1.0)  # no request in flight: only the pool's own thread can finish it
        done = server.request("GET", location)
        assert done.status == 201 and done.body == b"idle"
    finally:
        server.stop()
