"""TRL's GRPOTrainer vs this pipeline (GRPO and ConSPO) on the same tiny model, in one run.

Same model directory, reward rule (``conspo.tasks.arith.score``, the ``arith`` verifier's),
training prompts (the demo task's training split, held-out problems excluded), group size G,
prompts per optimizer step, completion budget, temperature, learning rate, optimizer (AdamW,
betas 0.9/0.999, no weight decay, constant LR, grad clip 1.0), no KL, step count. Rows:

- ``trl grpo``: ``trl.GRPOTrainer`` in this process on the CPU: transformers ``generate`` (no
  vLLM), float32, ``num_generations = G``, ``per_device_train_batch_size = B x G`` completions
  (B prompts per step, one optimizer step per generation batch, so it is on-policy),
  ``loss_type="grpo"``, ``beta=0``, ``scale_rewards="group"``, eps 0.2;
- ``pipeline grpo s=0``: the real stack (``LocalStack``: api, generator, 2 verifiers, learner
  as subprocesses, Redis) with ``max_staleness=0``, the synchronous schedule TRL also has;
- ``pipeline grpo s=1`` and ``pipeline conspo s=1``: the stack as deployed (one step of overlap).

The learner is told not to skip all-equal groups here (``CONSPO_SKIP_UNINFORMATIVE=false``), so
that, like TRL, every step trains on exactly B prompts' groups, informative or not: the same
number of generated samples per step for every row. Held-out greedy accuracy is measured by this
script, identically for every row (``conspo.models.sft.evaluate`` on the final weights; for the
pipeline, the learner's final checkpoint).

Mismatches that remain (also printed): the prompt ORDER (TRL's sampler and the api's feeder
shuffle with their own RNGs: the same prompt set, another sequence); the group std (TRL: sample
std + 1e-4; ours: population std + 1e-6); threads (TRL is one process using every core for each
phase in turn; the stack runs ``--learner-threads`` / ``--generator-threads`` torch threads in
those two services, one elsewhere, all in parallel);
the sampler (TRL: ``model.generate``; ours: ``sample_groups``; the same distribution); with
s=1 the pipeline's ratios use behaviour log-probs up to one version old.

Needs the optional ``bench`` extra (``pip install -e '.[bench]'``); without TRL the script exits
with status 2 and says so. Usage::

    python bench/vs_trl.py [--model PATH] [--steps 100] [--repeats 3] [--learner-threads 1]
                           [--generator-threads 1] [--smoke]

The rows run ``--repeats`` times, interleaved (TRL, s=0, s=1, ConSPO s=1, TRL, ...); each
pipeline row is divided by the TRL run of its own repeat, and the table and the results' ``goals``
(issue 18: s=1 >= 1.0x TRL at equal accuracy, s=0 >= 0.8x) give the medians.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    arith_training_rows,
    final_accounting,
    goal,
    goal_met,
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

log = logging.getLogger("bench.vs_trl")
TRL_PIN = "trl==1.16.0"
#: The learner's forward/backward is the step's bottleneck and the only stage whose matrices
#: are big enough to gain from a second thread (docs/benchmarks.md, the per-process profile).
LEARNER_THREADS = 1
#: "Equal held-out accuracy": within this many points of TRL's (the seed spread measured by
#: bench/objectives.py on this task is 1-2 points).
ACCURACY_TOLERANCE_PTS = 2.0


def require_trl() -> str:
    try:
        import trl
    except ImportError:
        print(
            f"vs_trl.py needs TRL, which is not installed. Install the optional bench extra: "
            f"pip install -e '.[bench]'  (or: pip install '{TRL_PIN}' datasets accelerate)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    return trl.__version__


def held_out_accuracy(model: Any, tok: Any, n_eval: int) -> float:
    from conspo.models.sft import evaluate
    from conspo.tasks.arith import DEFAULT_N_TEST, DEFAULT_SPLIT_SEED, make_split

    test = make_split(0, DEFAULT_N_TEST, DEFAULT_SPLIT_SEED).test[:n_eval]
    return evaluate(model, tok, test, greedy=True)


# -- TRL -------------------------------------------------------------------------------------------
def run_trl(args: argparse.Namespace, model_dir: Path, hp: dict, rows: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from conspo.models.tiny import load_policy
    from conspo.tasks.arith import score

    torch.set_num_threads(args.trl_threads)
    t0 = time.perf_counter()
    model, tok = load_policy(model_dir)
    dataset = Dataset.from_list(rows)

    def arith_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [float(score(c, a)) for c, a in zip(completions, answer, strict=True)]

    G, B = hp["group_size"], hp["batch_groups"]
    config = GRPOConfig(
        output_dir=str(Path(args.work) / "trl"),
        max_steps=args.steps,
        per_device_train_batch_size=B * G,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=G,
        max_completion_length=hp["max_tokens"],
        temperature=hp["temperature"],
        top_p=1.0,
        top_k=0,
        learning_rate=hp["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        use_vllm=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=arith_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tok,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # one dict per step on stdout: kept in log_history
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    history = [h for h in trainer.state.log_history if "reward" in h]
    accuracy = held_out_accuracy(trainer.model, tok, args.n_eval)
    return {
        "system": "trl grpo",
        "setup_s": t1 - t0,
        "train_s": t2 - t1,
        "total_s": t2 - t0,
        "steps": int(trainer.state.global_step),
        "samples": int(trainer.state.global_step) * B * G,
        "accuracy": accuracy,
        "reward_curve": [(int(h["step"]), float(h["reward"])) for h in history],
        "threads": args.trl_threads,
    }


# -- the pipeline ----------------------------------------------------------------------------------
def run_pipeline(
    objective: str,
    staleness: int,
    args: argparse.Namespace,
    redis_url: str,
    model_dir: Path,
    hp: dict,
    rows: list[dict],
) -> dict:
    from conspo.launch import LocalStack
    from conspo.models.tiny import load_policy
    from services.learner.checkpoint import CheckpointManager

    run = f"vstrl-{objective}-s{staleness}-{uuid.uuid4().hex[:6]}"
    # Like TRL, every step trains on exactly B prompts' groups, informative or not.
    cfg = stack_config(
        run, args.work, redis_url, model_dir, hp,
        objective=objective, steps=args.steps, staleness=staleness, seed=args.seed,
        learner_env={"CONSPO_SKIP_UNINFORMATIVE": "false"},
        learner_threads=args.learner_threads, generator_threads=args.generator_threads,
    )  # fmt: skip
    out_dir = cfg.out_dir
    stack = LocalStack(cfg)
    t0 = time.monotonic()
    try:
        stack.start()
        t1 = time.monotonic()
        stack.submit_dataset(rows, epochs=100, name="arith")
        stack.wait_finished(timeout=args.timeout, every=0.2)
        t2 = time.monotonic()
    finally:
        stack.stop()
    accounting = final_accounting(cfg)
    records = train_records(out_dir / run / "metrics.jsonl")
    latest = CheckpointManager(out_dir / run / "checkpoints", keep=3).latest()
    if latest is None:
        raise RuntimeError(f"{run}: the learner left no checkpoint")
    model, tok = load_policy(latest.model_dir)
    accuracy = held_out_accuracy(model, tok, args.n_eval)
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    steps = max((r["step"] for r in records), default=0)
    return {
        "system": f"pipeline {objective} s={staleness}",
        "setup_s": t1 - t0,
        "train_s": t2 - t1,
        "total_s": t2 - t0,
        "steps": steps,
        "samples": sum(r["rows"] for r in records),
        "accuracy": accuracy,
        "reward_curve": [(r["step"], r["reward_mean"]) for r in records],
        "accounting": accounting,
        "threads": {"learner": args.learner_threads, "generator": args.generator_threads},
    }


def plot(results: list[dict], acc0: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        xs = [s for s, _ in r["reward_curve"]]
        ys = [v for _, v in r["reward_curve"]]
        k = max(1, len(ys) // 20)  # moving average over ~5% of the run
        smooth = [statistics.fmean(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
        a.plot(xs, smooth, label=r["system"])
    a.set_xlabel("optimizer step")
    a.set_ylabel("training reward (moving avg)")
    a.legend(fontsize=8)
    names = [r["system"].replace("pipeline ", "") for r in results]
    b.bar(names, [r["samples"] / r["train_s"] for r in results], color="tab:blue")
    b.set_ylabel("generated samples / s (training wall)")
    for i, r in enumerate(results):
        b.text(i, 0, f"acc {r['accuracy']:.2f}", ha="center", va="bottom", color="w", fontsize=8)
    b.set_title(f"held-out greedy accuracy at start {acc0:.2f}")
    b.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled tiny-arith)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--trl-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-sync", action="store_true", help="no pipeline grpo s=0 row")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    ap.add_argument(
        "--learner-threads",
        type=int,
        default=LEARNER_THREADS,
        help="torch threads of the pipeline's learner",
    )
    ap.add_argument("--generator-threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900.0, help="per pipeline run")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--work", default=None, help="run folders (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="3 steps, 200 held-out (< 2 min)")
    ap.add_argument("--json", default=None, help="results file (PNG next to it)")
    args = ap.parse_args()
    trl_version = require_trl()
    if args.smoke:
        args.steps, args.n_eval, args.skip_sync = min(args.steps, 3), 200, True
        args.repeats = 1
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "trl", "accelerate", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    from conspo.models.tiny import load_policy
    from conspo.redis_conn import reachable_or_local

    model_dir = model_path(args.model)
    hp, hp_source = rl_hyperparameters(model_dir)
    info = machine()
    info["trl"] = trl_version
    load_start = loadavg()
    print(header(info))
    G, B = hp["group_size"], hp["batch_groups"]
    print(
        f"model {model_dir}; {args.steps} steps x {B} prompts x G={G} = {B * G} samples/step, "
        f"max {hp['max_tokens']} tokens, T={hp['temperature']}, lr {hp['lr']} ({hp_source}); "
        f"TRL {trl_version} with {args.trl_threads} torch threads"
    )
    rows = arith_training_rows(args.n_train)
    torch.set_num_threads(args.trl_threads)
    model, tok = load_policy(model_dir)
    acc0 = held_out_accuracy(model, tok, args.n_eval)
    del model
    started = time.monotonic()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="conspo-vstrl-")
        args.work = tmp.name
    plan = [("grpo", 1), ("conspo", 1)] if args.skip_sync else [("grpo", 0), ("grpo", 1)]
    if not args.skip_sync:
        plan.append(("conspo", 1))
    results: list[dict] = []
    try:
        with reachable_or_local(args.redis_url) as redis_url:
            # Interleaved (trl, s=0, s=1, conspo, trl, ...): drifting load hits every row alike,
            # and each pipeline row is compared with the TRL run of its own repeat.
            for rep in range(args.repeats):
                results.append({**run_trl(args, model_dir, hp, rows), "repeat": rep})
                print(f"  [{rep + 1}/{args.repeats}] trl done: {results[-1]['train_s']:.1f}s",
                      flush=True)  # fmt: skip
                for objective, s in plan:
                    r = run_pipeline(objective, s, args, redis_url, model_dir, hp, rows)
                    results.append({**r, "repeat": rep})
                    print(f"  [{rep + 1}/{args.repeats}] {r['system']} done: "
                          f"{r['train_s']:.1f}s", flush=True)  # fmt: skip
    finally:
        if tmp is not None:
            tmp.cleanup()
    for r in results:
        r["samples_per_s"] = r["samples"] / r["train_s"]
        trl = next(t for t in results if t["system"] == "trl grpo" and t["repeat"] == r["repeat"])
        r["vs_trl"] = r["samples_per_s"] / trl["samples_per_s"]
        r["accuracy_vs_trl"] = r["accuracy"] - trl["accuracy"]
    systems = list(dict.fromkeys(r["system"] for r in results))
    rows_of = {name: [r for r in results if r["system"] == name] for name in systems}
    keys = ("train_s", "total_s", "samples_per_s", "vs_trl", "accuracy", "accuracy_vs_trl")
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in rows_of.items()
    }
    table_rows = []
    for name in systems:
        m, rs = med[name], rows_of[name]
        spread = (
            f" ({min(r['vs_trl'] for r in rs):.2f}-{max(r['vs_trl'] for r in rs):.2f})"
            if len(rs) > 1 and name != "trl grpo"
            else ""
        )
        table_rows.append(
            [
                name,
                rs[0]["steps"],
                f"{m['train_s']:.1f}",
                f"{m['total_s']:.1f}",
                f"{m['samples_per_s']:,.0f}",
                f"{m['vs_trl']:.2f}x{spread}",
                f"{acc0:.3f} -> {m['accuracy']:.3f}",
                f"{m['accuracy'] - acc0:+.3f}",
            ]
        )
    print()
    print(f"median of {args.repeats} interleaved repeat(s); vs trl = per repeat, then median")
    print(
        table(
            table_rows,
            [
                "system",
                "steps",
                "train wall s",
                "incl. start-up s",
                "samples/s",
                "vs trl",
                "held-out greedy",
                "gain",
            ],
        )
    )
    mismatches = [
        "prompt order: same training set, each side shuffles with its own RNG",
        "group std: TRL sample std + 1e-4, pipeline population std + 1e-6",
        f"threads: TRL one process x {args.trl_threads} torch threads (generation and training "
        f"in turn); pipeline learner x {args.learner_threads or 1}, generator x "
        f"{args.generator_threads or 1}, api and verifiers x 1 (all in parallel)",
        "sampler: TRL model.generate, pipeline conspo.models.sample_groups (same distribution)",
        "pipeline s=1: GRPO ratios against behaviour log-probs up to one version old",
        "TRL's own set-up (model load, trainer build) is in 'incl. start-up', like the "
        "pipeline's process start-up",
    ]
    print("\nmismatches not removed:\n  - " + "\n  - ".join(mismatches))
    goals = []
    if "pipeline grpo s=1" in med:
        m = med["pipeline grpo s=1"]
        goals.append(goal("vs TRL samples/s, max_staleness 1", m["vs_trl"], 1.0, "x"))
        goals.append(goal("held-out accuracy vs TRL, max_staleness 1",
                          100 * m["accuracy_vs_trl"], -ACCURACY_TOLERANCE_PTS, "pts"))  # fmt: skip
    if "pipeline grpo s=0" in med:
        goals.append(
            goal("vs TRL samples/s, synchronous (max_staleness 0)",
                 med["pipeline grpo s=0"]["vs_trl"], 0.8, "x")
        )  # fmt: skip
    print()
    for g in goals:
        print(f"goal {g['name']}: {g['value']:.2f} {g['unit']} against {g['goal']:.2f}: "
              f"{'PASS' if goal_met(g) else 'MISS'}")  # fmt: skip
    json_path, png_path = result_paths(args.json, "vs_trl")
    plot([r for r in results if r["repeat"] == 0], acc0, png_path)
    payload = {
        "machine": info,
        "load_start": load_start,
        "load_end": loadavg(),
        "wall_s": time.monotonic() - started,
        "config": {**vars(args), "model": str(model_dir), "hp": hp, "hp_source": hp_source},
        "accuracy_start": acc0,
        "results": results,
        "median": med,
        "goals": goals,
        "mismatches": mismatches,
        "png": str(png_path),
    }
    write_json(json_path, "vs_trl", payload)
    print(f"raw numbers: {json_path}\ncurves: {png_path}")
    summary(
        "; ".join(
            f"{name} {m['samples_per_s']:,.0f} samples/s ({m['vs_trl']:.2f}x trl), "
            f"acc {m['accuracy']:.3f}"
            for name, m in med.items()
        )
        + f" (start {acc0:.3f}, {args.steps} steps, median of {args.repeats})"
    )
    lost = sum(r.get("accounting", {}).get("lost", 0) for r in results)
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
