"""The middleware end to end on every registry backend, under concurrent load."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from wsgi_async.registry import Registry
from wsgi_helpers import Environ, client, read_body, wait_result


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
            early = test_app.get(location, status="*")  # a poll while it may still run
            if early.status_int == 202:
                if early.json["status"] not in ("queued", "running") or \
                        early.headers["Location"] != location:
                    failures.append(f"early poll: {early.headers} {early.json}")
            elif (early.status_int, early.body) != (200, b"ok:" + payload):
                failures.append(f"early poll: {early.status} {early.body!r}")
            done = wait_result(test_app, location, status="*")
            with lock:
                results[location] = (
                    done.body if done.status_int == 200 else f"!{done.status} ".encode() + done.body
                )

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
    unfinished = {k: v for k, v in results.items() if not v.startswith(b"ok:")}
    assert not unfinished
    assert sorted(set(runs.values())) == [1]
    assert len(runs) == 200


def test_tasks_left_running_at_shutdown_are_settled_by_another_process(
    registry: Registry,
) -> None:
    from wsgi_helpers import Gate

    gate = Gate()
    first, first_app = client(gate, registry=registry, lease_time=0.5)
    second, second_app = client(gate, registry=registry, lease_time=0.5)
    try:
        location = first_app.post("/async", b"").headers["Location"]
        deadline = time.monotonic() + 5
        while gate.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        first.shutdown(wait=False)  # the task is still running: the lease must lapse
        res = second_app.get(location, headers={"Prefer": "wait=5"}, status="*")
        while res.status_int == 202 and time.monotonic() < deadline + 10:
            res = second_app.get(location, headers={"Prefer": "wait=5"}, status="*")
        assert res.status_int == 500
        assert res.json["reason"] == "worker_lost"
    finally:
        gate.opened.set()
        second.shutdown(wait=True, timeout=5)
    time.sleep(0.1)
    assert second_app.get(location, status=500).json["reason"] == "worker_lost"
