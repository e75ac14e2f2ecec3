"""Groups/s through publish -> read -> ack for a realistic rollout group, against raw XADD.

A group is G=8 completions of 1,024 tokens with behaviour log-probs and ~2 KB of text each
(~82 KB encoded). Rows, all in one run on one Redis:

- raw XADD: the pre-encoded bytes, one XADD per round trip (the redis-benchmark way);
- raw XADD+XREADGROUP+XACK: the same bytes through a consumer group, no encoding;
- conspo publish/read/ack: StreamQueue with msgpack encoding and pydantic validation;
- conspo publish/read/commit: the same, acked through the idempotent Lua commit that also writes
  a small output entry (what a verifier does per group).
- redis-benchmark XADD: the binary itself with a payload of the same size, when installed.

Usage: python bench/queue_throughput.py [--groups N] [--smoke] [--json PATH] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe, machine, table, write_json

from conspo.keys import Keys
from conspo.protocol import Completion, Prompt, RolloutGroup, SamplingParams, encode
from conspo.queue import StreamQueue
from conspo.redis_conn import reachable_or_local
from conspo.testing import delete_run


def realistic_group(i: int, g: int = 8, t: int = 1024) -> RolloutGroup:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16, help="entries per XREADGROUP")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--redis-url", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n = 200 if args.smoke else args.groups
    info = machine()
    groups = [realistic_group(i) for i in range(n)]
    data = encode(groups[0])
    with reachable_or_local(args.redis_url) as url:
        client = redis.Redis.from_url(url)
        run = f"bench-{uuid.uuid4().hex[:8]}"
        raw_key = f"bench:{run}:raw"
        try:
            results = {
                "raw XADD": bench_raw_xadd(client, raw_key, data, n),
            }
            client.delete(raw_key)
            results["raw XADD+XREADGROUP+XACK"] = bench_raw_cycle(
                client, raw_key, data, n, args.batch
            )
            client.delete(raw_key)
            results["conspo publish/read/ack"] = bench_conspo(
                client, run, groups, args.batch, False
            )
            delete_run(client, run)
            results["conspo publish/read/commit"] = bench_conspo(
                client, run, groups, args.batch, True
            )
            rb = bench_redis_benchmark(url, len(data), n)
            if rb is not None:
                results["redis-benchmark XADD (same size)"] = rb
        finally:
            delete_run(client, run)
            client.delete(raw_key)
    base = results["raw XADD"]
    rows = [
        [name, f"{v:,.0f}", f"{v * len(data) / 1e6:,.1f}", f"{v / base:.2f}"]
        for name, v in results.items()
    ]
    print(f"machine: {describe(info)}")
    print(f"group: G=8 x 1,024 tokens, {len(data):,} bytes encoded, {n} groups\n")
    print(table(rows, ["path", "groups/s", "MB/s", "ratio vs raw XADD"]))
    ours = results["conspo publish/read/ack"]
    print(
        f"\nsummary: conspo publish->read->ack {ours:,.0f} groups/s = "
        f"{ours / base:.2f}x raw XADD of the same bytes"
    )
    path = write_json(
        args.json,
        "queue_throughput",
        {
            "machine": info,
            "bytes_per_group": len(data),
            "groups": n,
            "groups_per_s": results,
            "ratio_vs_raw_xadd": {k: v / base for k, v in results.items()},
        },
    )
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
