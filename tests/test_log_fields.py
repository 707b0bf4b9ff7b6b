"""Every log record about a task carries the same structured fields, for JSON formatters."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from wsgi_async.logfields import FIELDS
from wsgi_helpers import Gate, client, echo_app, wait_result


class JsonFormatter(logging.Formatter):
    """What a JSON log formatter does: the message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        document = {"message": record.getMessage()}
        document.update({name: getattr(record, name, "MISSING") for name in FIELDS})
        return json.dumps(document)


@pytest.fixture
def lines() -> Any:
    handler = logging.Handler()
    captured: list[dict[str, Any]] = []
    formatter = JsonFormatter()
    handler.emit = lambda record: captured.append(json.loads(formatter.format(record)))
    logger = logging.getLogger("wsgi_async")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield captured
    logger.removeHandler(handler)
    logger.setLevel(old)


def failing(environ: Any, start_response: Any) -> Any:
    raise RuntimeError("boom")


def test_accept_and_finish_records_carry_the_task_fields(lines: list[dict[str, Any]]) -> None:
    middleware, app = client(echo_app)
    try:
        task = app.post("/async/x", b"hi", status=202)
        wait_result(app, task.headers["Location"], status=201)
        middleware.shutdown(wait=True, timeout=5)
    finally:
        middleware.shutdown(wait=False)
    task_id = task.json["id"]
    about = [line for line in lines if line["task_id"] == task_id]
    accepted = next(line for line in about if line["outcome"] == "accepted")
    assert accepted["route"] == "^/async" and accepted["status"] is None
    done = next(line for line in about if line["outcome"] == "done")
    assert done["route"] == "^/async" and done["status"] == 201
    assert isinstance(done["duration"], float) and done["duration"] >= 0
    assert f"task {task_id}" in done["message"]  # the message stays readable
    for line in lines:
        assert "MISSING" not in line.values(), line


def test_a_failure_and_a_refusal_carry_their_outcome_and_status(
    lines: list[dict[str, Any]],
) -> None:
    middleware, app = client(failing, validate_inner=False, max_body_size=4)
    try:
        task = app.post("/async", b"", status=202)
        wait_result(app, task.headers["Location"], status=500)
        app.post("/async", b"too large", status=413)
        middleware.shutdown(wait=True, timeout=5)
    finally:
        middleware.shutdown(wait=False)
    raised = [line for line in lines if line["task_id"] == task.json["id"]
              and line["outcome"] == "failed"]
    assert raised and all(line["status"] == 500 for line in raised)
    refused = [line for line in lines if line["outcome"] == "refused"]
    assert refused and refused[0]["status"] == 413 and refused[0]["task_id"] is None
    assert refused[0]["route"] == "^/async"
    assert refused[0]["message"] == ("wsgi_async: refused POST /async: the request body "
                                     "(9 bytes) exceeds max_body_size (4)")


def test_a_busy_refusal_and_a_repeat_by_key_are_logged_with_their_fields(
    lines: list[dict[str, Any]],
) -> None:
    gate = Gate()
    middleware, app = client(gate, max_workers=1, max_queued=1)
    try:
        first = app.post("/async", b"", headers={"Idempotency-Key": "k"}, status=202)
        again = app.post("/async", b"", headers={"Idempotency-Key": "k"}, status=202)
        assert again.json["id"] == first.json["id"]
        app.post("/async/2", b"", status=202)
        app.post("/async/3", b"", status=503)
    finally:
        gate.opened.set()
        middleware.shutdown(wait=True, timeout=5)
    task_id = first.json["id"]
    repeated = [line for line in lines if line["outcome"] == "repeated"]
    assert repeated == [{"message": f"wsgi_async: task {task_id} repeated by its Idempotency-Key",
                         "task_id": task_id, "route": "^/async", "outcome": "repeated",
                         "status": None, "duration": None}]
    [refused] = [line for line in lines if line["outcome"] == "refused"]
    assert refused["message"] == (
        "wsgi_async: refused a task for ^/async: all 1 workers are busy and 1 tasks wait")
    assert (refused["task_id"], refused["route"], refused["status"]) == (None, "^/async", 503)


def test_a_cancel_is_logged_once_with_its_task_fields(lines: list[dict[str, Any]]) -> None:
    gate = Gate()
    middleware, app = client(gate)
    try:
        task = app.post("/async/x", b"", status=202)
        app.delete(task.headers["Location"], status=204)
        task_id = task.json["id"]
        cancelled = [line for line in lines if line["outcome"] == "cancelled"]
    finally:
        gate.opened.set()
        middleware.shutdown(wait=True, timeout=5)
    assert cancelled == [{"message": f"wsgi_async: task {task_id} cancelled",
                          "task_id": task_id, "route": "^/async", "outcome": "cancelled",
                          "status": None, "duration": None}]
