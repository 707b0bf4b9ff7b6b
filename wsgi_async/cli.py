"""The ``wsgi-async`` command: serve any WSGI app with the middleware, a demo, or call a URL.

Each subcommand is one ``add_*`` function in :data:`SUBCOMMANDS` that builds its
parser and sets a handler; :func:`main` parses the command line and calls it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from werkzeug.utils import ImportStringError, import_string

from . import __version__
from . import call as call_command
from .demo import demo_app
from .middleware import AsyncMiddleware

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

DEMO_STEPS = """\
wsgi_async demo on {base}

  1. Submit a slow request (answers 202 Accepted at once, with a Location):
       curl -i -X POST -d 'hello' '{base}/reports?seconds=3'

  2. Poll the Location it gave (202 while the task runs):
       curl -i {base}/_async/tasks/<id>

  3. Or wait for the result in one call (RFC 7240 Prefer: wait):
       curl -i -H 'Prefer: wait=10' {base}/_async/tasks/<id>

  The finished task answers with the app's own response: 201 Created and its JSON.
  All in one go:
       curl -s -D - -o /dev/null -X POST -d hello '{base}/reports?seconds=2' \\
         | awk 'tolower($1)=="location:" {{print $2}}' | tr -d '\\r' \\
         | xargs -I{{}} curl -s -H 'Prefer: wait=10' '{{}}'
"""

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A problem the user can fix, printed as one line; the command exits with 2."""


# -- helpers shared by the subcommands ---------------------------------------------------


def load_app(spec: str) -> Any:
    """Import the WSGI application named ``MODULE:APP`` (or ``MODULE.APP``).

    The current folder goes first on ``sys.path``, as gunicorn and waitress-serve
    do, so ``wsgi-async serve plain:app`` works from the app's own folder.
    """
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        app = import_string(spec.replace(":", ".", 1) if ":" in spec else spec)
    except ImportStringError as exc:
        raise CommandError(f"cannot import {spec!r}: {exc.exception}") from exc
    if not callable(app):
        raise CommandError(f"{spec!r} is not a WSGI application (not callable)")
    return app


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="the logging threshold (default INFO)")


class _Formatter(logging.Formatter):
    """``time LEVEL name: message``, the name left out when the message starts with it."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        top = record.name.partition(".")[0]
        named = record.message.startswith(f"{top}:") or record.message.startswith(
            f"{record.name}:")
        origin = "" if named else f"{record.name}: "
        return f"{self.formatTime(record)} {record.levelname} {origin}{record.message}"


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Where and how to serve: the options of every command that runs an HTTP server."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--http-threads", type=int, default=16, metavar="N",
                        help="threads serving HTTP requests (waitress's threads); each "
                             "Prefer: wait long-poll holds one (default 16)")
    parser.add_argument("--task-threads", type=int, default=8, metavar="N",
                        help="threads running background tasks, per process (max_workers, "
                             "default 8)")
    parser.add_argument("--workers", type=int, dest="deprecated_workers", default=None,
                        help=argparse.SUPPRESS)  # the old name of --task-threads
    parser.add_argument("--registry", default="memory://",
                        help="memory://, sqlite:///path.db or redis://host:port/db")
    parser.add_argument("--dev", action="store_true",
                        help="werkzeug's development server, reloading on code changes, "
                             "instead of waitress")
    add_log_level(parser)


def task_threads(args: argparse.Namespace) -> int:
    if args.deprecated_workers is not None:
        print("wsgi-async: --workers is deprecated (it counts task threads, not processes); "
              "use --task-threads", file=sys.stderr)
        return int(args.deprecated_workers)
    return int(args.task_threads)


def check_port_free(host: str, port: int) -> None:
    """Fail with a clear message when ``host:port`` cannot be bound (before printing anything)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                           "is another server running there? choose another --port") from exc


def run_server(args: argparse.Namespace, app: Any, routes: Any, banner: str | None) -> int:
    """Wrap ``app`` and serve it on waitress (or werkzeug's reloader with ``--dev``)."""
    from werkzeug.serving import is_running_from_reloader, run_simple

    reloaded = is_running_from_reloader()  # --dev's child: the parent holds the socket
    if not reloaded:
        check_port_free(args.host, args.port)
    if args.http_threads < 1:
        raise CommandError(f"--http-threads must be at least 1, not {args.http_threads}")
    try:
        middleware = AsyncMiddleware(app, routes=routes, registry=args.registry,
                                     max_workers=task_threads(args))
    except (TypeError, ValueError, ImportError) as exc:
        raise CommandError(str(exc)) from exc
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if args.dev:
            if banner and not reloaded:
                print(banner, flush=True)
            run_simple(args.host, args.port, middleware, threaded=True, use_reloader=True)
            return 0
        from waitress.server import create_server

        try:
            server = create_server(middleware, host=args.host, port=args.port,
                                   threads=args.http_threads)
        except OSError as exc:
            raise CommandError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
        if banner:
            print(banner, flush=True)
        server.print_listen("Serving on http://{}:{}")
        try:
            server.run()
        finally:
            server.close()
        return 0
    finally:
        middleware.drain()  # running tasks finish and are stored; queued ones get a 503


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


# -- subcommands -------------------------------------------------------------------------


def add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve", help="serve MODULE:APP wrapped by the middleware, on waitress",
        description="Serve MODULE:APP (imported from the current folder first) wrapped by "
                    "the middleware, on waitress; --dev uses werkzeug's reloading server.")
    serve.add_argument("app", metavar="MODULE:APP", help="the WSGI application to wrap")
    serve.add_argument("--route", action="append", required=True, metavar="REGEX",
                       help="a PATH_INFO regex to run asynchronously (repeatable)")
    add_server_options(serve)
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    return run_server(args, load_app(args.app), args.route, banner=None)


def add_demo(commands: Any) -> None:
    demo = commands.add_parser("demo", help="serve a demo app and print the curl commands")
    add_server_options(demo)
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    banner = DEMO_STEPS.format(base=f"http://{args.host}:{args.port}")
    return run_server(args, demo_app, {r"^/reports$": ["POST"]}, banner=banner)


def add_call(commands: Any) -> None:
    call = commands.add_parser("call", help="call URL and follow its 202 to the final response")
    call_command.add_arguments(call)
    call.set_defaults(handler=call_command.run)


def add_worker(commands: Any) -> None:
    worker = commands.add_parser(
        "worker", help="run the tasks of routes with executor='workers' (MODULE:APP)",
        description="Claim tasks from the registry's queue and run them. MODULE:APP is the "
                    "AsyncMiddleware object the web server serves (its app, registry, routes "
                    "and limits are used); with a plain WSGI app, --registry and --routes "
                    "are required. SIGTERM or SIGINT: stop claiming, finish running tasks "
                    "within --grace seconds, exit 0.")
    worker.add_argument("app", metavar="MODULE:APP", help="the AsyncMiddleware (or WSGI app)")
    worker.add_argument("--threads", type=int, default=8, metavar="N",
                        help="tasks run at once by this process (default 8)")
    worker.add_argument("--registry", default=None, metavar="URL",
                        help="sqlite:///path.db or redis://host:port/db (default: the app's)")
    worker.add_argument("--routes", nargs="+", default=None, metavar="REGEX",
                        help="claim only the tasks of these route patterns (default: every "
                             "route of the app with executor='workers')")
    worker.add_argument("--grace", type=float, default=30.0, metavar="S",
                        help="seconds to finish running tasks after SIGTERM (default 30)")
    add_log_level(worker)
    worker.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from .worker import build_worker

    app = load_app(args.app)
    try:
        worker = build_worker(app, threads=args.threads, registry=args.registry,
                              routes=args.routes, grace=args.grace)
    except (TypeError, ValueError, ImportError) as exc:
        raise CommandError(str(exc)) from exc
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: worker.stop())
    worker.run()
    return 0


SUBCOMMANDS: list[Callable[[Any], None]] = [add_serve, add_demo, add_call, add_worker]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsgi-async",
        description="Run slow routes of a WSGI application as 202 Accepted background tasks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "log_level"):
        configure_logging(args.log_level)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CommandError as exc:
        print(f"wsgi-async: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
