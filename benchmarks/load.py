"""The load generator: keep-alive HTTP/1.1 clients on one asyncio loop.

Each client holds one connection and runs its share of a bounded number of
jobs; the whole load is bounded by a time budget too.  Written for these
benchmarks so that the client costs little next to the servers it drives
(tens of microseconds per request), and so that submit latency, end-to-end
latency and polls per task are all measured the same way for every contender.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .procs import HOST, BenchError


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    received: float  # time.time() when the last byte arrived


class Connection:
    """One persistent HTTP/1.1 connection; reconnects when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> Response:
        if path.startswith(("http://", "https://")):  # an absolute Location: its path
            parts = urlsplit(path)
            path = f"{parts.path}?{parts.query}" if parts.query else parts.path
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        for attempt in (1, 2):
            fresh = self._writer is None
            if fresh:
                self._reader, self._writer = await asyncio.open_connection(HOST, self.port)
            assert self._reader is not None and self._writer is not None
            try:
                self._writer.write(data)
                return await self._read(self._reader, method)
            except (ConnectionError, asyncio.IncompleteReadError):
                # Only a kept-alive connection the server closed meanwhile is retried.
                await self.close()
                if fresh or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _read(self, reader: asyncio.StreamReader, method: str) -> Response:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        else:
            body = await reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Response(status, headers, body, time.time())

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    for _ in range(1_000_000):
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    raise BenchError("chunked body with too many chunks")


@dataclass
class Samples:
    """What a load run measured: one latency per completed job, in seconds."""

    done: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed else 0.0

    def add(self, name: str, value: float) -> None:
        self.extra.setdefault(name, []).append(value)

    def merge(self, other: Samples) -> None:
        self.done += other.done
        self.errors += other.errors
        self.elapsed += other.elapsed
        self.latencies += other.latencies
        for name, values in other.extra.items():
            self.extra.setdefault(name, []).extend(values)
        self.first_error = self.first_error or other.first_error


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


Job = Callable[[Connection, int, Samples], Awaitable[None]]


def run_load(port: int, clients: int, jobs: int, budget: float, job: Job) -> Samples:
    """Run ``job(conn, i, samples)`` for i < ``jobs`` from ``clients`` connections.

    Bounded twice: no job starts after ``budget`` seconds, and the whole run is
    cancelled ``budget + 30`` seconds after it began.  A job records its own
    latency with ``samples.latencies``; a job that raises counts as an error.
    """
    return asyncio.run(_run_load(port, clients, jobs, budget, job))


async def _run_load(port: int, clients: int, jobs: int, budget: float, job: Job) -> Samples:
    samples = Samples()
    counter = iter(range(jobs))
    start = time.perf_counter()
    deadline = start + budget

    async def client() -> None:
        conn = Connection(port)
        try:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                try:
                    await job(conn, i, samples)
                    samples.done += 1
                except (OSError, BenchError, ValueError, asyncio.IncompleteReadError) as exc:
                    samples.errors += 1
                    samples.first_error = samples.first_error or f"{type(exc).__name__}: {exc}"
                    await conn.close()
        finally:
            await conn.close()

    try:
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), budget + 30)
    except asyncio.TimeoutError:
        samples.first_error = samples.first_error or "the load ran past its time budget"
        samples.errors += 1
    samples.elapsed = time.perf_counter() - start
    return samples


async def burst(port: int, requests: Sequence[tuple[str, str, Sequence[tuple[str, str]]]],
                timeout: float) -> list[tuple[float, Response | None]]:
    """Send every request at once, each on its own new connection.

    Returns ``(latency, response)`` per request, ``None`` for a failed one.
    """
    async def one(method: str, path: str, headers: Sequence[tuple[str, str]]) -> tuple[
            float, Response | None]:
        conn = Connection(port)
        began = time.perf_counter()
        try:
            response = await conn.request(method, path, headers)
        except (OSError, asyncio.IncompleteReadError):
            return time.perf_counter() - began, None
        finally:
            await conn.close()
        return time.perf_counter() - began, response

    return await asyncio.wait_for(
        asyncio.gather(*(one(m, p, h) for m, p, h in requests)), timeout
    )
