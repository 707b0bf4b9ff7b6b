"""The status endpoint: ``GET``, ``HEAD`` and ``DELETE`` on a task's URL.

A pending task answers 202 with its state; a final one answers with the
stored response.  ``Prefer: wait=N`` holds the request until the task ends
(woken by the registry, never by polling) or the wait runs out.
"""

from __future__ import annotations

import functools
import hmac
import logging
import re
import threading
from collections.abc import Iterable
from urllib.parse import quote

from .config import Options
from .errors import RegistryError
from .logfields import task_fields
from .model import TaskRecord, Tombstone, cancelled_response
from .observer import Observer
from .prefer import parse_prefer
from .registry import Registry
from .responses import replay, send_empty, send_error, send_json, task_state
from .status_page import HEADERS as PAGE_HEADERS
from .status_page import prefers_html, render
from .types import StartResponse, WSGIEnvironment

log = logging.getLogger("wsgi_async")

TASK_ID = re.compile(r"[A-Za-z0-9_-]{22,64}")
ALLOWED = "GET, HEAD, DELETE"
# Why a task is gone, said in its 410.
GONE = {
    "expired": "The task expired: its result is no longer kept.",
    "cancelled": "The task was cancelled.",
    "deleted": "The task was deleted.",
    "": "The task is no longer kept.",
}
UNKNOWN = task_state("unknown")  # an id this middleware does not hold, or none at all
VARY = ("Vary", "Accept")  # a pending task answers JSON or, to a browser, a page


class StatusEndpoint:
    """Serve ``<status_path>/<task id>`` from the registry."""

    def __init__(self, registry: Registry, options: Options) -> None:
        self.registry = registry
        self.options = options
        self._waiters = threading.BoundedSemaphore(options.max_waiters)
        self._retry_after = ("Retry-After", str(options.retry_after))
        self._id_start = len(options.status_path) + 1
        # Results of owner-bound tasks are marked private unless the app said otherwise.
        self.private = options.owner is not None
        # Set when the server runs several processes on a private registry: the
        # likeliest reason an id is unknown, said in the 404 itself.
        self.not_found_hint: str | None = None
        self.observer = Observer()

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse, owner: str | None
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD", "DELETE"):
            return send_error(environ, start_response, 405,
                              f"{method} is not allowed on a task",
                              [("Allow", ALLOWED), UNKNOWN])
        task_id = environ.get("PATH_INFO", "")[self._id_start :]
        if not TASK_ID.fullmatch(task_id):
            return self._not_found(environ, start_response)
        try:
            wait = None if method == "DELETE" else parse_prefer(environ).wait
            # A long-poll reads, checks the owner and waits in one go (one read fewer),
            # within max_waiters; past it, or without a wait, it is a plain read.
            if wait and self._waiters.acquire(blocking=False):
                self.observer.long_polls(1)
                try:
                    record = self.registry.wait_if(
                        task_id, min(wait, self.options.max_wait), lambda found: owns(found, owner)
                    )
                finally:
                    self.observer.long_polls(-1)
                    self._waiters.release()
            else:
                record = self.registry.get(task_id)
                if record is not None and not owns(record, owner):
                    record = None
            if record is None:
                return self._gone(environ, start_response, task_id, owner)
            if method == "DELETE":
                return self._delete(start_response, record)
        except RegistryError as exc:
            log.warning("wsgi_async: status of %s unavailable: %s", task_id, exc)
            return send_error(environ, start_response, 503, "The task registry is unavailable.",
                              [self._retry_after, task_state("unavailable", task_id)])
        if record.status.is_final and record.response is not None:
            return replay(environ, start_response, record.response, self.private,
                          [task_state(record.status.value, record.id)])
        return self.pending(environ, start_response, record)

    def pending(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        record: TaskRecord,
        headers: Iterable[tuple[str, str]] = (),
    ) -> list[bytes]:
        """The 202 document of a task that has not finished (a page when HTML is preferred)."""
        location = task_url(environ, self.options.status_path, record.id,
                            self.options.absolute_location)
        document = record.summary()
        document["location"] = location
        extra = [("Location", location), self._retry_after,
                 task_state(record.status.value, record.id)]
        if headers:
            extra.extend(headers)
        if prefers_html(environ):
            page = render(document, poll_url=location)
            start_response("202 Accepted", [*PAGE_HEADERS, ("Content-Length", str(len(page))),
                                            *extra])
            return [] if environ.get("REQUEST_METHOD") == "HEAD" else [page]
        extra.append(VARY)
        return send_json(environ, start_response, 202, document, extra)

    def wait_for(self, record: TaskRecord, timeout: float) -> TaskRecord | None:
        """Hold until ``record`` ends or ``timeout`` passes, within ``max_waiters``."""
        # Waiting holds a server thread: past max_waiters, answer at once.
        if not self._waiters.acquire(blocking=False):
            return record
        self.observer.long_polls(1)
        try:
            return self.registry.wait(record.id, timeout)
        finally:
            self.observer.long_polls(-1)
            self._waiters.release()

    def _delete(self, start_response: StartResponse, record: TaskRecord) -> list[bytes]:
        """Cancel a pending task; forget a finished one (both leave a tombstone)."""
        # A cancel that loses the race with the task's end finds it final: the
        # result stands, and is forgotten like any other.
        if not record.status.is_final and self.registry.cancel(
            record.id, cancelled_response(record.id)
        ):
            log.info("wsgi_async: task %s cancelled", record.id,
                     extra=task_fields(record.id, record.route, outcome="cancelled"))
            self.observer.cancelled()
            return send_empty(start_response, 204, [task_state("cancelled", record.id)])
        self.registry.delete(record.id)
        return send_empty(start_response, 204, [task_state("deleted", record.id)])

    def _gone(
        self, environ: WSGIEnvironment, start_response: StartResponse, task_id: str,
        owner: str | None,
    ) -> list[bytes]:
        """``410 Gone`` for a task its caller had, that is no longer held; else ``404``."""
        tombstone = self.registry.gone(task_id)
        if tombstone is None or not owns(tombstone, owner):
            return self._not_found(environ, start_response)
        return send_error(environ, start_response, 410, GONE.get(tombstone.status, GONE[""]),
                          [task_state(tombstone.status or "gone", task_id)],
                          id=task_id, status=tombstone.status)

    def _not_found(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        detail = "No such task: the id is unknown, malformed or expired."
        if self.not_found_hint is not None:
            detail = f"{detail} Likely cause: {self.not_found_hint}"
        return send_error(environ, start_response, 404, detail, [UNKNOWN])


def owns(record: TaskRecord | Tombstone, owner: str | None) -> bool:
    """Whether the caller may see ``record``; compared in constant time."""
    if record.owner is None:
        return True
    return owner is not None and hmac.compare_digest(record.owner, owner)


def task_url(
    environ: WSGIEnvironment, status_path: str, task_id: str, absolute: bool = False
) -> str:
    """The task's URL under the application's mount point: a path, or with ``absolute``
    the full URL, on the request's own scheme and host."""
    script_name = environ.get("SCRIPT_NAME", "")
    if script_name:
        script_name = _quoted_mount(script_name)
    path = f"{script_name}{status_path}/{task_id}"
    if absolute:
        return origin(environ) + path
    return path


def origin(environ: WSGIEnvironment) -> str:
    """``scheme://host[:port]`` of the request, as werkzeug builds the current URL.

    ``wsgi.url_scheme``, then the ``Host`` header, else ``SERVER_NAME`` and
    ``SERVER_PORT`` (the default port left out): so that behind ``ProxyFix``
    it is the client's URL.  A host that is not a plain host name or IP
    literal (a ``Host`` header carrying ``@`` or ``/``, say) is never used:
    ``""`` when there is no usable one, and the URL stays a path.
    """
    return _origin(
        environ.get("wsgi.url_scheme", "http"), environ.get("HTTP_HOST"),
        environ.get("SERVER_NAME", ""), environ.get("SERVER_PORT", ""),
    )


_HOST = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


@functools.lru_cache(maxsize=64)
def _origin(scheme: str, host: str | None, server_name: str, server_port: str) -> str:
    if scheme not in _DEFAULT_PORTS:
        scheme = scheme.lower() if scheme.lower() in _DEFAULT_PORTS else "http"
    if host is None or not _HOST.fullmatch(host):
        if ":" in server_name and not server_name.startswith("["):
            server_name = f"[{server_name}]"  # an IPv6 SERVER_NAME
        host = f"{server_name}:{server_port}" if server_port else server_name
        if not _HOST.fullmatch(host):
            return ""
    host = host.removesuffix(_DEFAULT_PORTS[scheme])
    return f"{scheme}://{host}"


@functools.lru_cache(maxsize=64)
def _quoted_mount(script_name: str) -> str:
    """``SCRIPT_NAME`` quoted for a URL; an application has few mount points.

    Leading slashes collapse into one: ``//evil.example`` (from a proxy's
    ``X-Forwarded-Prefix``, say) would make the URL point to another host.
    """
    mount = quote(script_name.strip("/"), safe="/:@!$&'()*+,;=~")
    return f"/{mount}" if mount else ""
