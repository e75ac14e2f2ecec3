"""Weight-sync throughput: packed push vs one raw broadcast of a flat buffer, same group.

One receiver process (spawned) joins a weight-sync group with this process (rank 0). For each
model the two ranks alternate, ``--pushes`` times each:

- push: ``WeightGroup.broadcast_tensors`` -> ``receive_flat`` (header handshake, votes, packing
  into ~1 GB buckets on the sender, a fresh staging buffer on the receiver; what a generator gets);
- raw: ``pg.broadcast`` of ONE preallocated flat buffer of the same byte size, followed by a
  1-element all-reduce so that, like the push, it is timed until the receiver has everything.

The ratio push/raw is the cost of the protocol, packing and staging over the bare transport.
Models: ``tiny`` (``conspo.models`` demo model, or random tensors of its shapes) and ``0.5b``
(random tensors shaped like Qwen2.5-0.5B: 494M parameters, float32 ~2 GB; ``--big-dtype
bfloat16`` halves it). Received tensors are checked against the sent ones (per-tensor checksums
(SHA-1 of the raw bytes) once per model, outside the timings.

    python bench/weight_sync.py --smoke            # tiny only, < 60 s
    python bench/weight_sync.py --json out.json    # tiny and 0.5b over gloo on CPU
    python bench/weight_sync.py --device cuda      # NCCL (needs 2 GPUs: NCCL refuses 2 ranks
                                                   # on one GPU)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from conspo.protocol import Rendezvous
from conspo.weight_sync.group import (
    DEFAULT_BUCKET_BYTES,
    WeightGroup,
    make_store,
    open_group,
)
from conspo.weight_sync.layout import (
    BufferPool,
    chunk_bounds,
    dtype_from_name,
    dtype_name,
    effective_bucket_bytes,
    layout_of,
    unbucketize,
)

Spec = tuple[str, tuple[int, ...], str]


def qwen25_05b_specs(dtype: str) -> list[Spec]:
    """Parameter shapes of Qwen2.5-0.5B (tied embeddings, so ``lm_head`` is not separate)."""
    vocab, hidden, inter, layers, kv = 151_936, 896, 4_864, 24, 128
    specs: list[Spec] = [("model.embed_tokens.weight", (vocab, hidden), dtype)]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (hidden, hidden), dtype),
            (p + "self_attn.q_proj.bias", (hidden,), dtype),
            (p + "self_attn.k_proj.weight", (kv, hidden), dtype),
            (p + "self_attn.k_proj.bias", (kv,), dtype),
            (p + "self_attn.v_proj.weight", (kv, hidden), dtype),
            (p + "self_attn.v_proj.bias", (kv,), dtype),
            (p + "self_attn.o_proj.weight", (hidden, hidden), dtype),
            (p + "mlp.gate_proj.weight", (inter, hidden), dtype),
            (p + "mlp.up_proj.weight", (inter, hidden), dtype),
            (p + "mlp.down_proj.weight", (hidden, inter), dtype),
            (p + "input_layernorm.weight", (hidden,), dtype),
            (p + "post_attention_layernorm.weight", (hidden,), dtype),
        ]
    specs.append(("model.norm.weight", (hidden,), dtype))
    return specs


def tiny_model_tensors() -> tuple[list[tuple[str, torch.Tensor]], str]:
    """The demo's tiny model if ``conspo.models`` is importable, else its shapes at random."""
    try:
        from conspo.models.tiny import build_tiny_model

        model, _ = build_tiny_model(seed=0)
        return [(n, p.detach()) for n, p in model.named_parameters()], "conspo.models tiny (qwen2)"
    except Exception as exc:  # the bench must not depend on code owned elsewhere
        print(f"(conspo.models unavailable: {exc}; using random tensors of LlamaConfig shapes)")
    hidden, inter, vocab, layers = 128, 512, 64, 2
    specs: list[Spec] = [("model.embed_tokens.weight", (vocab, hidden), "float32")]
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs.append((p + f"self_attn.{name}.weight", (hidden, hidden), "float32"))
        specs += [
            (p + "mlp.gate_proj.weight", (inter, hidden), "float32"),
            (p + "mlp.up_proj.weight", (inter, hidden), "float32"),
            (p + "mlp.down_proj.weight", (hidden, inter), "float32"),
            (p + "input_layernorm.weight", (hidden,), "float32"),
            (p + "post_attention_layernorm.weight", (hidden,), "float32"),
        ]
    specs.append(("model.norm.weight", (hidden,), "float32"))
    return random_tensors(specs, "cpu"), "random, tiny llama shapes"


def random_tensors(specs: list[Spec], device: str) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, shape, dtype in specs:
        t = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype_from_name(dtype))
        out.append((name, t.to(device)))
    return out


def checksums(named: list[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """SHA-1 of each tensor's raw bytes (hashes the memory in place, no copy on CPU)."""
    out = {}
    for name, t in named:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
        out[name] = hashlib.sha1(memoryview(raw.numpy())).hexdigest()
    return out


def raw_broadcast(group: WeightGroup, flat: torch.Tensor, done: torch.Tensor) -> None:
    """The baseline: one torch.distributed broadcast of a flat buffer, then a 1-element
    all-reduce so that it is timed until the receiver has everything (like a push)."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.pg.broadcast([flat], opts).wait()
    group.pg.allreduce([done]).wait()


def receiver(rdv_json: str, specs: list[Spec], pushes: int, device: str, results: mp.Queue) -> None:
    rdv = Rendezvous.model_validate_json(rdv_json)
    template = [(n, torch.empty(s, dtype=dtype_from_name(d))) for n, s, d in specs]
    layout = layout_of(template)
    group = open_group(rdv, 1, 300.0, device if rdv.backend == "nccl" else None)
    dev = group.device
    raw = torch.empty(layout.total_bytes, dtype=torch.uint8, device=dev)
    done = torch.zeros(1, dtype=torch.int64, device=dev)
    pool = BufferPool(2)  # as the subscriber's LocalReceiver does
    try:
        for i in range(pushes):
            flat, _ = group.receive_flat(layout, pool=pool)
            if i == 0:
                results.put(checksums(unbucketize(flat, layout)))
            del flat
            raw_broadcast(group, raw, done)
    finally:
        group.close()


def bench_model(
    label: str,
    named: list[tuple[str, torch.Tensor]],
    *,
    pushes: int,
    bucket_bytes: int,
    backend: str,
    device: str,
    receiver_device: str,
) -> dict:
    layout = layout_of(named)
    specs = [(s.name, s.shape, dtype_name(s.dtype)) for s in layout.specs]
    store = make_store("127.0.0.1", 0, is_master=True, timeout_s=300.0)
    rdv = Rendezvous(
        host="127.0.0.1",
        port=store.port,
        world_size=2,
        epoch=0,
        backend=backend,
        members=["bench-receiver"],
    )
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    proc = ctx.Process(
        target=receiver, args=(rdv.model_dump_json(), specs, pushes, receiver_device, results)
    )
    proc.start()
    t0 = time.perf_counter()
    group = open_group(rdv, 0, 300.0, device if backend == "nccl" else None, store=store)
    join_s = time.perf_counter() - t0
    raw = torch.empty(layout.total_bytes, dtype=torch.uint8, device=group.device)
    done = torch.ones(1, dtype=torch.int64, device=group.device)
    push_s, raw_s = [], []
    pool = BufferPool(2)  # as WeightPublisher does
    try:
        for i in range(pushes):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = group.broadcast_tensors(
                named, layout=layout, bucket_bytes=bucket_bytes, pool=pool
            )
            push_s.append(time.perf_counter() - t0)
            assert result.received == [1], result
            if i == 0:
                got = results.get(timeout=600)
                want = checksums(named)
                if got != want:
                    bad = [n for n in want if got.get(n) != want[n]][:5]
                    raise SystemExit(f"{label}: received tensors differ from sent ones: {bad}")
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            raw_broadcast(group, raw, done)
            if device == "cuda":
                torch.cuda.synchronize()
            raw_s.append(time.perf_counter() - t0)
    finally:
        group.close()
        proc.join(120)
    gb = layout.total_bytes / 1e9
    push_med, raw_med = statistics.median(push_s), statistics.median(raw_s)
    bucket = effective_bucket_bytes(layout.total_bytes, bucket_bytes)
    return {
        "model": label,
        "params": layout.num_params,
        "bytes": layout.total_bytes,
        "dtypes": sorted({dtype_name(s.dtype) for s in layout.specs}),
        "tensors": layout.num_tensors,
        "buckets": len(chunk_bounds(layout.total_bytes, bucket)),
        "bucket_bytes": bucket,
        "backend": backend,
        "join_s": join_s,
        "push_s": push_s,
        "raw_s": raw_s,
        "push_median_s": push_med,
        "raw_median_s": raw_med,
        "push_gbps": gb / push_med,
        "raw_gbps": gb / raw_med,
        "ratio_push_over_raw": push_med / raw_med,
        "verified": True,
    }


def machine_info(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with open("/proc/meminfo") as fh:
        mem = dict(line.split(":", 1) for line in fh)
    info["mem_total_gb"] = round(int(mem["MemTotal"].split()[0]) / 1e6, 1)
    info["mem_available_gb"] = round(int(mem["MemAvailable"].split()[0]) / 1e6, 1)
    with open("/proc/loadavg") as fh:
        info["loadavg"] = fh.read().split()[:3]
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model only (< 60 s)")
    parser.add_argument("--pushes", type=int, default=None, help="timed pushes per model")
    parser.add_argument("--bucket-mb", type=int, default=DEFAULT_BUCKET_BYTES >> 20)
    parser.add_argument("--big-dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    info = machine_info(args.device)
    backend = "nccl" if args.device == "cuda" else "gloo"
    receiver_device = "cpu"
    if args.device == "cuda":
        if torch.cuda.device_count() < 2:
            raise SystemExit("--device cuda needs 2 GPUs (NCCL refuses two ranks on one GPU)")
        receiver_device = "cuda:1"
    print("machine:", json.dumps(info))
    pushes = args.pushes or 3
    bucket_bytes = args.bucket_mb << 20

    models: list[tuple[str, list[tuple[str, torch.Tensor]]]] = []
    tiny, source = tiny_model_tensors()
    models.append((f"tiny ({source})", [(n, t.to(args.device)) for n, t in tiny]))
    if not args.smoke:
        big_dtype = args.big_dtype
        if big_dtype is None:  # sender ~3x and receiver ~2x the model in RAM
            big_dtype = "float32" if info["mem_available_gb"] >= 14 else "bfloat16"
        t0 = time.perf_counter()
        big = random_tensors(qwen25_05b_specs(big_dtype), args.device)
        print(f"(built the 0.5b tensors in {time.perf_counter() - t0:.1f}s)")
        models.append((f"0.5b (Qwen2.5-0.5B shapes, random, {big_dtype})", big))

    rows = []
    for label, named in models:
        row = bench_model(
            label,
            named,
            pushes=pushes,
            bucket_bytes=bucket_bytes,
            backend=backend,
            device=args.device,
            receiver_device=receiver_device,
        )
        rows.append(row)
        print(
            f"\n{row['model']}: {row['params'] / 1e6:.2f}M params, {row['bytes'] / 1e6:.1f} MB, "
            f"{row['tensors']} tensors, {row['buckets']} bucket(s) of <= "
            f"{row['bucket_bytes'] / 1e6:.0f} MB, {backend}, 1 receiver; group formed in "
            f"{row['join_s']:.2f}s (incl. the receiver process start-up)"
        )
        print(f"  {'':6} {'seconds per push':>40}  {'median':>8}  {'GB/s':>7}")
        for kind in ("push", "raw"):
            times = " ".join(f"{t:.4f}" for t in row[f"{kind}_s"])
            print(
                f"  {kind:6} {times:>40}  {row[f'{kind}_median_s']:8.4f}  "
                f"{row[f'{kind}_gbps']:7.3f}"
            )
        print(f"  ratio push/raw (median): {row['ratio_push_over_raw']:.2f}x; received == sent")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": rows}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
