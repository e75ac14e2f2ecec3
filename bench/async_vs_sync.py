"""Wall time per learner step through the real pipeline: synchronous vs max_staleness 1 and 2.

Every run is the whole stack as ``conspo demo`` runs it (``conspo.launch.LocalStack``: api, one
``hf`` generator, the verifiers and the learner as subprocesses on one Redis, the training split
submitted through the REST API) with the same model, task, objective, step count, batch and
seed; only ``max_staleness`` differs. ``max_staleness=0`` is the synchronous baseline (generate
B groups, verify, train, push, and only then generate again: ``conspo/flow.py``); 1 and 2 let
generation run one or two policy versions ahead.

What is measured, per run:

- steady-state wall time per step: from the learner's per-step records (``metrics.jsonl``, one
  ``time`` stamp per committed step), the first ``--warm`` steps excluded, so process start-up,
  model loading and the first weight-sync rendezvous do not count;
- component times: ``t_train`` = the learner's ``fwd_bwd_s + push_s`` per step; ``t_gen`` = the
  generator's engine seconds (``gen_seconds`` carried by every rollout group, divided among the
  groups of its engine call) times the groups a step consumes (trained + skipped + dropped:
  uninformative groups cost generation too); ``t_verify`` likewise from ``verify_seconds``;
- CPU seconds of every service's process tree during the training window (``/proc``), to show
  who holds the two cores.

Reported: speed-up vs the synchronous run of the same repeat, the ideal overlap ratio
``(t_gen + t_train) / max(t_gen, t_train)`` from the SYNCHRONOUS run's components (measured
when they do not compete for cores), the overlap efficiency achieved / ideal, and the fractions
of consumed groups that were skipped (all-equal rewards) or dropped (too stale).

Runs are interleaved (sync, s1, s2, sync, s1, s2, ...) so that drifting load on a shared machine
hits every mode alike. Usage::

    python bench/async_vs_sync.py [--model PATH] [--steps 60] [--repeats 2] [--smoke]
Redis: ``--redis-url`` or $CONSPO_REDIS_URL if it answers, else a private redis-server.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    arith_training_rows,
    final_accounting,
    header,
    loadavg,
    machine,
    model_path,
    result_paths,
    rl_hyperparameters,
    stack_config,
    summary,
    table,
    train_records,
    write_json,
)

from conspo.launch import LocalStack
from conspo.protocol import LabeledGroup, RolloutGroup
from conspo.queue import StreamQueue
from conspo.redis_conn import reachable_or_local

log = logging.getLogger("bench.async_vs_sync")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- CPU accounting from /proc ---------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds) for every process we can read."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return out


def tree_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process and its live descendants (grading pools, workers)."""
    procs = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for name, root in pids.items():
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            if pid in procs:
                total += procs[pid][1]
            todo.extend(children.get(pid, []))
        out[name] = total
    return out


# -- reading the run back --------------------------------------------------------------------------
def engine_seconds(stack: LocalStack) -> dict[str, float]:
    """Per-group engine seconds of the generator and per-group verify seconds, from the streams
    (``gen_seconds`` is the wall time of the engine call that produced a group, shared by every
    group of that call; ``verify_seconds`` is already per group)."""
    c = stack.client
    read = StreamQueue(c, stack.keys, "rollouts", RolloutGroup).entries()
    rollouts = [e.message for e in read if e.message is not None]
    calls = Counter((g.generator_id, g.gen_seconds) for g in rollouts)
    gen = [g.gen_seconds / calls[(g.generator_id, g.gen_seconds)] for g in rollouts]
    labeled = StreamQueue(c, stack.keys, "labeled", LabeledGroup).entries()
    verify = [e.message.verify_seconds for e in labeled if e.message is not None]
    return {
        "gen_s_per_group": statistics.fmean(gen) if gen else float("nan"),
        "verify_s_per_group": statistics.fmean(verify) if verify else float("nan"),
        "engine_calls": len(calls),
        "groups_generated": len(rollouts),
    }


def steady(records: list[dict[str, Any]], warm: int) -> list[dict[str, Any]]:
    return [r for r in records if r["step"] > warm]


def analyse(records: list[dict[str, Any]], warm: int, streams: dict[str, float]) -> dict[str, Any]:
    win = steady(records, warm)
    if len(win) < 2:
        raise RuntimeError(f"only {len(win)} steady-state steps: raise --steps or lower --warm")
    first = records[warm - 1] if warm >= 1 else records[0]
    per_step = (win[-1]["time"] - first["time"]) / (win[-1]["step"] - first["step"])
    consumed = [r["groups"] + r["skipped"] + r["dropped"] for r in win]
    groups_per_step = statistics.fmean(consumed)
    t_train = statistics.fmean(r["fwd_bwd_s"] + r.get("push_s", 0.0) for r in win)
    total = sum(r["groups"] + r["skipped"] + r["dropped"] for r in records)
    return {
        "steps": len(records),
        "steady_steps": len(win),
        "step_s": per_step,
        "t_train_s": t_train,
        "fwd_bwd_s": statistics.fmean(r["fwd_bwd_s"] for r in win),
        "push_s": statistics.fmean(r.get("push_s", 0.0) for r in win),
        "checkpoint_s": statistics.fmean(r.get("checkpoint_s", 0.0) for r in win),
        "learner_wait_s": statistics.fmean(r.get("wait_s", 0.0) for r in win),
        "groups_per_step": groups_per_step,
        "t_gen_s": streams["gen_s_per_group"] * groups_per_step,
        "t_verify_s": streams["verify_s_per_group"] * groups_per_step,
        "skipped_frac": sum(r["skipped"] for r in records) / max(1, total),
        "dropped_frac": sum(r["dropped"] for r in records) / max(1, total),
        "staleness": dict(
            sum((Counter(r.get("staleness", {})) for r in records), Counter()).most_common()
        ),
        "reward_last": statistics.fmean(
            r["reward_mean"] for r in records[-max(1, len(win) // 3) :]
        ),
        "step_times": [r["time"] - records[0]["time"] for r in records],
        **streams,
    }


# -- one run ---------------------------------------------------------------------------------------
def run_mode(
    staleness: int, rep: int, args: argparse.Namespace, redis_url: str, model: Path, hp: dict
) -> dict[str, Any]:
    run = f"avs-s{staleness}-r{rep}-{uuid.uuid4().hex[:6]}"
    cfg = stack_config(
        run, args.work, redis_url, model, hp,
        objective=args.objective, steps=args.steps, staleness=staleness, seed=args.seed,
        verifiers=args.verifiers, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    out_dir = cfg.out_dir
    stack = LocalStack(cfg)
    t0 = time.monotonic()
    cpu0: dict[str, float] = {}
    cpu1: dict[str, float] = {}
    try:
        stack.start()
        startup_s = time.monotonic() - t0
        pids = {p.name: p.popen.pid for p in stack.procs if p.popen is not None}
        cpu0 = tree_cpu(pids)
        t1 = time.monotonic()
        stack.submit_dataset(arith_training_rows(args.n_train), epochs=100, name="arith")
        stack.wait_finished(timeout=args.timeout, every=0.2)
        train_wall = time.monotonic() - t1
        cpu1 = tree_cpu(pids)
        streams = engine_seconds(stack)
    finally:
        codes = stack.stop()
    accounting = final_accounting(cfg)
    records = train_records(out_dir / run / "metrics.jsonl")
    result = analyse(records, args.warm, streams)
    cpu = {name: cpu1.get(name, 0.0) - cpu0.get(name, 0.0) for name in cpu1}
    by_service: dict[str, float] = {}
    for name, seconds in cpu.items():
        service = name.rsplit("-", 1)[0]
        by_service[service] = by_service.get(service, 0.0) + seconds
    result.update(
        {
            "max_staleness": staleness,
            "repeat": rep,
            "run": run,
            "startup_s": startup_s,
            "train_wall_s": train_wall,
            "cpu_s": by_service,
            "cores_busy": sum(by_service.values()) / max(train_wall, 1e-9),
            "accounting": accounting,
            "exit_codes": codes,
        }
    )
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


# -- report ----------------------------------------------------------------------------------------
def aggregate(
    runs: list[dict[str, Any]], modes: list[int], verifiers: int
) -> dict[int, dict[str, Any]]:
    for r in runs:  # the slowest stage as it ran in the same run: robust to load drift
        r["bound_s"] = max(r["t_gen_s"], r["t_train_s"], r["t_verify_s"] / verifiers)
        r["of_bound"] = r["bound_s"] / r["step_s"]
    out = {}
    for s in modes:
        mine = [r for r in runs if r["max_staleness"] == s]
        keys = [
            "step_s",
            "t_train_s",
            "fwd_bwd_s",
            "push_s",
            "t_gen_s",
            "t_verify_s",
            "groups_per_step",
            "skipped_frac",
            "dropped_frac",
            "cores_busy",
            "reward_last",
            "learner_wait_s",
            "bound_s",
            "of_bound",
        ]
        agg = {k: statistics.fmean(r[k] for r in mine) for k in keys}
        agg["t_verify_wall_s"] = agg["t_verify_s"] / verifiers
        agg["step_s_all"] = [r["step_s"] for r in mine]
        out[s] = agg
    sync = out[0]
    t_gen, t_train = sync["t_gen_s"], sync["t_train_s"]
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    # The verifiers are a pipeline stage too (replicas work in parallel): the 3-stage bound.
    t_ver = sync["t_verify_wall_s"]
    ideal3 = (t_gen + t_ver + t_train) / max(t_gen, t_ver, t_train)
    for s, agg in out.items():
        pairs = [
            sync_r["step_s"] / r["step_s"]
            for r in runs
            if r["max_staleness"] == s
            for sync_r in runs
            if sync_r["max_staleness"] == 0 and sync_r["repeat"] == r["repeat"]
        ]
        agg["speedup"] = statistics.fmean(pairs)
        agg["speedup_all"] = pairs
        agg["ideal"] = ideal
        agg["ideal_3stage"] = ideal3
        agg["efficiency"] = agg["speedup"] / ideal
    return out


def plot(runs: list[dict[str, Any]], agg: dict[int, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {0: "tab:gray", 1: "tab:blue", 2: "tab:green"}
    for r in runs:
        s = r["max_staleness"]
        label = f"max_staleness={s}" if r["repeat"] == 0 else None
        a.plot(
            range(1, len(r["step_times"]) + 1),
            r["step_times"],
            color=colors.get(s, "k"),
            alpha=0.9 if r["repeat"] == 0 else 0.4,
            label=label,
        )
    a.set_xlabel("learner step")
    a.set_ylabel("seconds since step 1")
    a.set_title("step completion time")
    a.legend()
    sync = agg[0]
    names = ["sync: components", *[f"s={s}" for s in agg if s != 0]]
    gen, train, ver = sync["t_gen_s"], sync["t_train_s"], sync["t_verify_wall_s"]
    other = max(0.0, sync["step_s"] - gen - train - ver)
    b.bar(names[0], gen, color="tab:orange", label="t_gen (engine)")
    b.bar(names[0], train, bottom=gen, color="tab:purple", label="t_train (fwd/bwd+push)")
    b.bar(names[0], ver, bottom=gen + train, color="tab:cyan", label="t_verify / replicas")
    b.bar(names[0], other, bottom=gen + train + ver, color="lightgray", label="other (queues)")
    for s in [s for s in agg if s != 0]:
        b.bar(f"s={s}", agg[s]["step_s"], color=colors.get(s, "k"))
    b.axhline(max(gen, train), ls="--", color="k", lw=1, label="max(t_gen, t_train)")
    b.set_ylabel("seconds per step")
    b.set_title("steady-state step time")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled tiny-arith)")
    ap.add_argument("--objective", default="conspo")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warm", type=int, default=None, help="steps excluded as start-up")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--verifiers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=900.0, help="per run")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--work", default=None, help="run folders (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (logs, metrics)")
    ap.add_argument("--smoke", action="store_true", help="6 steps, 1 repeat (< 2 min)")
    ap.add_argument("--json", default=None, help="results file (PNG next to it)")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.repeats = min(args.steps, 6), 1
    if args.warm is None:
        args.warm = 2 if args.smoke else max(3, args.steps // 10)
    if 0 not in args.staleness:
        args.staleness = [0, *args.staleness]
    logging.basicConfig(level=logging.WARNING)
    model = model_path(args.model)
    hp, hp_source = rl_hyperparameters(model)
    info = machine()
    load_start = loadavg()
    print(header(info))
    print(
        f"model {model}; objective {args.objective}; {args.steps} steps of B={hp['batch_groups']} "
        f"informative groups x G={hp['group_size']}, lr {hp['lr']} ({hp_source}); "
        f"{args.verifiers} verifiers; seed {args.seed}; {args.repeats} repeat(s), first "
        f"{args.warm} steps excluded"
    )
    started = time.monotonic()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="conspo-avs-")
        args.work = tmp.name
    runs: list[dict[str, Any]] = []
    try:
        with reachable_or_local(args.redis_url) as redis_url:
            for rep in range(args.repeats):
                for s in args.staleness:
                    r = run_mode(s, rep, args, redis_url, model, hp)
                    print(
                        f"  run {rep + 1}/{args.repeats} max_staleness={s}: "
                        f"{r['step_s']:.3f} s/step, lost {r['accounting']['lost']}",
                        flush=True,
                    )
                    runs.append(r)
    finally:
        if tmp is not None:
            tmp.cleanup()
    agg = aggregate(runs, args.staleness, args.verifiers)
    rows = []
    for s, a in agg.items():
        spread = (
            f" ({min(a['step_s_all']):.3f}-{max(a['step_s_all']):.3f})"
            if len(a["step_s_all"]) > 1
            else ""
        )
        rows.append(
            [
                "sync" if s == 0 else f"async s={s}",
                f"{a['step_s']:.3f}{spread}",
                f"{a['speedup']:.2f}x",
                f"{a['ideal']:.2f}x",
                f"{a['efficiency']:.0%}",
                f"{a['ideal_3stage']:.2f}x",
                f"{a['bound_s']:.3f}",
                f"{a['of_bound']:.0%}",
                f"{a['t_gen_s']:.3f}",
                f"{a['t_train_s']:.3f}",
                f"{a['t_verify_wall_s']:.3f}",
                f"{a['skipped_frac']:.1%}",
                f"{a['dropped_frac']:.1%}",
                f"{a['cores_busy']:.2f}",
                f"{a['reward_last']:.3f}",
            ]
        )
    print()
    print(
        table(
            rows,
            [
                "mode",
                "s/step (range)",
                "speed-up",
                "ideal",
                "efficiency",
                "ideal 3-stage",
                "bound",
                "bound/step",
                "t_gen",
                "t_train",
                "t_verify/M",
                "skipped",
                "dropped",
                "cores busy",
                "reward",
            ],
        )
    )
    sync = agg[0]
    other = sync["step_s"] - sync["t_gen_s"] - sync["t_train_s"]
    print(
        f"\nsynchronous step = t_gen {sync['t_gen_s']:.3f} + t_train {sync['t_train_s']:.3f} "
        f"+ other {other:.3f} s, of which verification {sync['t_verify_wall_s']:.3f} s "
        f"({sync['t_verify_s']:.3f} s of grading over {args.verifiers} replicas); the rest is "
        f"queue hops, polling and checkpoints. Ideal overlap (t_gen + t_train) / max(t_gen, "
        f"t_train) = {sync['ideal']:.2f}x; with verification as a third stage "
        f"{sync['ideal_3stage']:.2f}x. t_* are per step; t_verify/M = grading seconds / replicas."
    )
    print(
        "bound = the slowest stage, max(t_gen, t_train, t_verify/M), measured in the same run; "
        "bound/step = how close a mode gets to it (1 = perfect pipelining; the synchronous "
        "schedule is far from it by design)."
    )
    for s, a in agg.items():
        if s:
            print(
                f"s={s}: under overlap the components slow down (2 cores shared): t_gen "
                f"{a['t_gen_s']:.3f} s (sync {sync['t_gen_s']:.3f}), fwd/bwd "
                f"{a['fwd_bwd_s']:.3f} s (sync {sync['fwd_bwd_s']:.3f})"
            )
    json_path, png_path = result_paths(args.json, "async_vs_sync")
    plot(runs, agg, png_path)
    best = max((s for s in agg if s), key=lambda s: agg[s]["speedup"], default=0)
    payload = {
        "machine": info,
        "load_start": load_start,
        "load_end": loadavg(),
        "wall_s": time.monotonic() - started,
        "config": {**vars(args), "model": str(model), "hp": hp, "hp_source": hp_source},
        "modes": {str(s): a for s, a in agg.items()},
        "runs": runs,
        "png": str(png_path),
    }
    write_json(json_path, "async_vs_sync", payload)
    print(f"raw numbers: {json_path}\ncurves: {png_path}")
    lost = sum(r["accounting"]["lost"] for r in runs)
    summary(
        f"sync {sync['step_s']:.3f} s/step; "
        + "; ".join(
            f"s={s} {a['step_s']:.3f} s/step = {a['speedup']:.2f}x (ideal {a['ideal']:.2f}x, "
            f"eff {a['efficiency']:.0%}, dropped {a['dropped_frac']:.1%})"
            for s, a in agg.items()
            if s
        )
        + f"; best s={best}; lost {lost}"
    )
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
