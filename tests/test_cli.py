"""The ``wsgi-async`` command, run for real as a subprocess on a loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPResponse

import pytest

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


def wait_until_up(process: subprocess.Popen[str], base: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        try:
            http("GET", base + "/")
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
    assert json.loads(submitted.read())["status"] == "queued"
    pending = http("GET", base + location)
    assert pending.status == 202
    assert json.loads(pending.read())["status"] in ("queued", "running")
    done = http("GET", base + location, headers={"Prefer": "wait=10"})
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
