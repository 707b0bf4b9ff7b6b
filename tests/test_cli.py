"""The ``wsgi-async`` command, run for real as a subprocess on a loopback port."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPException, HTTPResponse
from pathlib import Path

import pytest

import wsgi_async
from conftest import free_port


def http(
    method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> HTTPResponse:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        response: HTTPResponse = urllib.request.urlopen(request, timeout=15)
    except urllib.error.HTTPError as error:
        return error  # type: ignore[return-value]
    return response


def wait_until_up(
    process: subprocess.Popen[str] | subprocess.Popen[bytes], base: str
) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        try:
            http("GET", base + "/").close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server did not start in 15 s")


@pytest.fixture
def demo() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "wsgi_async", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, base)
        yield base, process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_demo_flow(demo: tuple[str, subprocess.Popen[str]]) -> None:
    base, process = demo
    began = time.monotonic()
    submitted = http("POST", base + "/reports?seconds=1", b"hello")
    assert submitted.status == 202
    assert time.monotonic() - began < 1
    location = submitted.headers["Location"]
    assert location.startswith(base + "/_async/tasks/")  # absolute, on the host asked
    assert json.loads(submitted.read())["status"] == "queued"
    pending = http("GET", location)
    assert pending.status == 202
    assert json.loads(pending.read())["status"] in ("queued", "running")
    done = http("GET", location, headers={"Prefer": "wait=10"})
    assert done.status == 201
    report = json.loads(done.read())
    assert report["you_sent"] == "hello" and report["report"] == "ready"
    assert report["task_id"] == location.rsplit("/", 1)[1]
    os.kill(process.pid, signal.SIGTERM)
    process.wait(10)
    assert process.stdout is not None
    output = process.stdout.read()
    assert "curl -i -X POST -d 'hello'" in output
    assert base in output


def test_serve_rejects_a_bad_app() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsgi_async", "serve", "no_such_module:app", "--route", "^/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "cannot import 'no_such_module:app'" in result.stderr


def test_serve_rejects_a_bad_route() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsgi_async",
            "serve",
            "wsgi_async.demo:demo_app",
            "--route",
            "(bad",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "invalid regex '(bad'" in result.stderr


# -- the installed command, run from the folder of a tiny app -----------------------------

COMMAND = Path(sys.executable).parent / "wsgi-async"
PLAIN_APP = '''\
import time


def app(environ, start_response):
    if environ["PATH_INFO"].startswith("/export/"):
        time.sleep(0.2)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"plain says hello from " + environ["PATH_INFO"].encode()]
'''


@pytest.fixture
def app_folder(tmp_path: Path) -> Path:
    """A temporary folder holding ``plain.py``, as a user's project would."""
    assert COMMAND.exists(), f"wsgi-async is not installed next to {sys.executable}"
    (tmp_path / "plain.py").write_text(PLAIN_APP)
    return tmp_path


class Command:
    """The installed ``wsgi-async`` running in its own process group, its output in a file."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / f"wsgi-async-{self.port}.log"
        self.code: int | None = None
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(COMMAND), *args, "--port", str(self.port)], cwd=folder, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_up(self) -> None:
        try:
            wait_until_up(self.process, self.base)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None

    def stop(self) -> int:
        """SIGTERM to our child (by pid), then its whole group (``--dev``'s reloaded child)."""
        if self.code is not None:
            return self.code
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.code = self.process.wait(10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # our child leads the group
            self.process.wait(10)
        return self.process.returncode if self.code is None else self.code


@contextlib.contextmanager
def running(folder: Path, *args: str) -> Iterator[Command]:
    command = Command(folder, *args)
    try:
        command.wait_up()
        yield command
    finally:
        command.stop()


def test_serve_imports_the_app_from_the_current_folder_and_runs_on_waitress(
    app_folder: Path,
) -> None:
    with running(app_folder, "serve", "plain:app", "--route", "^/export/",
                 "--task-threads", "2", "--log-level", "info") as served:
        direct = http("GET", served.base + "/")
        assert direct.status == 200 and direct.read() == b"plain says hello from /"
        assert direct.headers["Server"] == "waitress"  # a production server, not werkzeug's
        submitted = http("POST", served.base + "/export/csv", b"x")
        submitted.close()
        assert submitted.status == 202
        location = submitted.headers["Location"]
        done = http("GET", location, headers={"Prefer": "wait=10"})
        assert done.status == 200 and done.read() == b"plain says hello from /export/csv"
        assert served.stop() == 0, served.log()  # SIGTERM ends it cleanly
    log = served.log()
    task_id = location.rsplit("/", 1)[1]
    assert f"INFO wsgi_async: task {task_id} accepted" in log
    assert "INFO waitress: Serving on http://127.0.0.1:" in log
    assert "wsgi_async wsgi_async" not in log and "wsgi_async: wsgi_async:" not in log
    assert "development server" not in log


def test_serve_dev_runs_werkzeugs_reloading_server(app_folder: Path) -> None:
    with running(app_folder, "serve", "plain:app", "--route", "^/export/", "--dev") as served:
        first = http("GET", served.base + "/")
        assert first.headers["Server"].startswith("Werkzeug/")
        assert first.read() == b"plain says hello from /"
        plain = app_folder / "plain.py"
        plain.write_text(PLAIN_APP.replace("plain says hello", "plain was reloaded"))
        deadline = time.monotonic() + 20
        body = b""
        while time.monotonic() < deadline:
            # While the server restarts, a connection may be refused or cut mid-answer.
            with contextlib.suppress(OSError, HTTPException):
                body = http("GET", served.base + "/").read()
                if body.startswith(b"plain was reloaded"):
                    break
            time.sleep(0.2)
        assert body == b"plain was reloaded from /", served.log()
        submitted = http("POST", served.base + "/export/csv", b"x")
        submitted.close()
        assert submitted.status == 202
        done = http("GET", submitted.headers["Location"],
                    headers={"Prefer": "wait=10"})
        assert done.read() == b"plain was reloaded from /export/csv"


def test_workers_is_a_deprecated_alias_of_task_threads(app_folder: Path) -> None:
    with running(app_folder, "serve", "plain:app", "--route", "^/export/",
                 "--workers", "2") as served:
        reply = http("GET", served.base + "/")
        assert reply.status == 200 and reply.read() == b"plain says hello from /"
    assert "--workers is deprecated" in served.log() and "--task-threads" in served.log()


def test_version_agrees_with_the_package_and_its_metadata(app_folder: Path) -> None:
    shown = subprocess.run([str(COMMAND), "--version"], cwd=app_folder, capture_output=True,
                           text=True, timeout=30, check=True).stdout.strip()
    assert shown == f"wsgi-async {wsgi_async.__version__}"
    assert wsgi_async.__version__ == importlib.metadata.version("wsgi-async")


def test_log_level_takes_a_choice_and_never_ends_in_a_traceback(app_folder: Path) -> None:
    result = subprocess.run(
        [str(COMMAND), "serve", "plain:app", "--route", "^/", "--log-level", "chatty"],
        cwd=app_folder, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "invalid choice: 'CHATTY'" in result.stderr and "WARNING" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["demo"], ["serve", "plain:app", "--route", "^/export/"]])
def test_a_busy_port_is_a_clear_error_before_anything_is_printed(
    app_folder: Path, command: list[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([str(COMMAND), *command, "--port", str(port)], cwd=app_folder,
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""  # no curl steps for a demo that is not running
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_rejects_an_object_that_is_not_an_app(app_folder: Path) -> None:
    (app_folder / "notapp.py").write_text("app = 42\n")
    result = subprocess.run([str(COMMAND), "serve", "notapp:app", "--route", "^/"],
                            cwd=app_folder, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "'notapp:app' is not a WSGI application" in result.stderr
