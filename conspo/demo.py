"""``conspo demo``: the embedded default, one command on a machine with no GPU and no Docker.

It is ``conspo train`` (``conspo.train``) with the task's bits filled in by ``demo_task``: the
bundled warm-started tiny arithmetic model (or the warm start redone with ``--fresh``), the
task's training split as inline rows, the ``arith`` verifier, an 8-token budget and the
held-out ``arith`` set. Like train, it uses the Redis at ``$CONSPO_REDIS_URL`` / 127.0.0.1:6379
if one answers (else starts a private ``redis-server``), spawns every service as a subprocess,
submits the rows through the REST API, shows live progress and ends with held-out greedy
accuracy before and after, the fate of every submitted prompt, and the path of the
learning-curve PNG. ``--config`` takes the same file as train (``[train]`` or ``[demo]`` table).

The run is a function of its seed: the run name, the data order, the sampling seeds and the
learner's initialisation all derive from it. The asynchronous schedule itself (which groups land
in which step) depends on process timing, so two runs with one seed match in setup, not to the
last bit; ``--max-staleness 0`` makes the schedule synchronous.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from conspo.logs import setup as setup_logging
from conspo.train import print_results, run_training
from conspo.train_config import resolve

# Tuned on a 2-core CPU (docs/benchmarks.md): enough steps for a +15-point gain, under 10 min.
DEFAULTS: dict[str, Any] = {
    "steps": 200,
    "objective": "conspo",
    "verifiers": 2,
    "seed": 0,
    "max_staleness": 1,
    "batch_groups": 32,
    "group_size": 8,
    "lr": 1e-4,
    "temperature": 1.0,
    "eval_every": 25,
    "eval_samples": 500,
    "checkpoint_every": 10,
}


def training_rows() -> list[dict[str, str]]:
    """The task's canonical training split: disjoint from the learner's held-out problems.

    The demo's seed does not pick the problems (that could leak held-out ones into training);
    it shuffles the order in which the api feeds them.
    """
    from conspo.tasks.arith import DEFAULT_N_TEST, DEFAULT_SPLIT_SEED, make_split

    split = make_split(n_train=None, n_test=DEFAULT_N_TEST, seed=DEFAULT_SPLIT_SEED)
    return [{"prompt": p.prompt, "answer": p.answer} for p in split.train]


def demo_task(fresh: bool = False) -> dict[str, Any]:
    """Everything task-specific about the demo, as ``conspo train`` knobs: the bundled model,
    the training rows, the verifier, the token budget and the held-out set."""
    from conspo.models import ensure_checkpoint

    return {
        "model": ensure_checkpoint(None, fresh=fresh),
        "rows": training_rows(),
        "dataset_name": "arith-train",
        "epochs": 10,
        "verifier": "arith",
        "max_tokens": 8,
        "chat": "off",
        "eval": "arith",
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to <out>/summary.json)."""
    task = {**DEFAULTS, **demo_task(fresh=bool(getattr(args, "fresh", False)))}
    cfg, raw = resolve(args, getattr(args, "config", None), task=task, tables=("train", "demo"))
    if cfg.run is None:
        cfg = cfg.model_copy(update={"run": f"demo-s{cfg.seed}"})
    if cfg.quiet:
        cfg = cfg.model_copy(update={"log_level": "WARNING"})
    return run_training(cfg, raw)


def main(args: argparse.Namespace) -> int:
    setup_logging("INFO", service="demo")
    try:
        summary = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: every service was stopped", file=sys.stderr)
        return 130
    return print_results(summary)
