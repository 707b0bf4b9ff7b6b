"""Smoke test of ``benchmarks/run.py``: it runs end to end and prints its tables.

Only the local systems (wsgi_async memory, the Flask recipe, the bare app) and
tiny counts; no Redis, Celery or RQ.  No timing is asserted: the speed goals
are ratios read from a real run (see benchmarks/README.md), not test outcomes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.server
def test_benchmark_runs_and_prints_its_tables(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--only", "local",
         "--json", str(out)],
        capture_output=True, text=True, timeout=90, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for heading in ("(a) pass-through overhead", "(b) async round trip", "(c) bound check"):
        assert heading in proc.stdout
    for row in ("plain WSGI app", "wsgi_async memory", "Flask recipe"):
        assert row in proc.stdout
    assert "Celery" not in proc.stdout and "RQ" not in proc.stdout

    results = json.loads(out.read_text())
    trips = results["round_trips"]
    assert {r["system"] for r in trips} >= {"wsgi_async memory", "Flask recipe"}
    assert all(r["tasks"] > 0 and not r["failed"] and not r["skipped"] for r in trips)
    bounded = results["bounds"][-1]
    assert bounded["refused_503"] > 0 and bounded["retry_after"]
