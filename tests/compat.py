"""The README's compatibility table, generated from the server and framework tests that ran.

Two halves.  During a test run, :class:`Recorder` (a pytest plugin that
tests/conftest.py registers when ``WSGI_ASYNC_COMPAT_JSON`` names a file)
notes the outcome of every test about a server or a framework, with the
version of each one installed, and writes them to that file as JSON.  Then
``python -m tests.compat RESULTS.json --write`` renders the table between
the README's ``<!-- compat:start -->`` and ``<!-- compat:end -->`` markers,
and ``--check`` fails unless the committed table shows the same pass matrix
(versions are shown but not compared: they change with every install).

Which test is about what: a test module listed in :data:`SOURCES` names the
parametrised fixture whose value is the server or framework (``served``,
``stack``, ``spec``); a test without one names its subject with
``@pytest.mark.compat("name")``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from collections.abc import Generator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- compat:start -->", "<!-- compat:end -->"

# module -> (kind, column, the fixture whose parameter is the subject)
SOURCES = {
    "test_servers.py": ("server", "HTTP suite", "served"),
    "test_frameworks.py": ("framework", "suite", "stack"),
    "test_shutdown.py": ("server", "graceful shutdown", "spec"),
}
COLUMNS = {"server": ["HTTP suite", "graceful shutdown"], "framework": ["suite"]}
# The distribution that provides each server (for its version); frameworks are their own.
DISTRIBUTIONS = {
    "cli-waitress": "waitress",
    "cli-dev-werkzeug": "werkzeug",
    "waitress": "waitress",
    "gunicorn-gthread": "gunicorn",
    "gunicorn-sync": "gunicorn",
    "uwsgi": "pyuwsgi",
    "cheroot": "cheroot",
    "flask": "flask",
    "django": "django",
    "falcon": "falcon",
    "bottle": "bottle",
    "pyramid": "pyramid",
}
# Worst first: one failure makes a cell fail, one skip (locally) makes it "skipped".
RANK = ["fail", "skipped", "pass"]


def version_of(subject: str) -> str:
    distribution = DISTRIBUTIONS.get(subject)
    if distribution is None:  # wsgiref: the standard library
        return f"Python {platform.python_version()}"
    try:
        return f"{distribution} {metadata.version(distribution)}"
    except metadata.PackageNotFoundError:
        return f"{distribution} (not installed)"


def subject_of(item: pytest.Item) -> tuple[str, str, str] | None:
    """(kind, column, subject) of a test about a server or a framework, else None."""
    source = SOURCES.get(Path(str(item.fspath)).name)
    if source is None:
        return None
    kind, column, fixture = source
    marker = item.get_closest_marker("compat")
    if marker is not None:
        return kind, column, str(marker.args[0])
    callspec = getattr(item, "callspec", None)
    if callspec is not None and fixture in callspec.params:
        return kind, column, str(callspec.params[fixture])
    return None


class Recorder:
    """Collects each server and framework test's outcome; writes them at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cells: dict[str, dict[str, dict[str, str]]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        found = subject_of(item)
        if found is None:
            return
        kind, column, subject = found
        if report.failed:
            state = "fail"
        elif report.skipped:
            state = "skipped"
        elif report.when == "call":
            state = "pass"
        else:
            return
        row = self.cells.setdefault(f"{kind}:{subject}", {})
        previous = row.get(column, "pass")
        row[column] = min(previous, state, key=RANK.index)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        results = {
            key: {"kind": key.split(":", 1)[0], "subject": key.split(":", 1)[1],
                  "version": version_of(key.split(":", 1)[1]), "cells": cells}
            for key, cells in sorted(self.cells.items())
        }
        document = {"python": platform.python_version(), "results": results}
        self.path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", "utf-8")


# -- rendering -----------------------------------------------------------------------------


def render(document: dict[str, Any]) -> str:
    """The Markdown between the markers: one table per kind, then how it was made."""
    parts = []
    for kind, title in (("server", "WSGI server"), ("framework", "framework")):
        rows = [r for r in document["results"].values() if r["kind"] == kind]
        if not rows:
            continue
        columns = COLUMNS[kind]
        lines = [f"| {title} | {' | '.join(columns)} | version tested |",
                 "|---" * (len(columns) + 2) + "|"]
        for row in sorted(rows, key=lambda r: r["subject"]):
            cells = [row["cells"].get(column, "not tested") for column in columns]
            lines.append(f"| `{row['subject']}` | {' | '.join(cells)} | {row['version']} |")
        parts.append("\n".join(lines))
    parts.append(f"Generated by `python -m tests.compat` from a test run on Python "
                 f"{document['python']}; `.ci/run` checks the pass matrix on every run.")
    return "\n\n".join(parts)


def matrix(block: str) -> list[list[str]]:
    """The table rows of ``block`` without their last cell (the version): what is compared."""
    rows = []
    for line in block.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows.append(cells[:-1])
    return rows


def current_block(readme: str) -> re.Match[str]:
    match = re.search(re.escape(START) + r"\n(.*?)\n?" + re.escape(END), readme, re.S)
    if match is None:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    return match


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.compat", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("results", type=Path, help="the JSON a test run wrote "
                        "(WSGI_ASYNC_COMPAT_JSON=results.json python -m pytest)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the README's table")
    action.add_argument("--check", action="store_true",
                        help="fail unless the README's table shows the same pass matrix")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    document = json.loads(args.results.read_text("utf-8"))
    if not document["results"]:
        print(f"{args.results}: no server or framework test ran", file=sys.stderr)
        return 1
    table = render(document)
    readme = args.readme.read_text("utf-8")
    found = current_block(readme)
    block = found.group(1)
    if args.write:
        written = readme[:found.start()] + f"{START}\n{table}\n{END}" + readme[found.end():]
        args.readme.write_text(written, "utf-8")
        print(f"{args.readme}: compatibility table written")
        return 0
    if matrix(block) != matrix(table):
        print("README.md's compatibility table does not match the tests that ran; "
              "regenerate it:\n  WSGI_ASYNC_COMPAT_JSON=compat.json python -m pytest "
              "tests/test_servers.py tests/test_frameworks.py tests/test_shutdown.py\n"
              "  python -m tests.compat compat.json --write\n\nexpected:\n" + table,
              file=sys.stderr)
        return 1
    print("README.md's compatibility table matches the tests that ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
