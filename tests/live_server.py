"""``wsgi-async serve tests/apps/clientapp.py`` on a free loopback port, for the client and
status page tests; stopped by its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import free_port

APPS = Path(__file__).parent / "apps"


def app_env() -> dict[str, str]:
    """The environment in which ``clientapp`` (in tests/apps) is importable."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(APPS), *filter(None, [os.environ.get("PYTHONPATH")])]))


@contextmanager
def serve_clientapp() -> Iterator[str]:
    """Serve clientapp with ``/long``, ``/fail`` and ``/progress`` as tasks; yields the base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "wsgi_async", "serve", "clientapp:app", "--route", "^/long$",
         "--route", "^/fail$", "--route", "^/progress$", "--port", str(port),
         "--log-level", "WARNING"],
        env=app_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}"
            try:
                urllib.request.urlopen(url + "/ready", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start in 15 s"
                time.sleep(0.1)
        yield url
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
