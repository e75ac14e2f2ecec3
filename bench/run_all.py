"""Run every benchmark in sequence and print one table of their summary lines.

Each benchmark runs as its own subprocess (``python bench/<script>``; ``--smoke`` is passed on),
writes its JSON (and PNG) under ``--results`` (default ``bench/results/``) and its output to
``<results>/logs/<name>.log``. A benchmark counts as failed when it exits non-zero, times out, or
leaves no JSON with the keys its report needs; the script then exits 1. The summary of each is
its ``summary:`` line (``SUMMARY`` for objectives_overhead); the two older scripts that print
none (generator_throughput, weight_sync) get one built from their JSON.

Goals (issue 18): after the table, every figure that has a goal is printed against it with PASS
or MISS. A script reports its figures as a ``goals`` list in its results JSON, each entry
``{"name", "value", "goal", "unit", "higher_is_better"}`` (``_common.goal``); where a script
writes no such list yet, ``DERIVED`` builds the entries from its other keys. Every goal of
``ISSUE_GOALS`` is printed, a missing one as MISS (not measured), so a run that skipped or broke
a benchmark cannot look like a success. The list also goes to ``run_all.json`` (``goals``).

Usage::

    python bench/run_all.py [--smoke] [--model PATH] [--only NAME ...] [--skip NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, goal, goal_met, header, loadavg, machine, table, write_json

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    keys: tuple[str, ...]  # top-level keys the JSON must have
    needs_model: bool = False
    args: tuple[str, ...] = field(default=())


BENCHES = [
    Bench(
        "queue_throughput",
        "queue_throughput.py",
        ("machine", "groups_per_s", "ratio_vs_raw_xadd"),
    ),
    Bench("api_load", "api_load.py", ("machine", "results", "goals")),
    Bench("api_load_training", "api_load.py", ("machine", "results", "goals"), args=("--train",)),
    Bench("objectives_overhead", "objectives_overhead.py", ("machine", "seconds", "ratio")),
    Bench(
        "generator_throughput",
        "generator_throughput.py",
        ("machine", "results"),
        needs_model=True,
    ),
    Bench("weight_sync", "weight_sync.py", ("machine", "results")),
    Bench("verifier_throughput", "verifier_throughput.py", ("machine", "cores", "replicas")),
    Bench("async_vs_sync", "async_vs_sync.py", ("machine", "modes", "runs"), needs_model=True),
    Bench(
        "objectives",
        "objectives.py",
        ("machine", "objectives", "warm_start_accuracy", "target"),
        needs_model=True,
    ),
    Bench("vs_trl", "vs_trl.py", ("machine", "results", "accuracy_start"), needs_model=True),
    Bench("profile_step", "profile_step.py", ("machine", "runs"), needs_model=True),
]
NAMES = [b.name for b in BENCHES]

#: Issue 18's goals: name -> (the benchmark expected to report it, goal, unit, higher is
#: better). The names are the ``name`` fields of the scripts' ``goals`` entries.
ISSUE_GOALS: dict[str, tuple[str, float, str, bool]] = {
    "vs TRL samples/s, max_staleness 1": ("vs_trl", 1.0, "x", True),
    "held-out accuracy vs TRL, max_staleness 1": ("vs_trl", -2.0, "pts", True),
    "vs TRL samples/s, synchronous (max_staleness 0)": ("vs_trl", 0.8, "x", True),
    "API single prompt req/s, idle": ("api_load", 1000.0, "req/s", True),
    "API single prompt p99, idle": ("api_load", 50.0, "ms", False),
    "API single prompt req/s, while training": ("api_load_training", 300.0, "req/s", True),
    "API single prompt p99, while training": ("api_load_training", 250.0, "ms", False),
    "API batches of 100 prompts/s, idle": ("api_load", 1000.0, "prompts/s", True),
    "API batches of 100 p99, idle": ("api_load", 50.0, "ms", False),
    "API batches of 100 prompts/s, while training": ("api_load_training", 300.0, "prompts/s", True),
    "API batches of 100 p99, while training": ("api_load_training", 250.0, "ms", False),
    "queue vs raw Redis (8x512-token groups)": ("queue_throughput", 0.5, "x", True),
}


def _derived_queue(data: dict[str, Any]) -> list[dict[str, Any]]:
    # Results written before the script reported its own goals: the same ratio, from its keys.
    ratio = data["ratio_vs_raw_cycle"]["conspo publish/read/ack"]
    return [goal("queue vs raw Redis (8x512-token groups)", ratio, 0.5, "x")]


DERIVED = {"queue_throughput": _derived_queue}
GOAL_KEYS = ("name", "value", "goal", "unit", "higher_is_better")


def goals_of(name: str, data: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The goal entries of one benchmark's results (its ``goals`` list, else ``DERIVED``);
    malformed entries are dropped with a warning rather than failing the whole table."""
    if data is None:
        return []
    raw = data.get("goals")
    if raw is None and name in DERIVED:
        try:
            raw = DERIVED[name](data)
        except (KeyError, TypeError, ValueError):
            raw = []
    out = []
    for entry in raw or []:
        if not isinstance(entry, dict) or any(k not in entry for k in GOAL_KEYS[:3]):
            print(f"[{name}] ignoring a malformed goal entry: {entry!r}", flush=True)
            continue
        out.append({**entry, "source": name, "met": goal_met(entry)})
    return out


def goal_rows(reported: list[dict[str, Any]], chosen: set[str]) -> list[dict[str, Any]]:
    """Every issue goal (reported or not) followed by any other goal a script reported."""
    by_name = {g["name"]: g for g in reported}
    rows = []
    for name, (source, target, unit, higher) in ISSUE_GOALS.items():
        if name in by_name:
            rows.append(by_name.pop(name))
            continue
        if source not in NAMES:
            why = f"no {source} benchmark"
        else:
            why = "not run" if source not in chosen else "not reported"
        rows.append({"name": name, "value": None, "goal": target, "unit": unit,
                     "higher_is_better": higher, "source": source, "met": False,
                     "missing": why})  # fmt: skip
    return rows + list(by_name.values())


def print_goals(rows: list[dict[str, Any]]) -> None:
    def verdict(g: dict[str, Any]) -> str:
        if g["value"] is None:
            return f"MISS ({g['missing']})"
        return "PASS" if g["met"] else "MISS"

    print(
        table(
            [
                [
                    g["name"],
                    "-" if g["value"] is None else f"{g['value']:,.2f} {g.get('unit', '')}",
                    f"{'>=' if g.get('higher_is_better', True) else '<='} "
                    f"{g['goal']:,.2f} {g.get('unit', '')}",
                    verdict(g),
                    g["source"],
                ]
                for g in rows
            ],
            ["goal (issue 18)", "measured", "goal", "verdict", "benchmark"],
        )
    )


def summary_line(output: str) -> str | None:
    for line in reversed(output.splitlines()):
        low = line.strip().lower()
        if low.startswith("summary:"):
            return line.strip()[len("summary:") :].strip()
        if low.startswith("summary "):
            return line.strip()[len("summary ") :].strip()
    return None


def summary_from_json(name: str, data: dict[str, Any]) -> str | None:
    """For the scripts that print no summary line."""
    if name == "generator_throughput":
        return "; ".join(
            f"{r['backend']}/{r['seed_mode']}: service {r['service_tokens_per_s']:,.0f} tok/s = "
            f"{r['ratio']:.2f}x offline {r['offline_tokens_per_s']:,.0f}"
            for r in data["results"]
        )
    if name == "weight_sync":
        return "; ".join(
            f"{r['model'].split(' (')[0]} {r['bytes'] / 1e6:,.1f} MB: push "
            f"{r['push_median_s']:.4f}s ({r['push_gbps']:.2f} GB/s) = "
            f"{r['ratio_push_over_raw']:.2f}x raw broadcast"
            for r in data["results"]
        )
    return None


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


def run_one(bench: Bench, args: argparse.Namespace, results: Path) -> dict[str, Any]:
    json_path = results / f"{bench.name}.json"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(BENCH_DIR / bench.script), "--json", str(json_path), *bench.args]
    if args.smoke:
        cmd.append("--smoke")
    if bench.needs_model and args.model:
        cmd += ["--model", str(args.model)]
    log_path = results / "logs" / f"{bench.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{bench.name}] {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    status, output = "ok", ""
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            cwd=BENCH_DIR.parent,
            check=False,
        )
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            status = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr)
        status = f"timeout {args.timeout:.0f}s"
    seconds = time.monotonic() - started
    log_path.write_text(output)
    text = summary_line(output)
    data: dict[str, Any] | None = None
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text())
        except ValueError:
            data = None
    if status == "ok":
        missing = [k for k in bench.keys if data is None or k not in data]
        if missing:
            status = f"bad json (missing {', '.join(missing)})"
    if text is None and data is not None:
        try:
            text = summary_from_json(bench.name, data)
        except (KeyError, TypeError):
            text = None
    if text is None:
        tail = [line for line in output.strip().splitlines() if line.strip()][-1:]
        text = f"(no summary) {tail[0][:200] if tail else ''}"
    print(f"[{bench.name}] {status} in {seconds:.0f}s: {text}", flush=True)
    return {
        "goals": goals_of(bench.name, data),
        "name": bench.name,
        "status": status,
        "seconds": round(seconds, 1),
        "summary": text,
        "json": str(json_path),
        "log": str(log_path),
        "command": " ".join(["python", f"bench/{bench.script}", *cmd[3:]]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="pass --smoke to every benchmark")
    ap.add_argument("--model", default=None, help="checkpoint for the model benchmarks")
    ap.add_argument("--only", nargs="+", choices=NAMES, default=None)
    ap.add_argument("--skip", nargs="+", choices=NAMES, default=[])
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON / PNG / log folder")
    ap.add_argument("--timeout", type=float, default=None, help="per benchmark (s)")
    args = ap.parse_args()
    if args.timeout is None:
        args.timeout = 300.0 if args.smoke else 1800.0
    args.results.mkdir(parents=True, exist_ok=True)
    chosen = [b for b in BENCHES if (args.only is None or b.name in args.only)]
    chosen = [b for b in chosen if b.name not in args.skip]
    info = machine()
    print(header(info), flush=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    started = time.monotonic()
    rows = [run_one(b, args, args.results) for b in chosen]
    wall = time.monotonic() - started
    print()
    print(
        table(
            [[r["name"], r["status"], f"{r['seconds']:.0f}", r["summary"]] for r in rows],
            ["benchmark", "status", "s", "summary"],
        )
    )
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    goals = goal_rows([g for r in rows for g in r["goals"]], {r["name"] for r in rows})
    print()
    print_goals(goals)
    write_json(
        args.results / "run_all.json",
        "run_all",
        {
            "machine": info,
            "load_end": loadavg(),
            "smoke": args.smoke,
            "wall_s": wall,
            "benchmarks": rows,
            "failed": failed,
            "goals": goals,
        },
    )
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} ok in {wall:.0f}s"
        + (f"; FAILED: {', '.join(failed)} (logs in {args.results / 'logs'})" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
