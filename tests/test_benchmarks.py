"""The benchmark runner works end to end: every scenario, every local contender.

Tiny counts (``--smoke``) and only the contenders that need no other service;
no timing is asserted: the speed goals are ratios read from a real run (see
benchmarks/README.md), not test outcomes.  What is asserted is that the run
starts and stops its servers, measures every row, and writes a complete report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ["bare", "passthrough", "wsgi_async memory", "recipe"]


def gunicorn_pids() -> set[int]:
    """The benchmark servers started from this checkout (another checkout's runs are theirs)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if b"benchmarks.apps:make_app()" in cmdline and cwd == str(ROOT):
                found.add(int(entry.name))
    return found


@pytest.mark.server
def test_the_runner_measures_every_scenario_and_writes_its_report(tmp_path: Path) -> None:
    before = gunicorn_pids()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--only", ",".join(LOCAL),
         "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=170, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert gunicorn_pids() <= before, "the runner left servers behind"

    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    by = {(r["scenario"], r["contender"]): r for r in rows}
    assert not [r for r in rows if r.get("failed") or r.get("skipped")]
    for contender in ("bare", "passthrough"):
        assert by[("passthrough", contender)]["per_s"] > 0
    for contender in ("bare", "wsgi_async memory", "recipe"):
        assert by[("submit", contender)]["per_s"] > 0
        assert by[("submit", contender)]["lost"] == 0
    wait = by[("e2e noop wait", "wsgi_async memory")]
    assert wait["done"] > 0 and wait["polls_per_task"] == 1.0 and wait["errors"] == 0
    assert by[("e2e sleep poll", "recipe")]["polls_per_task"] > 1.0
    assert by[("e2e sleep wait", "wsgi_async memory")]["delivery_p50_ms"] is not None
    overload = by[("overload", "wsgi_async memory")]
    assert overload["refused_503"] > 0 and overload["retry_after"] is True
    assert overload["lost"] == 0 and overload["failed"] == 0
    assert overload["threads_peak"] <= overload["thread_bound"]
    # A thread per request: most of the burst at once (its 1 s sleeps overlap, but on a
    # loaded machine the first may end before the last arrives).
    assert by[("overload", "recipe")]["threads_added"] > overload["burst"] // 2
    assert by[("memory", "wsgi_async memory")]["rss_after_expiry_mib"] is not None
    scale = [r for r in rows if r["scenario"] == "scale" and r["contender"] == "wsgi_async memory"]
    assert [r["stored"] for r in scale] == results["profile"]["scale_levels"]

    assert len(results["targets"]) >= 10
    markdown = (tmp_path / "results.md").read_text()
    for heading in ("## Targets", "## Pass-through", "## Submit", "## End to end, `noop`",
                    "## Overload", "## Memory", "## Scale"):
        assert heading in markdown
    assert (tmp_path / "results.png").exists() or "not drawn" in results["meta"]["chart"]
