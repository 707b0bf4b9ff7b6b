"""``Async-Task`` on every status-path answer: which task, in which state.

It is what tells an application's own ``404`` (replayed) from the middleware's
"no such task" ``404``.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from wsgi_helpers import client, wait_result

HEADER = "Async-Task"


def app_404(environ: Any, start_response: Any) -> list[bytes]:
    if environ["PATH_INFO"] == "/async/slow":
        environ["wsgi_async.task"].progress(1, 2)
        GATE.wait(10)
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"the app has no such report"]


GATE = threading.Event()


@pytest.fixture
def app() -> Any:
    GATE.clear()
    middleware, test_app = client(app_404)
    yield test_app
    GATE.set()
    middleware.shutdown(wait=True, timeout=5)


def task_id(location: str) -> str:
    return location.rsplit("/", 1)[1]


def test_a_replayed_app_404_is_told_from_the_middlewares_own(app: Any) -> None:
    submitted = app.post("/async/report", b"", status=202)
    tid = task_id(submitted.headers["Location"])
    assert submitted.headers[HEADER] in (f'queued;id="{tid}"', f'running;id="{tid}"')
    replayed = wait_result(app, submitted.headers["Location"], status=404)
    assert replayed.body == b"the app has no such report"
    assert replayed.headers[HEADER] == f'done;id="{tid}"'
    head = app.head(submitted.headers["Location"], status=404)
    assert head.headers[HEADER] == f'done;id="{tid}"'
    unknown = app.get("/_async/tasks/" + "u" * 32, status=404)
    assert unknown.headers[HEADER] == "unknown"
    assert app.get("/_async/tasks/bad!", status=404).headers[HEADER] == "unknown"
    assert app.get("/_async/tasks", status=404).headers[HEADER] == "unknown"


def test_pending_cancelled_deleted_and_refused_methods_say_their_state(app: Any) -> None:
    running = app.post("/async/slow", b"", status=202).headers["Location"]
    tid = task_id(running)
    for accept in ("application/json", "text/html"):
        pending = app.get(running, headers={"Accept": accept}, status=202)
        assert pending.headers[HEADER] in (f'queued;id="{tid}"', f'running;id="{tid}"')
    assert app.delete(running, status=204).headers[HEADER] == f'cancelled;id="{tid}"'
    assert app.get(running, status=410).headers[HEADER] == f'cancelled;id="{tid}"'
    GATE.set()
    finished = app.post("/async/report", b"", status=202).headers["Location"]
    wait_result(app, finished, status=404)
    done = task_id(finished)
    assert app.delete(finished, status=204).headers[HEADER] == f'deleted;id="{done}"'
    assert app.get(finished, status=410).headers[HEADER] == f'deleted;id="{done}"'
    assert app.post(finished, b"", status=405).headers[HEADER] == "unknown"


def test_a_result_on_the_submit_itself_names_its_task(app: Any) -> None:
    answer = app.post("/async/report", b"", headers={"Prefer": "respond-async, wait=5"},
                      status=404)
    assert answer.body == b"the app has no such report"
    assert answer.headers[HEADER].startswith('done;id="')
