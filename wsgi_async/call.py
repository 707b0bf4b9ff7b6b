"""``wsgi-async call``: submit a request, follow its task with a progress bar, print the result.

The final body goes to stdout byte for byte; the progress bar (tqdm) and every
message go to stderr.  Exit status: :data:`EXIT_OK` for a final 2xx or 3xx,
:data:`EXIT_FAILED` for a final 4xx or 5xx (a failed task), :data:`EXIT_USAGE` for
bad arguments, :data:`EXIT_ERROR` when the server cannot be reached or followed,
:data:`EXIT_TIMEOUT` for ``--timeout`` (or ``--max-polls``), :data:`EXIT_INTERRUPTED`
after Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

from . import client

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
FULL_BAR = "{l_bar}{bar}{r_bar}"  # tqdm's own layout, once a total is known


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``call`` subcommand's arguments."""
    parser.add_argument("url", metavar="URL", help="the endpoint to call (http or https)")
    parser.add_argument("-X", "--request", dest="method", default="POST", metavar="METHOD",
                        help="the HTTP method (default POST)")
    parser.add_argument("-d", "--data", metavar="DATA",
                        help="the request body; @FILE reads a file, @- reads stdin")
    parser.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="a request header, also sent on polls (repeatable)")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="give up after S seconds in total (exit 4); the task goes on")
    parser.add_argument("--cancel-on-timeout", action="store_true",
                        help="on timeout, cancel the task (DELETE its URL)")
    parser.add_argument("--cancel-on-interrupt", action="store_true",
                        help="on Ctrl-C, cancel the task without asking")
    parser.add_argument("--max-size", type=int, default=100 * 1024 * 1024, metavar="BYTES",
                        help="the largest response body accepted (default 100 MiB)")
    parser.add_argument("--max-polls", type=int, default=100_000, metavar="N",
                        help="give up after N polls answered 202 (exit 4)")
    parser.add_argument("--poll-wait", type=int, metavar="S",
                        help="seconds each long-poll asks to be held (Prefer: wait); default "
                             "1 with the progress bar (it refreshes at each poll), else 10")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(
    args: argparse.Namespace,
    stdin: IO[str] | None = None,
    stdout: IO[bytes] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run ``wsgi-async call`` with parsed ``args``; returns the exit status."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout.buffer if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    try:
        headers = [_header(item) for item in args.header]
        data = _data(args.data, stdin)
    except (OSError, ValueError) as exc:
        print(f"wsgi-async: {exc}", file=stderr)
        return EXIT_USAGE
    bar = _Progress(stderr, enabled=not args.no_progress)
    task: list[str] = []

    def accepted(task_url: str) -> None:
        task.append(task_url)
        bar.start(task_url)

    try:
        try:
            response = client.call(
                args.url, args.method, data, headers, args.timeout,
                None if args.no_progress else bar.update,
                cancel_on_timeout=args.cancel_on_timeout, on_task=accepted,
                poll_wait=args.poll_wait, max_polls=args.max_polls,
                max_response_size=args.max_size)
        finally:
            bar.close()
    except KeyboardInterrupt:
        return _interrupted(args, task[-1] if task else None, headers, stdin, stderr)
    except client.GaveUp as exc:
        print(f"wsgi-async: {exc}", file=stderr)
        if exc.task_url is not None:
            state = "cancelled" if exc.cancelled else "not cancelled"
            print(f"wsgi-async: the task was {state}; follow it again with: "
                  f"wsgi-async call -X GET '{exc.task_url}'", file=stderr)
        return EXIT_TIMEOUT
    except ValueError as exc:  # a bad URL (client.InvalidURL) or option value
        print(f"wsgi-async: {exc}", file=stderr)
        return EXIT_USAGE
    except client.ClientError as exc:
        print(f"wsgi-async: {exc}", file=stderr)
        return EXIT_ERROR
    stdout.write(response.body)
    stdout.flush()
    if response.ok:
        return EXIT_OK
    print(f"wsgi-async: {response.status} {response.reason} from {response.url}", file=stderr)
    return EXIT_FAILED


def _header(item: str) -> tuple[str, str]:
    name, colon, value = item.partition(":")
    if not colon or not name.strip():
        raise ValueError(f"a header is 'Name: value', not {item!r}")
    return name.strip(), value.strip()


def _data(value: str | None, stdin: IO[str]) -> bytes | None:
    if value is None:
        return None
    if value == "@-":
        return stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode()
    if value.startswith("@"):
        with open(value[1:], "rb") as file:
            return file.read()
    return value.encode("utf-8")


def _interrupted(
    args: argparse.Namespace,
    task_url: str | None,
    headers: list[tuple[str, str]],
    stdin: IO[str],
    stderr: IO[str],
) -> int:
    """Ctrl-C: cancel the task if asked to (``--cancel-on-interrupt``, or yes at the prompt)."""
    if task_url is None:
        print("\nwsgi-async: interrupted before any task was accepted", file=stderr)
        return EXIT_INTERRUPTED
    cancel = args.cancel_on_interrupt
    if not cancel and stdin.isatty():
        print(f"\nCancel task {task_url}? [y/N] ", end="", file=stderr, flush=True)
        try:
            cancel = stdin.readline().strip().lower() in ("y", "yes")
        except (KeyboardInterrupt, EOFError):
            cancel = False
    if not cancel:
        print(f"\nwsgi-async: interrupted; the task goes on: {task_url}", file=stderr)
        return EXIT_INTERRUPTED
    try:
        answer = client.cancel(task_url, [(k, v) for k, v in headers
                                          if k.lower() not in client.BODY_HEADERS])
    except (client.ClientError, KeyboardInterrupt) as exc:
        print(f"wsgi-async: could not cancel {task_url}: {exc}", file=stderr)
        return EXIT_INTERRUPTED
    outcome = "cancelled" if answer.ok else "the server did not cancel"
    print(f"wsgi-async: {outcome} {task_url} ({answer.status} {answer.reason})", file=stderr)
    return EXIT_INTERRUPTED


class _Progress:
    """A tqdm bar on stderr, fed with progress documents; tqdm is imported when first needed."""

    def __init__(self, stream: IO[str], enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.bar: Any = None

    def start(self, task_url: str) -> None:
        """A task was accepted: say so at once; the bar fills when progress comes."""
        if self.enabled and self.bar is None:
            self._open(None).set_description_str(f"waiting for {task_url}")

    def update(self, document: Any) -> None:
        if not self.enabled:
            return
        current, total, label = _reading(document)
        if self.bar is None:
            self._open(total)
        if total is not None and total > 0:
            if self.bar.total is None:
                self.bar.bar_format = FULL_BAR
            self.bar.total = total
        if current is not None:
            self.bar.n = current
        if label:
            self.bar.set_description_str(label[:80], refresh=False)
        self.bar.refresh()

    def _open(self, total: float | None) -> Any:
        from tqdm import tqdm  # the base install's dependency, loaded only when needed

        self.bar = tqdm(file=self.stream, total=total, unit="step", dynamic_ncols=True,
                        mininterval=0, bar_format=FULL_BAR if total else "{desc}")
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _reading(document: Any) -> tuple[int | float | None, int | float | None, str]:
    """(current, total, label) from a progress document, as far as it has them."""
    if not isinstance(document, dict):
        return None, None, str(document)
    current, total = _number(document.get("current")), _number(document.get("total"))
    if current is None and _number(document.get("percent")) is not None:
        current, total = _number(document.get("percent")), 100
    message = document.get("message") or ""
    return current, total, str(message)


def _number(value: object) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    if value < 0:
        return None
    return int(value) if float(value).is_integer() else float(value)
