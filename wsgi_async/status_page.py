"""The HTML status page a browser gets for a pending task.

A browser following a task's ``Location`` would otherwise show raw JSON.  The
page is self-contained (no external assets), escapes every value, shows a state
line and a ``<progress>`` bar, and updates itself by long-polling the status URL
for JSON (``Prefer: wait=10``, or ``wait=1`` while the task reports progress, so
the bar moves); when the task ends it loads the status URL again, so the browser shows
the application's own response.  Its one inline script and style are allowed by
hash in :data:`CONTENT_SECURITY_POLICY`; without JavaScript it refreshes itself.
"""

from __future__ import annotations

import base64
import hashlib
import math
from html import escape

from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from .types import WSGIEnvironment

REFRESH_SECONDS = 5  # the reload interval of the page without JavaScript

_STYLE = """
body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2433}
main{max-width:36rem;margin:12vh auto;padding:2rem;background:#fff;border-radius:8px;
box-shadow:0 1px 4px rgba(0,0,0,.12)}
h1{font-size:1.3rem;margin:0 0 1rem}
#state{font-weight:600;margin:0 0 .5rem}
progress{width:100%;height:1.2rem}
#message{min-height:1.5em;margin:.5rem 0;color:#3b4355}
.note{font-size:.85rem;color:#5f6b7a}
code{font-size:.8rem;word-break:break-all}
"""

# Static (the poll URL is read from an attribute), so one hash allows it in the CSP.
_SCRIPT = """
(function () {
  "use strict";
  var root = document.getElementById("task");
  var url = root.getAttribute("data-poll");
  // A poll is held until the task ends, not until its progress changes: short waits
  // while the task reports progress, long ones while it does not.
  var wait = root.getAttribute("data-wait") === "1" ? 1 : 10;
  var state = document.getElementById("state");
  var bar = document.getElementById("bar");
  var message = document.getElementById("message");
  var failures = 0;
  function num(v) { return typeof v === "number" && isFinite(v) && v >= 0 ? v : null; }
  function show(doc) {
    var p = doc && typeof doc.progress === "object" ? doc.progress : null;
    var current = p ? num(p.current) : null, total = p ? num(p.total) : null;
    var percent = p ? num(p.percent) : null, parts = [];
    state.textContent = doc && doc.status === "queued" ? "Queued: waiting to start" : "Running";
    wait = p ? 1 : 10;
    if (current !== null && total) { bar.max = total; bar.value = Math.min(current, total); }
    else if (percent !== null) { bar.max = 100; bar.value = Math.min(percent, 100); }
    else { bar.removeAttribute("value"); }
    if (current !== null) { parts.push(total ? current + " of " + total : current + " done"); }
    if (percent !== null) { parts.push(percent + "%"); }
    if (p && typeof p.message === "string" && p.message) { parts.push(p.message); }
    message.textContent = parts.join(" \\u00b7 ");
  }
  function retryAfter(response) {
    var seconds = parseInt(response.headers.get("Retry-After") || "1", 10);
    return isFinite(seconds) && seconds >= 0 ? Math.min(seconds, 60) : 1;
  }
  function poll() {
    var began = Date.now();
    fetch(url, {headers: {"Accept": "application/json", "Prefer": "wait=" + wait},
                cache: "no-store", credentials: "same-origin"})
      .then(function (response) {
        if (response.status === 202) {
          return response.json().then(function (doc) {
            failures = 0;
            show(doc);
            // A poll answered at once (the server did not hold it) waits Retry-After.
            var pause = retryAfter(response) * 1000 - (Date.now() - began);
            setTimeout(poll, Math.max(pause, 100));
          });
        }
        if (response.status === 503 || response.status === 429) {
          failures += 1;
          setTimeout(poll, retryAfter(response) * 1000);
          return null;
        }
        location.replace(url);  // the task ended: show the application's own response
        return null;
      })
      .catch(function () {
        failures += 1;
        setTimeout(poll, Math.min(30, Math.pow(2, failures)) * 1000);
      });
  }
  poll();
})();
"""


def _source_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_source_hash(_SCRIPT)}; style-src {_source_hash(_STYLE)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
#: The headers the page is sent with (besides ``Content-Length`` and the 202's own).
HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Type", "text/html; charset=utf-8"),
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("Vary", "Accept"),
)

_OFFERED = ["application/json", "text/html"]  # JSON first: it wins a tie (e.g. */* alone)


def prefers_html(environ: WSGIEnvironment) -> bool:
    """Whether the request's ``Accept`` prefers ``text/html`` to ``application/json``.

    ``*/*`` alone, no ``Accept``, or a tie means JSON: only a client that asks for
    HTML more than for JSON (a browser) gets the page.
    """
    accept = environ.get("HTTP_ACCEPT")
    if not accept or "html" not in accept:  # the common API client: no parsing at all
        return False
    parsed = parse_accept_header(accept, MIMEAccept)
    return parsed.best_match(_OFFERED, default="application/json") == "text/html"


def render(document: dict[str, object], *, poll_url: str) -> bytes:
    """The page for a pending task's status ``document``, polling ``poll_url``."""
    progress = document.get("progress")
    progress = progress if isinstance(progress, dict) else {}
    current, total = _number(progress.get("current")), _number(progress.get("total"))
    percent = _number(progress.get("percent"))
    if current is not None and total:
        bar = f'<progress id="bar" max="{_num(total)}" value="{_num(min(current, total))}">'
    elif percent is not None:
        bar = f'<progress id="bar" max="100" value="{_num(min(percent, 100))}">'
    else:
        bar = '<progress id="bar">'  # indeterminate
    parts = []
    if current is not None:
        parts.append(f"{_num(current)} of {_num(total)}" if total else f"{_num(current)} done")
    if percent is not None:
        parts.append(f"{_num(percent)}%")
    message = progress.get("message")
    if isinstance(message, str) and message:
        parts.append(message)
    line = " \u00b7 ".join(parts)
    queued = document.get("status") == "queued"
    state = "Queued: waiting to start" if queued else "Running"
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{escape(state)}</title>
<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS}"></noscript>
<style>{_STYLE}</style>
</head>
<body>
<main id="task" data-poll="{escape(poll_url)}" data-wait="{1 if progress else 10}">
<h1>Your request is being processed</h1>
<p id="state" role="status" aria-live="polite">{escape(state)}</p>
{bar}{escape(parts[0] if parts else "working")}</progress>
<p id="message">{escape(line)}</p>
<p class="note">This page updates itself and shows the result when the task ends.</p>
<p class="note">Task <code>{escape(str(document.get("id", "")))}</code></p>
</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    return page.encode("utf-8")


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def _num(value: float | None) -> str:
    """A number as JavaScript prints it: ``3`` for 3.0, ``2.5`` for 2.5."""
    if value is None:
        return ""
    return str(int(value)) if value.is_integer() else repr(value)
