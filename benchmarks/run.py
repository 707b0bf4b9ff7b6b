"""The runner: ``python -m benchmarks [--quick] [--output DIR]``.

Starts every contender itself on free loopback ports, drives each scenario,
stops everything it started (by pid, whatever happens), deletes the Redis
keys it wrote, and writes ``results.json``, ``results.md`` and
``results.png`` to the output directory.  Exits 1 when a contender failed or
a measured row came out incomplete; a contender that cannot run here is
reported as skipped, with the reason, never dropped.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from . import report, scenarios, services, targets
from .contenders import CONTENDERS, LOCAL, Contender, Deployment, Settings
from .procs import BenchError, Processes, Skipped
from .scenarios import PROFILES, Profile

HERE = Path(__file__).resolve().parent
SCENARIOS = ("passthrough", "submit", "e2e", "overload", "memory", "cpu", "scale")
REQUIRED = {  # what every measured row must hold, per scenario
    "passthrough": ("per_s", "p99_ms", "cpu_us_per_request"),
    "submit": ("per_s", "p50_ms", "p99_ms"),
    "e2e": ("per_s", "p50_ms", "p99_ms", "cpu_ms_per_task"),
    "overload": ("accepted", "threads_peak", "p99_accepted_ms"),
    "memory": ("rss_bytes_per_task",),
    "cpu": ("cpu_tasks_per_s", "get_p99_ms"),
    "scale": ("us_per_op",),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="a few seconds per contender, only those that need no extra service")
    size.add_argument("--smoke", action="store_true", help="tiny counts, for the test suite")
    parser.add_argument("--output", type=Path, default=HERE / "results",
                        help="where results.json, results.md and results.png go")
    parser.add_argument("--only", default="",
                        help="comma-separated contender names (default: all)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of {', '.join(SCENARIOS)}")
    return parser.parse_args(argv)


def choose(args: argparse.Namespace) -> tuple[list[Contender], list[tuple[Contender, str]]]:
    names = {c.name for c in CONTENDERS}
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(only) - names
    if unknown:
        raise SystemExit(f"--only: unknown contender(s) {sorted(unknown)}; "
                         f"known: {', '.join(sorted(names))}")
    chosen, left_out = [], []
    for contender in CONTENDERS:
        if only and contender.name not in only:
            continue
        if (args.quick or args.smoke) and not only and contender.name not in LOCAL:
            left_out.append((contender, "not in --quick: needs Redis, Celery or RQ"))
            continue
        chosen.append(contender)
    return chosen, left_out


class Run:
    """One benchmark run: its settings, its rows, and what it must clean up."""

    def __init__(self, profile: Profile, chosen: list[Contender], wanted: set[str]) -> None:
        self.profile = profile
        self.chosen = chosen
        self.wanted = wanted
        self.prefix = f"wsgi-async-bench:{secrets.token_hex(6)}:"
        self.workdir = Path(tempfile.mkdtemp(prefix="wsgi-async-bench-"))
        (self.workdir / "logs").mkdir()
        self.procs = Processes(self.workdir / "logs")
        url = services.redis_url()
        self.redis, why = services.connect(url)
        self.settings = Settings(self.procs, url if self.redis is not None else None,
                                 self.prefix, self.workdir, why)
        self.rows: list[dict[str, Any]] = []

    def note(self, scenario: str, contender: Contender, exc: BaseException) -> None:
        kind = "skipped" if isinstance(exc, Skipped) else "failed"
        print(f"  {contender.name} / {scenario}: {kind}: {exc}", flush=True)
        self.rows.append({"scenario": scenario, "contender": contender.name,
                          "how": contender.how, kind: str(exc).splitlines()[0][:300]})

    def passthrough(self) -> None:
        bare, wrapped = (c for c in CONTENDERS if c.name in ("bare", "passthrough"))
        if not {bare, wrapped} <= set(self.chosen):
            return
        print("passthrough", flush=True)
        try:
            self.rows += scenarios.passthrough(self.settings, self.profile, bare, wrapped)
        except (BenchError, Skipped, OSError) as exc:
            self.note("passthrough", wrapped, exc)

    def loads(self) -> None:
        """Submit and end to end, every contender, in passes of alternating order."""
        raws: dict[tuple[str, str], list[dict[str, Any]]] = {}
        broken: dict[str, BaseException] = {}
        for pass_ in range(self.profile.passes):
            order = self.chosen if pass_ % 2 == 0 else self.chosen[::-1]
            for contender in order:
                if contender.name in broken or contender.kind == "passthrough":
                    continue
                wanted = [s for s in scenarios.scenarios_of(contender)
                          if s.split()[0] in self.wanted]
                if not wanted:
                    continue
                print(f"pass {pass_ + 1}: {contender.name}", flush=True)
                try:
                    deployment = Deployment(self.settings, contender)
                    try:
                        scenarios.warm_up(deployment, self.profile)
                        for scenario in wanted:
                            raw = scenarios.measure(deployment, self.profile, self.redis,
                                                    scenario)
                            raws.setdefault((scenario, contender.name), []).append(raw)
                    finally:
                        deployment.stop()
                except (BenchError, Skipped, OSError) as exc:
                    broken[contender.name] = exc
        for contender in self.chosen:
            if contender.kind == "passthrough":
                continue
            for scenario in scenarios.scenarios_of(contender):
                if scenario.split()[0] not in self.wanted:
                    continue
                if contender.name in broken:
                    self.note(scenario, contender, broken[contender.name])
                elif (scenario, contender.name) in raws:
                    merged = scenarios.merge(raws[(scenario, contender.name)])
                    self.rows.append(scenarios.summarise(scenario, contender, merged))

    def per_contender(self, scenario: str) -> None:
        for contender in self.chosen:
            if not contender.asynchronous or (scenario == "cpu" and not cpu_pair(contender)):
                continue
            print(f"{scenario}: {contender.name}", flush=True)
            try:
                if scenario == "overload":
                    self.rows.append(scenarios.overload(self.settings, self.profile, contender))
                elif scenario == "cpu":
                    self.rows.append(scenarios.cpu_beside_requests(self.settings, self.profile,
                                                                   contender))
                else:
                    self.rows.append(scenarios.memory(self.settings, self.profile, contender,
                                                      self.redis))
            except (BenchError, Skipped, OSError) as exc:
                self.note(scenario, contender, exc)

    def scale(self) -> None:
        from .scale import run_scale

        print("scale", flush=True)
        names = {c.name for c in self.chosen}
        for row in run_scale(self.profile.scale_levels, self.profile.scale_ops,
                             redis_url=self.settings.redis_url, prefix=self.prefix + "scale:",
                             workdir=self.workdir):
            if row["contender"] not in names:
                continue
            if row.get("skipped") and self.settings.why_no_redis:
                row["skipped"] = self.settings.why_no_redis
            self.rows.append({**row, "how": row.get("how", "registry API, in process")})

    def execute(self) -> None:
        if "passthrough" in self.wanted:
            self.passthrough()
        if self.wanted & {"submit", "e2e"}:
            self.loads()
        for scenario in ("overload", "memory", "cpu"):
            if scenario in self.wanted:
                self.per_contender(scenario)
        if "scale" in self.wanted:
            self.scale()

    def clean(self) -> int:
        self.procs.stop_all()
        deleted = services.clean(self.redis, self.prefix) if self.redis is not None else 0
        shutil.rmtree(self.workdir, ignore_errors=True)
        return deleted


def cpu_pair(contender: Contender) -> bool:
    """The cpu scenario compares the pool's threads with workers, one web process each."""
    return contender.kind == "wsgi_async" and contender.workers == 1 and (
        contender.registry != "memory")


def incomplete(rows: list[dict[str, Any]]) -> list[str]:
    """Rows that failed, or that lack a figure their scenario must give."""
    problems = []
    for row in rows:
        if row.get("skipped"):
            continue
        where = f"{row['contender']} / {row['scenario']}"
        if row.get("failed"):
            problems.append(f"{where}: failed: {row['failed']}")
            continue
        required = REQUIRED[row["scenario"].split()[0]]
        missing = [key for key in required if row.get(key) is None]
        if missing or row.get("errors") or row.get("lost"):
            problems.append(f"{where}: missing {missing}, errors {row.get('errors')}, "
                            f"lost {row.get('lost')}, {row.get('first_error', '')}")
    return problems


def versions() -> str:
    found = [f"Python {platform.python_version()}"]
    for dist in ("gunicorn", "flask", "werkzeug", "celery", "rq", "redis"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile = PROFILES["quick" if args.quick else "smoke" if args.smoke else "full"]
    wanted = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if wanted - set(SCENARIOS):
        raise SystemExit(f"--scenarios: unknown {sorted(wanted - set(SCENARIOS))}")
    chosen, left_out = choose(args)
    signal.signal(signal.SIGTERM, _terminate)
    began = time.monotonic()
    run = Run(profile, chosen, wanted)
    try:
        run.execute()
    finally:
        deleted = run.clean()
    for contender, reason in left_out:
        for scenario in sorted(wanted):
            if scenario == "passthrough" or (
                    scenario in ("overload", "memory") and not contender.asynchronous) or (
                    scenario == "cpu" and not cpu_pair(contender)):
                continue
            run.rows.append({"scenario": scenario, "contender": contender.name,
                             "how": contender.how, "skipped": reason})
    report.add_ratios(run.rows)
    command = "python -m benchmarks" + (" --quick" if args.quick else " --smoke"
                                        if args.smoke else "")
    results = {
        "meta": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "profile": profile.name, "command": command,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
                       "one host",
            "versions": versions(),
            "server": "gunicorn gthread, 1 worker x 8 threads unless the row says -w 2",
            "clients": profile.clients, "seconds": round(time.monotonic() - began, 1),
            "redis": run.settings.redis_url or run.settings.why_no_redis,
            "redis_keys_deleted": deleted,
        },
        "profile": asdict(profile),
        "contenders": [c.name for c in CONTENDERS],
        "scenarios": sorted(wanted),
        "rows": run.rows,
    }
    results["targets"] = [o.as_dict() for o in targets.evaluate(run.rows)]
    written = report.write(results, args.output)
    print(report.markdown(results))
    print("wrote " + ", ".join(str(p) for p in written))
    problems = incomplete(run.rows)
    for problem in problems:
        print(f"INCOMPLETE: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
