"""The middleware end to end on every registry backend, under concurrent load."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

from wsgi_helpers import Environ, client, read_body, wait_result

from wsgi_async.registry import Registry


def test_many_submits_and_polls_at_once_each_task_runs_exactly_once(registry: Registry) -> None:
    runs: Counter[str] = Counter()
    lock = threading.Lock()

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        with lock:
            runs[environ["wsgi_async.task"].id] += 1
        body = read_body(environ)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [b"ok:", body]

    middleware, test_app = client(app, registry=registry, max_workers=4)
    results: dict[str, bytes] = {}
    failures: list[str] = []

    def submit_and_poll(worker: int) -> None:
        for index in range(25):
            payload = f"{worker}:{index}".encode()
            submitted = test_app.post("/async", payload, status="*")
            if submitted.status_int != 202:
                failures.append(submitted.status)
                continue
            location = submitted.headers["Location"]
            test_app.get(location, status="*")  # a poll while it may still run
            done = wait_result(test_app, location, status="*")
            with lock:
                results[location] = done.body if done.status_int == 200 else b"!" + done.body

    threads = [threading.Thread(target=submit_and_poll, args=(n,)) for n in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        middleware.shutdown(wait=True, timeout=10)
    assert not failures
    assert len(results) == 200
    assert all(body.startswith(b"ok:") for body in results.values()), results
    assert sorted(set(runs.values())) == [1]
    assert len(runs) == 200
