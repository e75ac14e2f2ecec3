"""Completions/s through 1, 2 and 4 real verifier replicas, and the scaling efficiency.

Each replica is a real ``conspo verifier`` subprocess (``python -m conspo.cli verifier``, one
grading process each, as ``LocalStack`` starts them) in the ``verifiers`` consumer group of a
fresh run namespace on one Redis. The workload is MATH-500 as rollout groups: each problem is a
prompt (verifier ``math``: math-verify with a hard per-item timeout) with G completions
``"... so the answer is $\\boxed{<answer>}$."``, half of them with the problem's reference answer
(correct), half with the next problem's (perturbed: mostly wrong, the slower path, sympy tries
harder to prove equality).

Protocol per replica count N: start N replicas, wait for their heartbeats, warm up (feed groups
until every replica has graded at least one: its grading pool and math-verify are hot), then
publish the whole workload in one pipelined round trip and time until the last group is in
``labeled``. ``scaling efficiency = throughput(N) / (N x throughput(1))``. The replica counts
are interleaved over ``--repeats`` rounds (1, 2, 4, 1, 2, 4, ...) so drifting load hits each
alike; medians are reported.

Usage::

    python bench/verifier_throughput.py [--replicas 1 2 4] [--groups 500] [--smoke]
Redis: ``--redis-url`` or $CONSPO_REDIS_URL if it answers, else a private redis-server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, loadavg, machine, result_paths, summary, table, write_json

from conspo.counters import VERIFIER_VERDICT_PREFIX
from conspo.keys import Keys
from conspo.paths import shared_data_dir
from conspo.protocol import Completion, Prompt, RolloutGroup, SamplingParams
from conspo.queue import StreamQueue
from conspo.redis_conn import reachable_or_local
from conspo.state import RunStore
from conspo.testing import delete_run

log = logging.getLogger("bench.verifier_throughput")


def workload(path: Path, limit: int | None, group_size: int) -> list[RolloutGroup]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    answers = [str(r["answer"]) for r in rows]
    shifted = answers[1:] + answers[:1]
    groups = []
    for i, (row, gold, other) in enumerate(zip(rows, answers, shifted, strict=True)):
        completions = []
        for j in range(group_size):
            answer = gold if j % 2 == 0 else other
            text = f"Reasoning step by step... so the answer is $\\boxed{{{answer}}}$."
            completions.append(
                Completion(token_ids=[1, 2], logprobs=[-0.1, -0.2], text=text, finish_reason="stop")
            )
        groups.append(
            RolloutGroup(
                group_id=f"m{i}",
                prompt=Prompt(
                    prompt_id=f"m{i}",
                    text=str(row.get("problem", ""))[:2000],
                    answer=gold,
                    verifier="math",
                ),
                prompt_token_ids=[1],
                completions=completions,
                policy_version=0,
                sampling=SamplingParams(n=group_size, max_tokens=64),
            )
        )
    return groups


def relabel(groups: list[RolloutGroup], tag: str) -> list[RolloutGroup]:
    """Fresh group ids (a group id is labelled once per run: markers make replays no-ops)."""
    return [g.model_copy(update={"group_id": f"{tag}-{g.group_id}"}) for g in groups]


class Replicas:
    def __init__(self, n: int, run: str, redis_url: str, log_dir: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        env = {
            **os.environ,
            "CONSPO_RUN": run,
            "CONSPO_REDIS_URL": redis_url,
            "CONSPO_PROCESSES": "1",
            "CONSPO_BLOCK_MS": "200",
            "CONSPO_TIMEOUT_S": "5",
            "CONSPO_HEARTBEAT_S": "0.5",
            "CONSPO_LOG_LEVEL": "WARNING",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            with open(log_dir / f"verifier-{n}-{i}.log", "ab") as out:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "conspo.cli", "verifier"],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def check(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"verifier pid {p.pid} exited with {p.returncode}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def graded_by_replica(store: RunStore) -> list[int]:
    return [
        int(b.info.get("groups", 0) or 0)
        for b in store.heartbeats()
        if b.service == "verifier" and b.status != "stopped"
    ]


def wait_labeled(client: redis.Redis, keys: Keys, n: int, timeout: float, procs: Replicas) -> None:
    deadline = time.monotonic() + timeout
    while int(client.xlen(keys.labeled)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {client.xlen(keys.labeled)}/{n} groups labelled")
        procs.check()
        time.sleep(0.005)


def measure(
    n: int, groups: list[RolloutGroup], args: argparse.Namespace, redis_url: str, rnd: int
) -> dict[str, Any]:
    run = f"bench-ver-{n}-{rnd}-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(redis_url)
    keys = Keys(run=run)
    store = RunStore(client, keys)
    queue = StreamQueue(client, keys, "rollouts", RolloutGroup)
    queue.ensure_group()
    replicas = Replicas(n, run, redis_url, Path(args.work) / "logs")
    try:
        t0 = time.monotonic()
        deadline = t0 + args.timeout
        while len(graded_by_replica(store)) < n:  # every replica has published a heartbeat
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} verifiers did not start")
            replicas.check()
            time.sleep(0.05)
        startup_s = time.monotonic() - t0
        warm = groups[: max(1, args.warm_groups)]
        published = 0
        tag = 0
        while min(graded_by_replica(store) or [0]) < 1:  # every replica graded something
            if time.monotonic() > deadline:
                raise TimeoutError(f"warm-up did not reach all {n} verifiers")
            queue.publish_many([(g, g.group_id) for g in relabel(warm, f"w{tag}")])
            published += len(warm)
            tag += 1
            wait_labeled(client, keys, published, args.timeout, replicas)
            time.sleep(0.6)  # a heartbeat interval, so the counts are fresh
        timed = relabel(groups, "t")
        t1 = time.perf_counter()
        queue.publish_many([(g, g.group_id) for g in timed])
        wait_labeled(client, keys, published + len(timed), args.timeout, replicas)
        seconds = time.perf_counter() - t1
        counters = store.counters()
    finally:
        replicas.stop()
        delete_run(client, run)
        client.close()
    completions = sum(len(g.completions) for g in groups)
    return {
        "replicas": n,
        "round": rnd,
        "groups": len(groups),
        "completions": completions,
        "seconds": seconds,
        "completions_per_s": completions / seconds,
        "startup_s": startup_s,
        "warmup_groups": published,
        "verdicts": {k: v for k, v in counters.items() if k.startswith(VERIFIER_VERDICT_PREFIX)},
    }


def plot(agg: dict[int, dict[str, float]], cores: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(agg)
    base = agg[ns[0]]["completions_per_s"] / ns[0]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ns, [agg[n]["completions_per_s"] for n in ns], "o-", label="measured")
    ax.plot(ns, [base * n for n in ns], "--", color="gray", label="linear from N=1")
    ax.axvline(cores, color="k", lw=0.8, ls=":", label=f"{cores} cores")
    ax.set_xlabel("verifier replicas")
    ax.set_ylabel("completions / s")
    ax.set_xticks(ns)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--groups", type=int, default=500, help="MATH-500 problems (max 500)")
    ap.add_argument("--group-size", type=int, default=8, help="completions per group")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warm-groups", type=int, default=8)
    ap.add_argument("--data", type=Path, default=None, help="default: shared math500.jsonl")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--smoke", action="store_true", help="64 groups, 1 round (< 1 min)")
    ap.add_argument("--json", default=None, help="results file (PNG next to it)")
    args = ap.parse_args()
    if args.smoke:
        args.groups, args.repeats = min(args.groups, 64), 1
    logging.basicConfig(level=logging.WARNING)
    data = args.data or shared_data_dir() / "math500.jsonl"
    if not data.is_file():
        raise SystemExit(f"MATH-500 not found at {data} (pass --data)")
    groups = workload(data, args.groups, args.group_size)
    info = machine()
    load_start = loadavg()
    print(header(info))
    print(
        f"{len(groups)} MATH-500 groups x {args.group_size} completions (half the reference "
        f"answer, half the next problem's), verifier 'math', 1 grading process per replica; "
        f"replicas {args.replicas}, {args.repeats} round(s)"
    )
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="conspo-ver-") as work:
        args.work = work
        with reachable_or_local(args.redis_url) as redis_url:
            for rnd in range(args.repeats):
                for n in args.replicas:
                    r = measure(n, groups, args, redis_url, rnd)
                    results.append(r)
                    print(
                        f"  round {rnd + 1}: {n} replica(s) {r['completions_per_s']:,.0f} "
                        f"completions/s",
                        flush=True,
                    )
    agg: dict[int, dict[str, float]] = {}
    for n in args.replicas:
        rates = [r["completions_per_s"] for r in results if r["replicas"] == n]
        agg[n] = {"completions_per_s": statistics.median(rates), "all": rates}
    first = min(agg)
    one = agg[first]["completions_per_s"] / first
    rows = []
    for n in sorted(agg):
        eff = agg[n]["completions_per_s"] / (n * one)
        agg[n]["efficiency"] = eff
        agg[n]["speedup"] = agg[n]["completions_per_s"] / agg[first]["completions_per_s"]
        rows.append(
            [
                n,
                f"{agg[n]['completions_per_s']:,.0f}",
                " ".join(f"{x:,.0f}" for x in agg[n]["all"]),
                f"{agg[n]['speedup']:.2f}x",
                f"{eff:.0%}",
            ]
        )
    print(f"\n{info['cpus']} cores")
    print(table(rows, ["replicas", "completions/s", "per round", "vs 1", "scaling efficiency"]))
    verdicts = results[-1]["verdicts"]
    print(f"verdicts of the last run (warm-up included): {verdicts}")
    json_path, png_path = result_paths(args.json, "verifier_throughput")
    plot(agg, int(info["cpus"] or 1), png_path)
    payload = {
        "machine": info,
        "cores": info["cpus"],
        "load_start": load_start,
        "load_end": loadavg(),
        "wall_s": time.monotonic() - started,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "replicas": {str(n): a for n, a in agg.items()},
        "runs": results,
        "png": str(png_path),
    }
    write_json(json_path, "verifier_throughput", payload)
    print(f"raw numbers: {json_path}\nplot: {png_path}")
    summary(
        f"{info['cpus']} cores: "
        + "; ".join(
            f"{n} replica(s) {a['completions_per_s']:,.0f} completions/s "
            f"(efficiency {a['efficiency']:.0%})"
            for n, a in sorted(agg.items())
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
