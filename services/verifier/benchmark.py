"""Measure GradingPool throughput and per-item latency on MATH-500-style answers.

Run: ``python -m services.verifier.benchmark [--processes 0 1 2] [--repeat 2]`` (0 = in-process
reference, no pool). (It lives here
rather than in ``bench/`` only because this package is where the verifier work happens; it
imports nothing but the verifier.) The workload is every MATH-500 item as a completion
``"... so the answer is \\boxed{<reference answer>}."`` against its gold answer (all correct:
the common case for a trained policy), plus the same completions answered with the *next*
item's answer (mostly wrong: the slower path, since sympy then tries harder to prove equality).
Prints one table row per pool size; timings include IPC and are taken after a warm-up pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from conspo.grading.config import GradeConfig, GradeItem
from services.verifier.pool import GradingPool

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "math" / "math500.jsonl"


def workload(path: Path) -> tuple[list[GradeItem], list[GradeItem]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    answers = [row["answer"] for row in rows]
    right = [
        GradeItem(completion=f"Reasoning... so the answer is $\\boxed{{{a}}}$.", gold=a)
        for a in answers
    ]
    shifted = answers[1:] + answers[:1]
    wrong = [
        GradeItem(completion=f"Reasoning... so the answer is $\\boxed{{{s}}}$.", gold=g)
        for g, s in zip(answers, shifted, strict=True)
    ]
    return right, wrong


def measure(pool: GradingPool, items: list[GradeItem], repeat: int) -> dict[str, float]:
    pool.grade(items)  # warm-up: gold caches, sympy caches, lazy regexes in every worker
    pool.wait_ready(60.0)
    walls, latencies = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        pool.grade(items)
        walls.append(time.perf_counter() - start)
        latencies.extend(pool.stats.last_item_seconds)
    latencies.sort()
    wall = statistics.median(walls)
    return {
        "items_per_s": len(items) / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "max_ms": 1000 * latencies[-1],
    }


def measure_in_process(items: list[GradeItem], repeat: int) -> dict[str, float]:
    """Reference row: ``grade_one`` in this process, no pool, no IPC, no timeout."""
    from conspo.grading.grade import grade_one

    config = GradeConfig()
    for item in items:
        grade_one(item.completion, item.gold, item.verifier, config)
    walls, latencies = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            t0 = time.perf_counter()
            grade_one(item.completion, item.gold, item.verifier, config)
            latencies.append(time.perf_counter() - t0)
        walls.append(time.perf_counter() - start)
    latencies.sort()
    return {
        "items_per_s": len(items) / statistics.median(walls),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "max_ms": 1000 * latencies[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    right, wrong = workload(args.data)
    print(
        f"{'processes':>9} {'workload':>8} {'items/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}"
    )
    for processes in args.processes:
        if processes == 0:
            for name, items in (("correct", right), ("wrong", wrong)):
                r = measure_in_process(items, args.repeat)
                print(
                    f"{'in-proc':>9} {name:>8} {r['items_per_s']:>9.0f} {r['p50_ms']:>7.1f}"
                    f" {r['p99_ms']:>7.1f} {r['max_ms']:>7.0f}"
                )
            continue
        start = time.perf_counter()
        with GradingPool(processes=processes, timeout_s=10.0, config=GradeConfig()) as pool:
            started = time.perf_counter() - start
            for name, items in (("correct", right), ("wrong", wrong)):
                r = measure(pool, items, args.repeat)
                print(
                    f"{processes:>9} {name:>8} {r['items_per_s']:>9.0f} {r['p50_ms']:>7.1f}"
                    f" {r['p99_ms']:>7.1f} {r['max_ms']:>7.0f}"
                )
        print(f"{'':>9} pool start {started:.2f} s")


if __name__ == "__main__":
    main()
