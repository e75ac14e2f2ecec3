"""ConSPO vs GRPO, Dr.GRPO, DAPO and GSPO on the synthetic task, from the same warm start.

The paper's question (arXiv 2605.12969): does the contrastive sequence-level objective learn
more from the same samples than the GRPO family? Here: held-out greedy accuracy of the tiny
warm-started arithmetic model, 3 seeds per objective, the same number of generated samples for
every run.

Why an in-process synchronous loop and not the pipeline: 15 runs must fit in 15 minutes on 2
cores; 15 stack launches would spend much of that on start-up and, being asynchronous, would
make the schedule (which groups land in which step) depend on process timing rather than on the
seed. The loop keeps what decides the learning dynamics identical to the pipeline:

- sampling: ``conspo.models.sample_groups`` (the ``hf`` generator's sampler), temperature 1,
  behaviour log-probs recorded;
- grading: ``conspo.tasks.arith.score``, the ``arith`` verifier's rule;
- the update: the learner's own ``services.learner.step.Trainer.step`` (the same objective
  registry, denominators, whole-group micro-batches, grad clipping, AdamW and LR schedule), fed
  ``TrainGroup`` objects as the learner builds them; groups whose rewards are all equal are
  skipped, as the learner does (``skip_uninformative``);
- evaluation: greedy pass@1 on the held-out split (``conspo.models.sft.evaluate``, what the
  learner's ``arith`` evaluator computes).

Schedule (the DisCO / ConSPO recipe, ``docs/conspo.md`` section 6): each rollout batch samples
``--rollout-prompts`` (128) prompts x G (8) with the current policy, then ``--updates`` (4)
optimizer steps each take the informative groups of 32 of those prompts. So every optimizer step
costs exactly 32 x 8 = 256 generated samples for every objective, and the ratio-based
objectives really are off-policy by 0-3 updates (with one update per rollout batch their ratios
would be exactly 1, their clipping inactive, and GSPO identical to GRPO).

Hyper-parameters: ``recipe.json``'s ``rl`` table of the checkpoint if present, else the demo's
(lr 2e-4), the same for every objective; each objective keeps its paper's own constants (the
registry defaults: ConSPO tau 10, M 0.01, alpha 0.3; GRPO / Dr.GRPO eps 0.2; DAPO eps 0.2 / 0.28;
GSPO sequence-ratio eps 3e-4 / 4e-4; no KL for any). Not reproduced: DAPO's dynamic sampling
*refill* (it would give DAPO more samples per step; every objective skips all-equal groups
instead) and its soft overlong penalty (the learner does not apply it; answers are <= 4 tokens
of an 8-token budget).

Runs go to ``--workers`` processes (default: one per core, one torch thread each); accuracy does
not depend on that, only the wall time. Usage::

    python bench/objectives.py [--model PATH] [--steps 160] [--seeds 0 1 2] [--smoke]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    header,
    loadavg,
    machine,
    mean_std,
    model_path,
    result_paths,
    rl_hyperparameters,
    summary,
    table,
    write_json,
)

log = logging.getLogger("bench.objectives")
OBJECTIVES = ["conspo", "grpo", "dr_grpo", "dapo", "gspo"]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value,...`` (values parsed as JSON where they can be), e.g.
    ``conspo:kl_constraint=true`` for ConSPO with DisCO's squared-hinge KL trust region."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return name, params


T_CRIT_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (objective, seed) run; executed in a worker process."""
    import torch

    from conspo.models.sampling import sample_groups
    from conspo.models.sft import evaluate, prompt_token_ids
    from conspo.models.tiny import load_policy
    from conspo.tasks.arith import DEFAULT_N_TEST, DEFAULT_SPLIT_SEED, iter_batches, make_split
    from conspo.tasks.arith import score as arith_score
    from services.learner.data import TrainGroup
    from services.learner.distributed import DistContext
    from services.learner.step import TrainConfig, Trainer

    started = time.perf_counter()
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    model, tok = load_policy(job["model"])
    split = make_split(None, DEFAULT_N_TEST, DEFAULT_SPLIT_SEED)
    test = split.test[: job["n_eval"]]
    steps, G, T = job["steps"], job["group_size"], job["temperature"]
    name, params = parse_spec(job["objective"])
    config = TrainConfig(
        objective=name,
        objective_params=params,
        lr=job["lr"],
        total_steps=steps,
        bf16=False,
        log_entropy=False,
    )
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    trainer = Trainer(config, model, DistContext(), pad_id=tok.pad_token_id, dummy_ids=(bos, eos))
    batches = iter_batches(split.train, job["rollout_prompts"], seed=job["seed"])
    per_update = job["rollout_prompts"] // job["updates"]

    eval_s = 0.0

    def held_out() -> float:
        nonlocal eval_s
        t = time.perf_counter()
        acc = evaluate(model, tok, test, greedy=True)
        eval_s += time.perf_counter() - t
        model.train()
        return acc

    curve = [(0, held_out())]
    train_points: list[dict[str, float]] = []
    step = rollout = samples = 0
    while step < steps:
        problems = next(batches)
        ids = prompt_token_ids(tok, problems)
        groups = sample_groups(
            model,
            tok,
            ids,
            n=G,
            temperature=T,
            max_new_tokens=job["max_tokens"],
            seed=job["seed"] * 1_000_003 + rollout,
        )
        rollout += 1
        for u in range(job["updates"]):
            if step >= steps:
                break
            lo, hi = u * per_update, (u + 1) * per_update
            chosen, rewards_seen = [], []
            for i in range(lo, hi):
                rewards = tuple(float(arith_score(s.text, problems[i].answer)) for s in groups[i])
                rewards_seen.extend(rewards)
                if len(set(rewards)) <= 1:
                    continue  # no contrast: the learner skips these (skip_uninformative)
                chosen.append(
                    TrainGroup(
                        group_id=f"r{rollout}-{i}",
                        prompt_ids=tuple(ids[i]),
                        completions=tuple(tuple(s.token_ids) for s in groups[i]),
                        behaviour_logprobs=tuple(tuple(s.logprobs) for s in groups[i]),
                        rewards=rewards,
                        correct=tuple(r > 0 for r in rewards),
                        temperature=T,
                        max_tokens=job["max_tokens"],
                        policy_version=rollout - 1,
                    )
                )
            samples += per_update * G
            loss = float("nan")
            if chosen:
                stats = trainer.step(chosen, step, steps)
                loss = stats.loss
            step += 1
            train_points.append(
                {
                    "step": step,
                    "reward": sum(rewards_seen) / max(1, len(rewards_seen)),
                    "informative": len(chosen) / per_update,
                    "loss": loss,
                }
            )
            if step % job["eval_every"] == 0 or step == steps:
                curve.append((step, held_out()))
    return {
        "objective": job["objective"],
        "seed": job["seed"],
        "curve": curve,
        "train": train_points,
        "samples": samples,
        "wall_s": time.perf_counter() - started,
        "eval_s": eval_s,
    }


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    for step, acc in curve:
        if acc >= target - 1e-12:
            return step
    return None


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Paired difference a - b over seeds: mean, sample std, t statistic, 95% verdict."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, sd = mean_std(diffs)
    n = len(diffs)
    t = mean / (sd / math.sqrt(n)) if n > 1 and sd > 0 else float("nan")
    crit = T_CRIT_95.get(n - 1, 2.0)
    significant = n > 1 and math.isfinite(t) and abs(t) > crit
    return {"diffs": diffs, "mean": mean, "std": sd, "t": t, "t_crit_95": crit, "sig": significant}


def plot(results: list[dict[str, Any]], objectives: list[str], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name in objectives:
        runs = [r for r in results if r["objective"] == name]
        steps = [s for s, _ in runs[0]["curve"]]
        accs = [[a for _, a in r["curve"]] for r in runs]
        mean = [statistics.fmean(col) for col in zip(*accs, strict=True)]
        lo = [min(col) for col in zip(*accs, strict=True)]
        hi = [max(col) for col in zip(*accs, strict=True)]
        (line,) = ax.plot(steps, mean, label=f"{name} (n={len(runs)})")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(target, ls="--", color="k", lw=0.8, label="target (warm start + 10 pts)")
    ax.set_xlabel("optimizer step (256 generated samples each)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title("mean over seeds; band = min..max")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled tiny-arith)")
    ap.add_argument(
        "--objectives",
        nargs="+",
        default=OBJECTIVES,
        help="registry names, or name:key=value,... (e.g. conspo:kl_constraint=true)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=160, help="optimizer steps per run")
    ap.add_argument("--rollout-prompts", type=int, default=128, help="prompts per rollout batch")
    ap.add_argument("--updates", type=int, default=4, help="optimizer steps per rollout batch")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--n-eval", type=int, default=1000, help="held-out problems (max 1000)")
    ap.add_argument("--target-gain", type=float, default=0.10, help="over the warm start")
    ap.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    ap.add_argument("--workers", type=int, default=None, help="default: one per core")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--smoke", action="store_true", help="1 seed, 8 steps (< 2 min)")
    ap.add_argument("--json", default=None, help="results file (PNG next to it)")
    args = ap.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.eval_every, args.n_eval = args.seeds[:1], 8, 4, 200
    if args.rollout_prompts % args.updates:
        raise SystemExit("--rollout-prompts must be a multiple of --updates")
    logging.basicConfig(level=logging.WARNING)
    model = model_path(args.model)
    hp, hp_source = rl_hyperparameters(model)
    if args.lr is not None:
        hp["lr"], hp_source = args.lr, "--lr"
    workers = args.workers or max(1, min(os.cpu_count() or 1, 2))
    info = machine()
    load_start = loadavg()
    print(header(info))
    print(
        f"model {model}; {len(args.objectives)} objectives x seeds {args.seeds}; {args.steps} "
        f"steps of {args.rollout_prompts // args.updates} prompts x G={hp['group_size']} "
        f"(rollout batch {args.rollout_prompts}, {args.updates} updates each); lr {hp['lr']} "
        f"({hp_source}); held-out n={args.n_eval}; {workers} worker(s) x {args.threads} thread(s)"
    )
    jobs = [
        {
            "objective": name,
            "seed": seed,
            "model": str(model),
            "steps": args.steps,
            "rollout_prompts": args.rollout_prompts,
            "updates": args.updates,
            "eval_every": args.eval_every,
            "n_eval": args.n_eval,
            "lr": hp["lr"],
            "group_size": hp["group_size"],
            "temperature": hp["temperature"],
            "max_tokens": hp["max_tokens"],
            "threads": args.threads,
        }
        for seed in args.seeds
        for name in args.objectives
    ]
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(train_one, job): job for job in jobs}
        for fut in cf.as_completed(futures):
            r = fut.result()
            results.append(r)
            print(
                f"  {r['objective']:<8} seed {r['seed']}: {r['curve'][0][1]:.3f} -> "
                f"{r['curve'][-1][1]:.3f} ({r['wall_s']:.0f}s)",
                flush=True,
            )
    wall = time.monotonic() - started
    start_acc = statistics.fmean(r["curve"][0][1] for r in results)
    target = start_acc + args.target_gain
    rows, per_objective = [], {}
    for name in args.objectives:
        runs = sorted((r for r in results if r["objective"] == name), key=lambda r: r["seed"])
        finals = [r["curve"][-1][1] for r in runs]
        bests = [max(a for _, a in r["curve"]) for r in runs]
        late = [statistics.fmean(a for _, a in r["curve"][-3:]) for r in runs]
        reach = [steps_to(r["curve"], target) for r in runs]
        reached = [s for s in reach if s is not None]
        fm, fs = mean_std(finals)
        lm, ls = mean_std(late)
        per_objective[name] = {
            "final": finals,
            "final_mean": fm,
            "final_std": fs,
            "late": late,
            "late_mean": lm,
            "late_std": ls,
            "best": bests,
            "steps_to_target": reach,
            "samples_per_run": runs[0]["samples"],
            "informative_frac": statistics.fmean(
                p["informative"] for r in runs for p in r["train"]
            ),
        }
        rows.append(
            [
                name,
                f"{fm:.3f} ± {fs:.3f}",
                " ".join(f"{x:.3f}" for x in finals),
                f"{lm:.3f} ± {ls:.3f}",
                f"{statistics.fmean(bests):.3f}",
                (
                    f"{statistics.fmean(reached):.0f} ({len(reached)}/{len(runs)})"
                    if reached
                    else f">{args.steps} (0/{len(runs)})"
                ),
                f"{per_objective[name]['informative_frac']:.2f}",
            ]
        )
    print(
        f"\nwarm start {start_acc:.3f}; target {target:.3f}; every run generated "
        f"{results[0]['samples']:,} samples; wall {wall:.0f}s"
    )
    print(
        table(
            rows,
            [
                "objective",
                "final (mean ± sd)",
                "final per seed",
                "last 3 evals",
                "best",
                "steps to target",
                "informative",
            ],
        )
    )
    comparisons = {}
    if "conspo" in per_objective and len(args.seeds) > 1:
        print(
            "\nConSPO minus baseline, mean of the last 3 evaluations, paired by seed (same "
            "data order and sampling seeds):"
        )
        for name in args.objectives:
            if name == "conspo":
                continue
            c = paired(per_objective["conspo"]["late"], per_objective[name]["late"])
            comparisons[name] = c
            verdict = "significant" if c["sig"] else "not significant"
            print(
                f"  vs {name:<8} {c['mean']:+.3f} (sd {c['std']:.3f}; per seed "
                f"{' '.join(f'{d:+.3f}' for d in c['diffs'])}; t={c['t']:.2f}, "
                f"|t|>{c['t_crit_95']} needed: {verdict} at 95%)"
            )
    json_path, png_path = result_paths(args.json, "objectives")
    plot(results, args.objectives, target, png_path)
    payload = {
        "machine": info,
        "load_start": load_start,
        "load_end": loadavg(),
        "wall_s": wall,
        "config": {**vars(args), "model": str(model), "hp": hp, "hp_source": hp_source},
        "warm_start_accuracy": start_acc,
        "target": target,
        "objectives": per_objective,
        "conspo_minus": comparisons,
        "runs": results,
        "png": str(png_path),
    }
    write_json(json_path, "objectives", payload)
    print(f"raw numbers: {json_path}\ncurves: {png_path}")
    best = max(per_objective, key=lambda n: per_objective[n]["late_mean"])
    text = "; ".join(
        f"{n} {v['late_mean']:.3f}±{v['late_std']:.3f}" for n, v in per_objective.items()
    )
    sig = [n for n, c in comparisons.items() if c["sig"]]
    summary(
        f"held-out greedy acc (mean of last 3 evals, {len(args.seeds)} seeds) from "
        f"{start_acc:.3f}: {text}; best {best}; ConSPO differs significantly from: "
        f"{', '.join(sig) if sig else 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
