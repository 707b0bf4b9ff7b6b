"""Serve ``serverapp.application`` with :mod:`wsgiref.simple_server`.

Usage: ``python wsgiref_runner.py PORT``.
"""

from __future__ import annotations

import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIServer, make_server

from serverapp import application


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 64


def main() -> None:
    port = int(sys.argv[1])
    with make_server("127.0.0.1", port, application, server_class=ThreadingWSGIServer) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
