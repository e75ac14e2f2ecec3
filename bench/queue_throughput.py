"""Groups/s through publish -> read -> ack for a realistic rollout group, against raw Redis.

A group is G=8 completions of 512 tokens (``--tokens``) with behaviour log-probs and ~2 KB of
text each. Rows, all in one run on one Redis, each the median of ``--repeats`` interleaved
repeats (every repeat runs every row once, so a noisy neighbour hurts all rows alike):

- raw XADD: the pre-encoded bytes, one XADD per round trip (the redis-benchmark way);
- raw XADD+XREADGROUP+XACK: the same bytes through a consumer group, no encoding: **the
  baseline of the goal** (the same Redis work the queue does, without the layer);
- conspo publish/read/ack: StreamQueue from models to models: encoding, validation, reclaim;
- conspo publish/read/commit: the same, acked through the idempotent Lua commit that also writes
  a small output entry (what a verifier does per group).
- redis-benchmark XADD: the binary itself with a payload of the same size, when installed.

The summary line prints conspo publish/read/ack over raw XADD+XREADGROUP+XACK against the goal
(issue 18: at least 0.5x). It starts a throw-away Redis when none answers at ``--redis-url``.

Usage: python bench/queue_throughput.py [--groups N] [--tokens T] [--repeats R] [--smoke]
       [--json PATH] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe, goal, machine, table, write_json

from conspo.keys import Keys
from conspo.protocol import Completion, Prompt, RolloutGroup, SamplingParams, encode
from conspo.queue import StreamQueue
from conspo.redis_conn import reachable_or_local
from conspo.testing import delete_run

GOAL = 0.5  # issue 18: conspo publish/read/ack over raw XADD+XREADGROUP+XACK


def realistic_group(i: int, g: int = 8, t: int = 512) -> RolloutGroup:
    return RolloutGroup(
        group_id=f"g-{i}",
        prompt=Prompt(prompt_id=f"p-{i}", text="Compute the sum " * 20, answer="42"),
        prompt_token_ids=list(range(200)),
        completions=[
            Completion(
                token_ids=[(j * 31 + k) % 151_000 for k in range(t)],
                logprobs=[-((k % 97) / 10.0) for k in range(t)],
                text="Let us think step by step. " * 75,
                finish_reason="stop",
            )
            for j in range(g)
        ],
        policy_version=1,
        sampling=SamplingParams(n=g, max_tokens=t),
    )


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_raw_xadd(client: redis.Redis, key: str, data: bytes, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        client.xadd(key, {"k": f"g-{i}", "d": data})
    return rate(n, time.perf_counter() - t)


def bench_raw_cycle(client: redis.Redis, key: str, data: bytes, n: int, batch: int) -> float:
    client.xgroup_create(key, "bench", id="0", mkstream=True)
    t = time.perf_counter()
    for i in range(n):
        client.xadd(key, {"k": f"g-{i}", "d": data})
    done = 0
    while done < n:
        reply = client.xreadgroup("bench", "c", {key: ">"}, count=batch)
        ids = [eid for eid, _ in reply[0][1]]
        client.xack(key, "bench", *ids)
        done += len(ids)
    return rate(n, time.perf_counter() - t)


def bench_conspo(
    client: redis.Redis, run: str, groups: list[RolloutGroup], batch: int, commit: bool
) -> float:
    keys = Keys(run=run)
    q = StreamQueue(client, keys, "rollouts", RolloutGroup)
    out = StreamQueue(client, keys, "labeled", Prompt)
    marker = Prompt(prompt_id="done", text="x", answer="y")
    t = time.perf_counter()
    for g in groups:
        q.publish(g, g.group_id)
    done = 0
    while done < len(groups):
        got = q.read("c", count=batch, block_ms=1000)
        if commit:
            for d in got:
                q.commit(d, stage="bench", item=d.key, outputs=[(out, marker, d.key)])
        else:
            q.ack(*got)
        done += len(got)
    return rate(len(groups), time.perf_counter() - t)


def bench_redis_benchmark(url: str, size: int, n: int) -> float | None:
    binary = shutil.which("redis-benchmark")
    if not binary:
        return None
    parsed = redis.connection.parse_url(url)
    payload = "x" * size
    key = f"bench:{uuid.uuid4().hex}"
    proc = subprocess.run(
        [
            binary,
            "-h",
            parsed.get("host", "127.0.0.1"),
            "-p",
            str(parsed.get("port", 6379)),
            "-c",
            "1",
            "-n",
            str(n),
            "-q",
            "--csv",
            "XADD",
            key,
            "*",
            "d",
            payload,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    redis.Redis.from_url(url).delete(key)
    for line in proc.stdout.splitlines():
        parts = [p.strip('"') for p in line.split(",")]
        if len(parts) >= 2:
            try:
                return float(parts[1])
            except ValueError:
                continue
    return None


def one_repeat(
    client: redis.Redis, url: str, groups: list[RolloutGroup], data: bytes, batch: int
) -> dict[str, float]:
    n = len(groups)
    run = f"bench-{uuid.uuid4().hex[:8]}"
    raw_key = f"bench:{run}:raw"
    try:
        results = {"raw XADD": bench_raw_xadd(client, raw_key, data, n)}
        client.delete(raw_key)
        results["raw XADD+XREADGROUP+XACK"] = bench_raw_cycle(client, raw_key, data, n, batch)
        client.delete(raw_key)
        results["conspo publish/read/ack"] = bench_conspo(client, run, groups, batch, False)
        delete_run(client, run)
        results["conspo publish/read/commit"] = bench_conspo(client, run, groups, batch, True)
        rb = bench_redis_benchmark(url, len(data), n)
        if rb is not None:
            results["redis-benchmark XADD (same size)"] = rb
    finally:
        delete_run(client, run)
        client.delete(raw_key)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per completion (G=8)")
    ap.add_argument("--batch", type=int, default=16, help="entries per XREADGROUP")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--redis-url", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n = 200 if args.smoke else args.groups
    repeats = 1 if args.smoke else max(1, args.repeats)
    info = machine()
    groups = [realistic_group(i, t=args.tokens) for i in range(n)]
    data = encode(groups[0])
    runs: list[dict[str, float]] = []
    with reachable_or_local(args.redis_url) as url:
        client = redis.Redis.from_url(url)
        for _ in range(repeats):
            runs.append(one_repeat(client, url, groups, data, args.batch))
    results = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    base = results["raw XADD"]
    cycle = results["raw XADD+XREADGROUP+XACK"]
    rows = [
        [name, f"{v:,.0f}", f"{v * len(data) / 1e6:,.1f}", f"{v / base:.2f}", f"{v / cycle:.2f}"]
        for name, v in results.items()
    ]
    print(f"machine: {describe(info)}")
    print(
        f"group: G=8 x {args.tokens:,} tokens, {len(data):,} bytes encoded, {n} groups, "
        f"median of {repeats} interleaved repeats\n"
    )
    print(table(rows, ["path", "groups/s", "MB/s", "vs raw XADD", "vs raw XADD+XREADGROUP+XACK"]))
    ours = results["conspo publish/read/ack"]
    ratio = ours / cycle
    print(
        f"\nsummary: conspo publish->read->ack {ours:,.0f} groups/s = {ratio:.2f}x raw "
        f"XADD+XREADGROUP+XACK of the same bytes (goal >= {GOAL}x: "
        f"{'met' if ratio >= GOAL else 'NOT met'}); {ours / base:.2f}x a raw XADD"
    )
    path = write_json(
        args.json,
        "queue_throughput",
        {
            "machine": info,
            "bytes_per_group": len(data),
            "tokens": args.tokens,
            "groups": n,
            "repeats": repeats,
            "groups_per_s": results,
            "runs": runs,
            "ratio_vs_raw_xadd": {k: v / base for k, v in results.items()},
            "ratio_vs_raw_cycle": {k: v / cycle for k, v in results.items()},
            "goal": {"ratio_vs_raw_cycle": GOAL, "met": ratio >= GOAL},
            "goals": [goal("queue vs raw Redis (8x512-token groups)", ratio, GOAL, "x")],
        },
    )
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
