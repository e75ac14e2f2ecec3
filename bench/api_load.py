"""Requests/s and latency of ``POST /v1/prompts`` against the api's goals (issue 18).

Starts what it needs: a Redis (unless one answers at ``--redis-url``) and ``conspo api`` as a
subprocess on a fresh run (auth disabled, no Idempotency-Key: the plain path a client takes),
then drives it with a closed-loop load generator: ``--concurrency`` keep-alive HTTP/1.1
connections, each sending its next request when the previous answer arrived. The generator is
raw asyncio streams (on uvloop when installed), not an HTTP client library, so it costs the
shared cores as little as possible; it checks every status (202) and counts anything else as
an error.

Two shapes, each the median of ``--repeats`` interleaved repeats (req/s, p50, p99):

- single: one prompt per request (goal: >= 1,000 req/s with p99 < 50 ms idle);
- batch: 100 prompts per request (goal: >= 1,000 prompts/s with p99 < 50 ms idle).

With ``--while-training`` the goals are the loaded ones (>= 300 req/s or prompts/s, p99 <
250 ms) and the caller runs the training (e.g. ``conspo demo``) alongside; ``--train`` starts
that demo itself (its own run on the same Redis and cores) and measures once its learner has
logged a step, so the loaded figures are one command too (``run_all.py`` uses it). The results'
``goals`` list names each figure as ``run_all.py``'s ISSUE_GOALS do. ``--url`` points it at an
api that is already running (a demo's) instead of starting one; ``--workers`` sets
``CONSPO_WORKERS`` of the api it starts.

Usage: python bench/api_load.py [--requests N] [--concurrency C] [--repeats R] [--workers W]
       [--while-training | --train] [--url URL] [--smoke] [--json PATH] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe, goal, machine, table, write_json

from conspo.redis_conn import free_port, reachable_or_local
from conspo.testing import delete_run, wait_for

log = logging.getLogger("bench.api_load")
BATCH = 100
GOALS = {  # issue 18: (rate, p99 ms), idle and while the demo trains
    "idle": (1000.0, 50.0),
    "training": (300.0, 250.0),
}


def request_bytes(host: str, body: bytes) -> bytes:
    head = (
        f"POST /v1/prompts HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def bodies(shape: str, n: int) -> list[bytes]:
    """``n`` distinct bodies (distinct texts: nothing is deduplicated), prepared up front."""
    out = []
    for i in range(n):
        if shape == "single":
            doc: dict = {"text": f"What is {i} + 1?", "answer": str(i + 1)}
        else:
            doc = {
                "prompts": [
                    {"text": f"What is {i} * {j}?", "answer": str(i * j)} for j in range(BATCH)
                ]
            }
        out.append(json.dumps(doc).encode())
    return out


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes
) -> bytes:
    """One request on a keep-alive connection; returns the status code."""
    writer.write(req)
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    parts = status_line.split(b" ", 2)
    return parts[1] if len(parts) > 1 else b"none"


async def _load(
    url: str, reqs: list[bytes], concurrency: int, rate: float | None
) -> tuple[float, list[float], list[str]]:
    """Closed loop (``rate`` None: each connection sends when its answer arrived) or open loop
    (request ``i`` is due at ``i / rate``; its latency counts from then, so a server that falls
    behind shows it as latency instead of slowing the load down)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0
    start = time.perf_counter()

    async def connection() -> None:
        nonlocal next_index
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while next_index < len(reqs):
                i = next_index
                next_index += 1
                due = time.perf_counter() if rate is None else start + i / rate
                if rate is not None:
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                status = await _exchange(reader, writer, reqs[i])
                latencies.append(time.perf_counter() - due)
                if status != b"202":
                    errors.append(status.decode(errors="replace"))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    await asyncio.gather(*(connection() for _ in range(min(concurrency, len(reqs)))))
    return time.perf_counter() - start, latencies, errors


def drive(url: str, shape: str, n: int, concurrency: int, rate: float | None = None) -> dict:
    host = urlsplit(url).netloc
    reqs = [request_bytes(host, b) for b in bodies(shape, n)]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    seconds, latencies, errors = runner(_load(url, reqs, concurrency, rate))
    latencies.sort()
    per_request = 1 if shape == "single" else BATCH
    return {
        "requests": n,
        "seconds": seconds,
        "req_per_s": n / seconds,
        "prompts_per_s": n * per_request / seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max_ms": 1000 * latencies[-1],
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
    }


@contextlib.contextmanager
def training_alongside(redis_url: str, timeout_s: float = 300.0) -> Iterator[Path]:
    """``conspo demo`` on its own run (same Redis, same cores), until its learner has logged a
    step; stopped with SIGINT (the demo stops every service it started) when the load is done."""
    out = Path(tempfile.mkdtemp(prefix="api-load-demo-"))
    env = {**os.environ, "CONSPO_REDIS_URL": redis_url}
    cmd = [sys.executable, "-m", "conspo.cli", "demo", "--steps", "100000", "--quiet"]
    cmd += ["--out", str(out), "--seed", str(uuid.uuid4().int % 10_000)]
    with open(out / "demo.log", "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:

        def training() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the demo exited with {proc.returncode} (see {out}/demo.log)")
            return any('"kind": "train"' in p.read_text() for p in out.rglob("metrics.jsonl"))

        if not wait_for(training, timeout=timeout_s, interval=0.5):
            raise RuntimeError(f"the demo did not train within {timeout_s:.0f} s")
        yield out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def api_server(redis_url: str, run: str, workers: int | None) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "CONSPO_REDIS_URL": redis_url,
        "CONSPO_RUN": run,
        "CONSPO_AUTH_DISABLED": "true",
        "CONSPO_PORT": str(port),
        "CONSPO_METRICS_PORT": "0",
        "CONSPO_LOG_LEVEL": "WARNING",
    }
    if workers is not None:
        env["CONSPO_WORKERS"] = str(workers)
    env.pop("CONSPO_API_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "conspo.cli", "api"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"conspo api exited with {proc.returncode}")
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_for(ready, timeout=60):
            raise RuntimeError("conspo api did not become ready in 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _median(rs: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "error_samples"}
    out["errors"] = sum(r["errors"] for r in rs)
    out["error_samples"] = sorted({e for r in rs for e in r["error_samples"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000, help="single-prompt capacity requests")
    ap.add_argument("--batch-requests", type=int, default=200, help="100-prompt capacity requests")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of each at-goal run")
    ap.add_argument("--concurrency", type=int, default=32, help="connections (requests in flight)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="CONSPO_WORKERS of the api")
    ap.add_argument("--while-training", action="store_true", help="judge by the loaded goals")
    ap.add_argument(
        "--train", action="store_true", help="start a demo training alongside (implies the above)"
    )
    ap.add_argument("--url", default=None, help="an api already running (auth disabled)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--redis-url", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    mode = "training" if args.while_training or args.train else "idle"
    rate_goal, p99_goal = GOALS[mode]
    duration = 1.0 if args.smoke else args.duration
    counts = {
        "single": 300 if args.smoke else args.requests,
        "batch": 20 if args.smoke else args.batch_requests,
    }
    goal_rate = {"single": rate_goal, "batch": rate_goal / BATCH}  # requests/s
    repeats = 1 if args.smoke else max(1, args.repeats)
    info = machine()
    runs: dict[str, list[dict]] = {
        f"{shape} {phase}": [] for shape in counts for phase in ("capacity", "at goal")
    }
    run = f"bench-api-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url.rstrip("/")
        else:
            redis_url = stack.enter_context(reachable_or_local(args.redis_url))
            client = redis.Redis.from_url(redis_url)
            stack.callback(delete_run, client, run)
            if args.train:
                stack.enter_context(training_alongside(redis_url))
            url = stack.enter_context(api_server(redis_url, run, args.workers))
        drive(url, "single", min(500, counts["single"]), args.concurrency)  # warm-up
        for _ in range(repeats):  # interleaved: every repeat runs every row once
            for shape, n in counts.items():
                runs[f"{shape} capacity"].append(drive(url, shape, n, args.concurrency))
                n_goal = max(1, int(goal_rate[shape] * duration))
                runs[f"{shape} at goal"].append(
                    drive(url, shape, n_goal, args.concurrency, rate=goal_rate[shape])
                )
    results = {name: _median(rs) for name, rs in runs.items()}
    rows, verdicts, goals = [], [], []
    when = "idle" if mode == "idle" else "while training"
    for shape in counts:
        unit = "req/s" if shape == "single" else "prompts/s"
        capacity, at_goal = results[f"{shape} capacity"], results[f"{shape} at goal"]
        rate = capacity["req_per_s" if shape == "single" else "prompts_per_s"]
        errors = capacity["errors"] + at_goal["errors"]
        met = rate >= rate_goal and at_goal["p99_ms"] < p99_goal and errors == 0
        at_goal["goal"] = {"rate": rate_goal, "unit": unit, "p99_ms": p99_goal, "met": met}
        what = "single prompt" if shape == "single" else f"batches of {BATCH}"
        # A run with errors does not count as meeting the rate goal.
        goals.append(goal(f"API {what} {unit}, {when}", rate if errors == 0 else 0.0, rate_goal,
                          unit))  # fmt: skip
        goals.append(goal(f"API {what} p99, {when}", at_goal["p99_ms"], p99_goal, "ms",
                          higher_is_better=False))  # fmt: skip
        for phase, r in (("capacity", capacity), ("at goal", at_goal)):
            rows.append(
                [
                    f"{'1 prompt' if shape == 'single' else f'{BATCH} prompts'}, {phase}",
                    f"{r['req_per_s']:,.0f}",
                    f"{r['prompts_per_s']:,.0f}",
                    f"{r['p50_ms']:.1f}",
                    f"{r['p99_ms']:.1f}",
                    r["errors"],
                ]
            )
        verdicts.append(
            f"{shape}: {rate:,.0f} {unit} = {rate / rate_goal:.2f}x the {rate_goal:,.0f} goal, "
            f"p99 {at_goal['p99_ms']:.0f} ms at the goal rate (goal < {p99_goal:.0f} ms), "
            f"{errors} errors: {'met' if met else 'NOT met'}"
        )
    print(f"machine: {describe(info)}")
    print(
        f"POST /v1/prompts, {mode}, {args.concurrency} connections, median of {repeats} "
        "interleaved repeats; capacity = closed loop, at goal = open loop at the goal rate "
        f"for {duration:g} s (latency from when each request was due)\n"
    )
    print(table(rows, ["request", "req/s", "prompts/s", "p50 ms", "p99 ms", "errors"]))
    print(f"\nsummary: {mode}: " + "; ".join(verdicts))
    path = write_json(
        args.json,
        "api_load",
        {
            "machine": info,
            "mode": mode,
            "concurrency": args.concurrency,
            "repeats": repeats,
            "goals": goals,
            "results": results,
            "runs": runs,
        },
    )
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
