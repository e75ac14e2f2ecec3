"""Cost of ConSPO's loss + backward against GRPO's on the same realistic batch.

The batch is vocab-free: token log-probs are a leaf tensor ``[B, T]`` requiring grad (what the
policy's log-softmax gather would hand the objective), so the timing isolates the objective
itself. ConSPO reduces each completion to one score before any group arithmetic, while GRPO
works per token (ratio, clip, min), so ConSPO should cost no more than GRPO.

Runs are interleaved (A, B, A, B, ...) so that drifting machine load hits both objectives
alike; we report medians. Usage::

    python bench/objectives_overhead.py            # full run
    python bench/objectives_overhead.py --smoke    # a few repeats (< 20 s)
    python bench/objectives_overhead.py --all --json bench/results/objectives.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from conspo.objectives import OBJECTIVES, get_objective


def make_batch(batch: int, width: int, group: int, device: torch.device, seed: int = 0):
    """Random completions with realistic ragged lengths and binary rewards, groups of ``group``."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(width // 4, width + 1, (batch,), generator=gen)
    lengths[0] = width
    mask = torch.arange(width)[None, :] < lengths[:, None]
    lp = -2.0 * torch.rand(batch, width, generator=gen)
    old = lp + 0.05 * torch.randn(batch, width, generator=gen)
    rewards = (torch.rand(batch, generator=gen) > 0.5).float()
    group_ids = torch.arange(batch // group).repeat_interleave(group) * 1009 + 17
    return (
        lp.to(device).requires_grad_(),
        mask.to(device),
        rewards.to(device),
        group_ids.to(device),
        old.to(device),
    )


def make_step(name: str, lp, mask, rewards, group_ids, old) -> Callable[[], None]:
    """One loss + backward of objective ``name`` on the shared batch."""
    obj = get_objective(name)
    kwargs = {"old_logprobs": old} if obj.needs_old_logprobs else {}
    if obj.margin_schedule is not None:  # its spec says it takes the curriculum margin
        kwargs["margin"] = 0.01

    def step() -> None:
        lp.grad = None
        loss, _ = obj(lp, mask, rewards, group_ids, **kwargs)
        loss.backward()

    return step


def run(names: list[str], steps: dict, warmup: int, repeats: int, device: torch.device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            sync()
            start = time.perf_counter()
            steps[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny repeats, for CI (< 20 s)")
    parser.add_argument("--all", action="store_true", help="time every registered objective")
    parser.add_argument("--json", type=Path, default=None, help="write raw timings here")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.smoke else 200)
    warmup = args.warmup or (2 if args.smoke else 20)
    names = ["conspo", "grpo"] + ([n for n in OBJECTIVES if n not in ("conspo", "grpo")] * args.all)

    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    }
    config = {
        "batch": args.batch,
        "width": args.width,
        "group": args.group,
        "repeats": repeats,
        "warmup": warmup,
        "smoke": args.smoke,
    }
    print(" | ".join(f"{k}={v}" for k, v in machine.items()))
    print(" | ".join(f"{k}={v}" for k, v in config.items()))

    batch = make_batch(args.batch, args.width, args.group, device)
    steps = {name: make_step(name, *batch) for name in names}
    times = run(names, steps, warmup, repeats, device)

    base = statistics.median(times["grpo"])
    print(f"\n{'objective':<10} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'vs grpo':>8}")
    for name in names:
        med = statistics.median(times[name])
        p10, p90 = quantile(times[name], 0.1), quantile(times[name], 0.9)
        row = f"{med * 1e3:>10.3f} {p10 * 1e3:>8.3f} {p90 * 1e3:>8.3f} {med / base:>8.3f}"
        print(f"{name:<10} {row}")
    ratio = statistics.median(times["conspo"]) / base
    print(
        f"\nSUMMARY conspo/grpo = {ratio:.3f} (loss+backward median "
        f"{statistics.median(times['conspo']) * 1e3:.3f} ms vs {base * 1e3:.3f} ms; "
        f"B={args.batch} T={args.width} G={args.group}, {device}, "
        f"{torch.get_num_threads()} threads)"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine, "config": config, "seconds": times, "ratio": ratio}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"raw timings written to {args.json}")


if __name__ == "__main__":
    main()
