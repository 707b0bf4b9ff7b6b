"""A real gunicorn serving a test app on a free loopback port, and plain HTTP calls to it."""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from conftest import free_port


def _no_control_socket() -> list[str]:
    """gunicorn 23+ opens a shared control socket in the home folder unless told not to."""
    help_text = subprocess.run([sys.executable, "-m", "gunicorn", "--help"],
                               capture_output=True, text=True, timeout=30).stdout
    return ["--no-control-socket"] if "--no-control-socket" in help_text else []


NO_CONTROL_SOCKET = _no_control_socket()


def http_call(
    port: int, method: str, path: str, body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own: status, headers and body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body or None, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


class Gunicorn:
    """``python -m gunicorn ARGS APP`` on a free port, started once ``GET /pid`` answers."""

    def __init__(
        self, app: str, args: Sequence[str], env: Mapping[str, str], log: Path
    ) -> None:
        self.port = free_port()
        self.log = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{self.port}",
             *NO_CONTROL_SOCKET, *args, app],
            env=dict(env), stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise AssertionError(f"gunicorn exited: {log.read_text()}")
            try:
                self.request("GET", "/pid")
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("gunicorn did not start in 20 s") from None
                time.sleep(0.1)

    def request(self, method: str, path: str, body: bytes = b"",
                headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        return http_call(self.port, method, path, body, headers)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; by the pid this object started."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
