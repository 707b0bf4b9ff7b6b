"""``wsgi_async.client.call`` and ``wsgi-async call`` against a live server.

One ``wsgi-async serve`` process on a free loopback port serves
``tests/apps/clientapp.py``: its ``/long`` and ``/fail`` routes run as tasks of
the middleware, and ``/mimic/...`` is a hand-written server of the pattern
(relative, absolute and other-origin ``Location``, ``303 See Other``,
``Retry-After``, progress documents, ``DELETE``) that ignores ``Prefer: wait``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pty
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port
from live_server import app_env, serve_clientapp
from wsgi_async import client
from wsgi_async.call import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE

pytestmark = pytest.mark.server

RESULT = b"result:\x00\xff\x01binary\r\n"  # what clientapp's tasks end with


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve_clientapp() as url:
        yield url


def mimic_log(base: str, job_path: str) -> list[dict[str, Any]]:
    """The requests the mimic server saw for the job whose status path is ``job_path``."""
    with urllib.request.urlopen(base + "/mimic/log", timeout=10) as response:
        entries: list[dict[str, Any]] = json.loads(response.read())
    return [entry for entry in entries if entry["path"] == job_path]


# -- the Python client -------------------------------------------------------------------


def test_follows_a_task_of_the_middleware(base: str) -> None:
    tasks: list[str] = []
    began = time.monotonic()
    response = client.call(base + "/long?seconds=1.5", data=b"hello", on_task=tasks.append,
                           headers={"Content-Type": "text/plain"})
    took = time.monotonic() - began
    assert response.status == 201 and response.reason == "Created" and response.ok
    assert response.body == b"hello" + RESULT
    assert response.header("x-task") == "long"
    assert tasks == [response.task_url] and response.url == response.task_url
    assert response.task_url is not None
    assert response.task_url.startswith(base + "/_async/tasks/")  # the relative path resolved
    assert 1.5 <= took < 10  # the long-poll returned as the task ended


def test_reports_the_progress_of_a_task_of_the_middleware(base: str) -> None:
    progress: list[Any] = []
    response = client.call(base + "/progress?steps=6&step=0.4", on_progress=progress.append)
    assert (response.status, response.body) == (201, RESULT)
    assert progress, "no progress document was seen"
    currents = [document["current"] for document in progress]
    assert currents == sorted(set(currents))
    for document in progress:
        current = document["current"]
        assert document == {"current": current, "total": 6,
                            "percent": math.floor(current * 10000 / 6) / 100,
                            "message": f"step {current} of 6"}


def test_follows_a_task_url_it_is_given(base: str) -> None:
    request = urllib.request.Request(base + "/long?seconds=0.5", data=b"again", method="POST")
    with urllib.request.urlopen(request, timeout=10) as accepted:
        task_url = urllib.parse.urljoin(base, accepted.headers["Location"])
    response = client.call(task_url, "GET")
    assert (response.status, response.body, response.task_url) == (
        201, b"again" + RESULT, task_url)


def test_a_failed_task_is_returned_not_raised(base: str) -> None:
    response = client.call(base + "/fail")
    assert response.status == 500 and not response.ok
    assert response.json()["error"] == "Internal Server Error"
    assert response.task_url is not None


def test_a_final_first_answer_is_returned_as_is(base: str) -> None:
    response = client.call(base + "/ready", method="GET")
    assert (response.status, response.body, response.task_url) == (200, b"ready", None)


@pytest.mark.parametrize("style", ["relative", "absolute", "other-origin"])
def test_follows_any_location(base: str, style: str) -> None:
    progress: list[Any] = []
    tasks: list[str] = []
    response = client.call(f"{base}/mimic/jobs?steps=4&step=0.25&style={style}",
                           headers={"Authorization": "Bearer t0ken"},
                           on_progress=progress.append, on_task=tasks.append)
    assert (response.status, response.body) == (200, RESULT)
    assert len(tasks) == 1
    job_path = "/mimic/status/" + tasks[0].rsplit("/", 1)[1]
    host = "localhost" if style == "other-origin" else "127.0.0.1"
    assert tasks[0].startswith(f"http://{host}:") and tasks[0].endswith(job_path)
    # Each new progress document once, in order, as the server reported it.
    currents = [document["current"] for document in progress]
    assert currents == sorted(set(currents)) and currents
    assert progress[0] == {"current": currents[0], "total": 4, "percent": currents[0] * 25.0,
                           "message": f"step {currents[0]} of 4"}
    polls = mimic_log(base, job_path)
    assert polls and all(poll["method"] == "GET" for poll in polls)
    assert all(poll["prefer"] == "wait=1" for poll in polls)  # on_progress: short waits
    # Credentials go to the origin they were given for, not to another one.
    assert all(poll["authorization"] == (style != "other-origin") for poll in polls)


def test_a_pending_poll_without_location_keeps_polling(base: str) -> None:
    progress: list[Any] = []
    response = client.call(f"{base}/mimic/jobs?steps=3&step=0.2&bare=1",
                           on_progress=progress.append)
    assert (response.status, response.body) == (200, RESULT) and progress


@pytest.mark.parametrize("style", ["see-other", "see-other-submit"])
def test_follows_see_other(base: str, style: str) -> None:
    response = client.call(f"{base}/mimic/jobs?steps=2&step=0.2&style={style}")
    assert (response.status, response.body) == (200, RESULT)
    target = "/mimic/result/" if style == "see-other" else "/mimic/status/"
    assert response.url.startswith(base + target)


def test_honours_retry_after_when_a_poll_is_answered_at_once(base: str) -> None:
    tasks: list[str] = []
    response = client.call(f"{base}/mimic/jobs?steps=2&step=1&retry=1", on_task=tasks.append)
    assert response.status == 200
    polls = mimic_log(base, "/mimic/status/" + tasks[0].rsplit("/", 1)[1])
    assert all(poll["prefer"] == "wait=10" for poll in polls)
    # The first poll goes at once; then one per Retry-After second until the 2 s are up.
    assert 2 <= len(polls) <= 4
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(polls)]
    assert all(gap >= 0.9 for gap in gaps)


def test_timeout_leaves_the_task_alone(base: str) -> None:
    began = time.monotonic()
    with pytest.raises(client.Timeout) as raised:
        client.call(f"{base}/mimic/jobs?steps=50&step=0.2&retry=0", timeout=1.0)
    assert 1.0 <= time.monotonic() - began < 6
    assert raised.value.task_url is not None and not raised.value.cancelled
    job_path = "/mimic/status/" + raised.value.task_url.rsplit("/", 1)[1]
    assert "DELETE" not in {entry["method"] for entry in mimic_log(base, job_path)}


def test_timeout_cancels_when_asked(base: str) -> None:
    with pytest.raises(client.Timeout) as raised:
        client.call(f"{base}/mimic/jobs?steps=50&step=0.2", timeout=0.8,
                    cancel_on_timeout=True)
    assert raised.value.cancelled and raised.value.task_url is not None
    job_path = "/mimic/status/" + raised.value.task_url.rsplit("/", 1)[1]
    assert [e["method"] for e in mimic_log(base, job_path)][-1] == "DELETE"
    assert client.call(raised.value.task_url, "GET").status == 410


def test_timeout_bounds_a_long_poll_of_the_middleware(base: str) -> None:
    began = time.monotonic()
    with pytest.raises(client.Timeout) as raised:
        client.call(base + "/long?seconds=4", timeout=1.0)
    assert time.monotonic() - began < 3.5  # the long-poll was cut short, not waited out
    assert raised.value.task_url is not None and not raised.value.cancelled
    # The task goes on: its URL still answers 202.
    with urllib.request.urlopen(raised.value.task_url, timeout=10) as pending:
        assert pending.status == 202


def test_timeout_cancels_a_task_of_the_middleware_when_asked(base: str) -> None:
    with pytest.raises(client.Timeout) as raised:
        client.call(base + "/long?seconds=4", timeout=1.0, cancel_on_timeout=True)
    assert raised.value.cancelled and raised.value.task_url is not None
    gone = client.call(raised.value.task_url, "GET")
    assert gone.status == 410 and gone.json()["status"] == "cancelled"


def test_max_polls(base: str) -> None:
    with pytest.raises(client.TooManyPolls) as raised:
        client.call(f"{base}/mimic/jobs?steps=50&step=0.2", max_polls=3)
    assert raised.value.task_url is not None


def test_max_response_size(base: str) -> None:
    assert len(client.call(base + "/mimic/big?size=1000", "GET",
                           max_response_size=1000).body) == 1000
    with pytest.raises(client.ResponseTooLarge):
        client.call(base + "/mimic/big?size=1001", "GET", max_response_size=1000)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "127.0.0.1:8000/x", "http://",
                                 "http://127.0.0.1:99999/", "http://127.0.0.1/a b"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(client.InvalidURL):
        client.call(url)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="timeout"):
        client.call("http://127.0.0.1:1/", timeout=0)
    with pytest.raises(ValueError, match="max_polls"):
        client.call("http://127.0.0.1:1/", max_polls=0)


def test_connection_refused() -> None:
    url = f"http://127.0.0.1:{free_port()}/x"
    with pytest.raises(client.ConnectionFailed) as raised:
        client.call(url)
    assert raised.value.url == url and raised.value.task_url is None


# -- wsgi-async call ---------------------------------------------------------------------


def run_call(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "wsgi_async", "call", *argv],
                          capture_output=True, timeout=timeout, env=app_env())


def test_call_prints_the_body_and_exits_0(base: str, tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"\x00\x01\xfe\xff")
    done = run_call(base + "/long?seconds=0.5", "-d", f"@{payload}", "-H", "X-Token: abc")
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout == b"\x00\x01\xfe\xff" + RESULT


def test_call_shows_progress_on_stderr(base: str) -> None:
    done = run_call(f"{base}/mimic/jobs?steps=4&step=0.3&style=see-other", "-d", "x")
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout == RESULT
    stderr = done.stderr.decode()
    assert "step 1 of 4" in stderr or "step 2 of 4" in stderr
    assert "/4 [" in stderr  # tqdm's "n/total [elapsed..." bar


def test_call_shows_the_progress_of_a_task_of_the_middleware(base: str) -> None:
    done = run_call(base + "/progress?steps=6&step=0.4")
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout == RESULT
    assert re.search(rb"step \d of 6: +\d+%\|.*\| \d/6 \[", done.stderr), done.stderr


def test_call_says_it_waits_before_any_progress(base: str) -> None:
    done = run_call(base + "/long?seconds=0.5")
    assert done.returncode == EXIT_OK, done.stderr
    assert re.search(rb"waiting for http://127\.0\.0\.1:\d+/_async/tasks/[\w-]+", done.stderr)


def test_call_failed_task_exits_1(base: str) -> None:
    done = run_call(base + "/fail", "--no-progress")
    assert done.returncode == EXIT_FAILED
    assert json.loads(done.stdout)["error"] == "Internal Server Error"
    assert b"500 Internal Server Error" in done.stderr


def test_call_timeout_exits_4(base: str) -> None:
    done = run_call(base + "/long?seconds=4", "--timeout", "1")
    assert done.returncode == EXIT_TIMEOUT
    assert done.stdout == b""
    assert b"timed out waiting for the task" in done.stderr
    assert b"not cancelled" in done.stderr


def test_call_usage_errors_exit_2(base: str) -> None:
    assert run_call("ftp://example.com/").returncode == EXIT_USAGE
    assert run_call(base + "/long", "-H", "no colon").returncode == EXIT_USAGE
    assert run_call(base + "/long", "-d", "@/nonexistent/file").returncode == EXIT_USAGE


def _interrupt_when_polling(process: subprocess.Popen[bytes], base: str, job: str) -> None:
    """Wait until the mimic saw a poll of some job, then send SIGINT."""
    deadline = time.monotonic() + 15
    while not any(e["path"].startswith("/mimic/status/") and e["method"] == "GET"
                  and e["at"] > float(job) for e in _all_log(base)):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)


def _all_log(base: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(base + "/mimic/log", timeout=10) as response:
        entries: list[dict[str, Any]] = json.loads(response.read())
    return entries


def _mimic_now(base: str) -> str:
    """The mimic server's monotonic clock, as the last entry of its log."""
    return str(_all_log(base)[-1]["at"])


@pytest.mark.parametrize("cancel", [True, False])
def test_call_interrupt_without_a_tty(base: str, cancel: bool) -> None:
    since = _mimic_now(base)
    argv = [sys.executable, "-m", "wsgi_async", "call", f"{base}/mimic/jobs?steps=100",
            "--no-progress", *(["--cancel-on-interrupt"] if cancel else [])]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=app_env())
    try:
        _interrupt_when_polling(process, base, since)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == EXIT_INTERRUPTED
    assert stdout == b""
    deletes = [e for e in _all_log(base) if e["method"] == "DELETE" and e["at"] > float(since)]
    if cancel:
        assert len(deletes) == 1 and b"cancelled" in stderr and b"204" in stderr
    else:
        assert deletes == [] and b"the task goes on" in stderr


@pytest.mark.parametrize("answer", [b"y\n", b"\n"])
def test_call_interrupt_asks_on_a_tty(base: str, answer: bytes) -> None:
    since = _mimic_now(base)
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "wsgi_async", "call", f"{base}/mimic/jobs?steps=100",
         "--no-progress"],
        stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=app_env())
    os.close(terminal)
    try:
        _interrupt_when_polling(process, base, since)
        assert process.stderr is not None
        prompt = b""
        deadline = time.monotonic() + 10
        while b"[y/N]" not in prompt:
            assert time.monotonic() < deadline, prompt
            prompt += os.read(process.stderr.fileno(), 1000)
        assert b"Cancel task http://127.0.0.1:" in prompt
        os.write(controller, answer)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == EXIT_INTERRUPTED
    deletes = [e for e in _all_log(base) if e["method"] == "DELETE" and e["at"] > float(since)]
    assert len(deletes) == (1 if answer == b"y\n" else 0)


def test_call_interrupt_cancels_a_task_of_the_middleware(base: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "wsgi_async", "call", base + "/long?seconds=4",
         "--cancel-on-interrupt"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=app_env())
    try:
        assert process.stderr is not None
        seen = b""
        deadline = time.monotonic() + 15
        while not (found := re.search(rb"waiting for (http://\S+/_async/tasks/[\w-]+)", seen)):
            assert time.monotonic() < deadline and process.poll() is None, seen
            seen += os.read(process.stderr.fileno(), 1000)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    task_url = found.group(1).decode()
    assert process.returncode == EXIT_INTERRUPTED and stdout == b""
    assert f"cancelled {task_url} (204 No Content)".encode() in seen + stderr
    gone = client.call(task_url, "GET")
    assert gone.status == 410 and gone.json()["status"] == "cancelled"
