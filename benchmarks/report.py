"""One run's results as JSON, a Markdown report and a PNG chart."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Rows = Sequence[dict[str, Any]]

# (heading, scenarios, columns as (title, key)); a row that was skipped shows its reason.
TABLES: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]], ...] = (
    ("Pass-through: `GET /noop`, a route that matches nothing", ("passthrough",), (
        ("req/s", "per_s"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"),
        ("server CPU µs/req", "cpu_us_per_request"), ("vs bare", "vs_bare"))),
    ("Submit: `POST /noop`, 202s per second (bare: the synchronous 200)", ("submit",), (
        ("per s", "per_s"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"), ("vs bare", "vs_bare"),
        ("lost", "lost"), ("errors", "errors"))),
    ("End to end, `noop`: submit, then poll every 5 ms, or long-poll (`Prefer: wait`), "
     "or wait on the submit itself (`Prefer: respond-async, wait`)",
     ("e2e noop sync", "e2e noop wait", "e2e noop wait-on-submit", "e2e noop poll"), (
        ("mode", "mode"), ("tasks/s", "per_s"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"),
        ("max ms", "max_ms"), ("submit p50 ms", "submit_p50_ms"), ("polls/task", "polls_per_task"),
        ("CPU ms/task", "cpu_ms_per_task"), ("+ Redis CPU ms/task", "redis_cpu_ms_per_task"),
        ("vs recipe", "vs_recipe"), ("vs celery", "vs_celery"), ("errors", "errors"))),
    ("End to end, `sleep` (50 ms): how soon a finished result reaches the client",
     ("e2e sleep sync", "e2e sleep wait", "e2e sleep wait-on-submit", "e2e sleep poll"), (
        ("mode", "mode"), ("tasks/s", "per_s"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"),
        ("polls/task", "polls_per_task"), ("result after done, p50 ms", "delivery_p50_ms"),
        ("CPU ms/task", "cpu_ms_per_task"), ("+ Redis CPU ms/task", "redis_cpu_ms_per_task"),
        ("errors", "errors"))),
    ("Overload: a burst of 5 x (max_workers + max_queued) `sleep?seconds=1` submissions at once",
     ("overload",), (
        ("burst", "burst"), ("202", "accepted"), ("503", "refused_503"),
        ("Retry-After", "retry_after"), ("lost", "lost"), ("p99 of 202s ms", "p99_accepted_ms"),
        ("threads before", "threads_before"), ("peak", "threads_peak"),
        ("added", "threads_added"), ("thread bound", "thread_bound"),
        ("RSS MiB before", "rss_before_mib"), ("peak", "rss_peak_mib"))),
    ("Memory: finished tasks kept until they expire", ("memory",), (
        ("tasks", "tasks"), ("RSS MiB base", "rss_base_mib"), ("stored", "rss_stored_mib"),
        ("RSS B/task", "rss_bytes_per_task"), ("after expiry", "rss_after_expiry_mib"),
        ("heap blocks base", "blocks_base"), ("stored", "blocks_stored"),
        ("after expiry", "blocks_after_expiry"), ("RSS MiB after a 2nd fill", "rss_refill_mib"),
        ("store", "store"), ("store B/task", "store_bytes_per_task"),
        ("after expiry", "store_after_expiry_bytes_per_task"), ("expiry", "expiry"))),
    ("CPU-heavy tasks (`POST /cpu`, about 20 ms of Python each, end to end) and, meanwhile, "
     "`GET /noop` on the web process", ("cpu",), (
        ("cpu tasks", "cpu_tasks"), ("tasks/s", "cpu_tasks_per_s"),
        ("task p50 ms", "cpu_task_p50_ms"), ("GETs", "gets"), ("GET p50 ms", "get_p50_ms"),
        ("GET p99 ms", "get_p99_ms"), ("errors", "errors"))),
    ("Scale: one task's registry operations as stored tasks grow", ("scale",), (
        ("stored", "stored"), ("µs/task", "us_per_op"), ("vs first level", "vs_first_level"),
        ("fill tasks/s", "fill_per_s"))),
)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_bare``, ``vs_recipe``, ``vs_celery``: each row's rate over the reference's."""
    def rate(scenario: str, contender: str) -> float | None:
        for row in rows:
            if (row["scenario"] == scenario and row["contender"] == contender
                    and row.get("per_s")):
                return float(row["per_s"])
        return None

    for row in rows:
        if not row.get("per_s"):
            continue
        scenario = row["scenario"]
        if scenario in ("passthrough", "submit"):
            base = rate(scenario, "bare")
            row["vs_bare"] = round(row["per_s"] / base, 2) if base else None
        elif scenario.startswith("e2e"):
            _, endpoint, mode = scenario.split()
            row["mode"] = mode
            for peer in ("recipe", "celery"):
                base = rate(f"e2e {endpoint} poll", peer)
                row[f"vs_{peer}"] = round(row["per_s"] / base, 2) if base else None


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown(results: dict[str, Any]) -> str:
    rows: Rows = results["rows"]
    meta = results["meta"]
    out = [f"# wsgi_async benchmarks: {meta['profile']} run, {meta['date']}", "",
           f"{meta['machine']}; {meta['versions']}.", "",
           f"Reproduce: `{meta['command']}`. Every contender serves the same Flask app under "
           f"{meta['server']}; clients: {meta['clients']} keep-alive connections.", ""]
    out += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for outcome in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[outcome["met"]]
        out.append(f"| {outcome['target']} | {_cell(outcome['measured'])} | {met} |")
    for heading, scenarios, columns in TABLES:
        chosen = [r for s in scenarios for r in rows if r["scenario"] == s]
        if not chosen:
            continue
        out += ["", f"## {heading}", "",
                "| contender | " + " | ".join(title for title, _ in columns) + " |",
                "|---" * (len(columns) + 1) + "|"]
        for row in chosen:
            name = row["contender"]
            if row.get("skipped") or row.get("failed"):
                word = "skipped" if row.get("skipped") else "FAILED"
                reason = row.get("skipped") or row.get("failed")
                out.append(f"| {name} | {word}: {_cell(reason)} |" + " |" * (len(columns) - 1))
                continue
            cells = [_cell(row.get(key)) for _, key in columns]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    hows: dict[str, str] = {}
    for row in rows:
        if row.get("how") and row["scenario"] != "scale":
            hows.setdefault(row["contender"], row["how"])
    out += ["", "## Contenders", ""] + [f"- **{name}**: {how}" for name, how in hows.items()]
    return "\n".join(out) + "\n"


def chart(results: dict[str, Any], path: Path) -> str | None:
    """A PNG of the headline figures; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    rows: Rows = results["rows"]

    def best(scenario_prefix: str, key: str) -> dict[str, float]:
        found: dict[str, float] = {}
        for row in rows:
            if row["scenario"].startswith(scenario_prefix) and row.get(key) is not None and not (
                    row.get("skipped") or row.get("failed")):
                mode = row["scenario"].split()[-1]
                name = row["contender"] + ("" if mode in ("poll", "sync") else f" ({mode})")
                found[name] = float(row[key])
        return found

    panels = [
        ("end to end noop: tasks/s (higher is better)", best("e2e noop", "per_s")),
        ("end to end noop: p99 ms (lower is better)", best("e2e noop", "p99_ms")),
        ("submit: 202s/s (higher is better)", best("submit", "per_s")),
        ("CPU ms per e2e noop task (lower is better)", best("e2e noop", "cpu_ms_per_task")),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    for ax, (title, values) in zip(axes.flat, panels, strict=True):
        names = list(values)
        colors = ["#2a7ab9" if n.startswith(("wsgi_async", "passthrough")) else "#999999"
                  for n in names]
        ax.barh(names, [values[n] for n in names], color=colors)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        for i, n in enumerate(names):
            ax.text(values[n], i, f" {values[n]:,.3g}", va="center", fontsize=7)
    fig.suptitle(f"wsgi_async vs the recipe, Celery and RQ ({results['meta']['date']}, "
                 f"{results['meta']['profile']} run)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def write(results: dict[str, Any], output: Path) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    written = []
    json_path = output / "results.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    written.append(json_path)
    md_path = output / "results.md"
    md_path.write_text(markdown(results))
    written.append(md_path)
    png = output / "results.png"
    why = chart(results, png)
    if why is None:
        written.append(png)
    else:
        results["meta"]["chart"] = f"not drawn: {why}"
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return written
