"""The ``wsgi-async`` command: serve any WSGI app with the middleware, or a demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from werkzeug.serving import run_simple
from werkzeug.utils import ImportStringError, import_string

from .demo import demo_app
from .middleware import AsyncMiddleware

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
         | xargs -I{{}} curl -s -H 'Prefer: wait=10' '{base}{{}}'
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsgi-async",
        description="Run slow routes of a WSGI application as 202 Accepted background tasks.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve MODULE:APP wrapped by the middleware")
    serve.add_argument("app", metavar="MODULE:APP", help="the WSGI application to wrap")
    serve.add_argument("--route", action="append", required=True, metavar="REGEX",
                       help="a PATH_INFO regex to run asynchronously (repeatable)")
    demo = commands.add_parser("demo", help="serve a demo app and print the curl commands")
    for command in (serve, demo):
        command.add_argument("--host", default="127.0.0.1")
        command.add_argument("--port", type=int, default=8000)
        command.add_argument("--workers", type=int, default=8,
                             help="worker threads for tasks (max_workers)")
        command.add_argument("--registry", default="memory://",
                             help="memory://, sqlite:///path.db or redis://host:port/db")
        command.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    app: Any
    if args.command == "serve":
        try:
            app = import_string(args.app.replace(":", ".", 1) if ":" in args.app else args.app)
        except ImportStringError as exc:
            print(f"wsgi-async: cannot import {args.app!r}: {exc.exception}", file=sys.stderr)
            return 2
        routes = args.route
    else:
        app, routes = demo_app, {r"^/reports$": ["POST"]}
    try:
        middleware = AsyncMiddleware(app, routes=routes, registry=args.registry,
                                     max_workers=args.workers)
    except (TypeError, ValueError, ImportError) as exc:
        print(f"wsgi-async: {exc}", file=sys.stderr)
        return 2
    if args.command == "demo":
        print(DEMO_STEPS.format(base=f"http://{args.host}:{args.port}"), flush=True)
    try:
        run_simple(args.host, args.port, middleware, threaded=True)
    finally:
        middleware.shutdown(wait=False)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
