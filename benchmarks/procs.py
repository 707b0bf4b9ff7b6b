"""Processes the benchmark starts, and what /proc says about them.

Every server and worker runs in its own session and is stopped by its pid
(TERM, then KILL to its whole process group), whatever happens to the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A contender misbehaved: it did not start, or answered wrongly."""


class Skipped(Exception):
    """A contender cannot run here (not installed, no Redis); the reason is reported."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Processes:
    """Every subprocess of the run, so that :meth:`stop_all` can end each by pid."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("ab")
        try:
            # A session of its own: its group id is its pid, so stop() reaches what it forks.
            proc = subprocess.Popen(
                list(args), env={**os.environ, **env}, cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log.close()
        self._procs.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_pids(self, pids: Sequence[int]) -> None:
        """Stop the processes this run started among ``pids``."""
        for proc in [p for p in self._procs if p.pid in pids]:
            self.stop(proc)

    def stop_all(self) -> None:
        for proc in list(self._procs):
            self.stop(proc, grace=2.0)


def children_of(pid: int) -> list[int]:
    """The live child pids of ``pid``."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        return [int(p) for p in path.read_text().split()]
    return []


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 10_000:
        current = todo.pop()
        found.append(current)
        todo.extend(children_of(current))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of processes, with that of the children they reaped."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks / CLK_TCK


@dataclass(frozen=True, slots=True)
class Status:
    threads: int
    rss_kib: int


def status(pid: int) -> Status:
    """Threads and resident KiB of one process, from ``/proc/<pid>/status``."""
    threads = rss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return Status(threads, rss)

