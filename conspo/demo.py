"""``conspo demo``: the embedded default, one command on a machine with no GPU and no Docker.

It is ``conspo train`` (``conspo.train``) with a bundled task's bits filled in by ``demo_task``
from the task registry (``--task``, default ``arith``; ``conspo.tasks.registry`` holds everything
task-specific): the task's warm-started tiny model (or the warm start redone with ``--fresh``),
its training split as inline rows, its verifier, generation budget and RL settings, and its
held-out set. Like train, it uses the Redis at ``$CONSPO_REDIS_URL`` / 127.0.0.1:6379
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
from conspo.tasks.registry import DEFAULT_TASK, get_task
from conspo.train import print_results, run_training
from conspo.train_config import resolve

# What is not task-specific; the task's ``rl`` table holds the steps, batch, lr and evaluation
# (tuned on a 2-core CPU: docs/benchmarks.md).
DEFAULTS: dict[str, Any] = {
    "objective": "conspo",
    "verifiers": 2,
    "seed": 0,
    "max_staleness": 1,
    "checkpoint_every": 10,
}


def training_rows(task: str | None = None) -> list[dict[str, str]]:
    """The task's canonical training split: disjoint from the learner's held-out problems.

    The demo's seed does not pick the problems (that could leak held-out ones into training);
    it shuffles the order in which the api feeds them.
    """
    return get_task(task).training_rows()


def demo_task(fresh: bool = False, task: str | None = None) -> dict[str, Any]:
    """Everything task-specific about the demo, as ``conspo train`` knobs, from the task
    registry: the bundled model, the training rows, the verifier, the token budget, the RL
    settings and the held-out set."""
    from conspo.models import ensure_checkpoint

    spec = get_task(task)
    return {
        "model": ensure_checkpoint(None, fresh=fresh, task=spec.name),
        "rows": spec.training_rows(),
        "dataset_name": f"{spec.name}-train",
        "epochs": 10,
        "verifier": spec.verifier,
        "max_tokens": spec.max_tokens,
        # The bare problem text, as the warm start saw it: no chat turn, and no math
        # instruction even where the task's verifier is `math` (train adds one by default).
        "chat": "off",
        "template": "",
        "eval": spec.name,
        **spec.rl.model_dump(),
    }


def run_name(task: str | None, seed: int) -> str:
    """``demo-s<seed>`` for the default task, ``demo-<task>-s<seed>`` for the others."""
    name = get_task(task).name
    return f"demo-s{seed}" if name == DEFAULT_TASK else f"demo-{name}-s{seed}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to <out>/summary.json)."""
    name = getattr(args, "task", None)
    task = {**DEFAULTS, **demo_task(fresh=bool(getattr(args, "fresh", False)), task=name)}
    cfg, raw = resolve(args, getattr(args, "config", None), task=task, tables=("train", "demo"))
    if cfg.run is None:
        cfg = cfg.model_copy(update={"run": run_name(name, cfg.seed)})
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
