"""``conspo train``: the whole pipeline on one machine for any model and data, in one command.

It is the embedded stack of ``conspo demo`` with the model, data and settings chosen by the
user: use the Redis at ``$CONSPO_REDIS_URL`` / 127.0.0.1:6379 if one answers (else start a
private ``redis-server``), spawn the api, the generator(s), the verifiers and the learner as
subprocesses (``conspo.launch.LocalStack``), register the data through the REST API (a file is
read by the api from its folder, given to it as a dataset root; a benchmark name resolves to
``../shared/data/math/<name>.jsonl`` with its field mapping), show live progress, and end with
the books (where every prompt went), the final evaluation and where every output is.

When the run ends. The learner finishes at ``steps``. It can also become impossible to reach:
every epoch of the data fed, every prompt generated, graded and read by the learner, and still
no full batch of informative groups (e.g. an untrained model whose rewards are all 0). Then the
command waits up to ``idle_grace_s`` for the learner's own account in ``/v1/status``
(``waiting``), stops the services (the learner checkpoints and acks what it read, so the books
balance) and exits 3 with the reason. While it runs, the progress display shows ``waiting.reason``
whenever the learner publishes one.

Exit status: 0 finished with balanced books; 1 books do not balance (a prompt lost or trained
twice, or a service died); 3 the run ended before ``steps`` (data exhausted, timeout, the
learner stopped on its own); 2 invalid settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from conspo.launch import LocalStack, StackConfig
from conspo.logs import setup as setup_logging
from conspo.redis_conn import reachable_or_local
from conspo.rows import PromptFormat
from conspo.settings import CommonSettings, SettingsError, load
from conspo.state import RunStore
from conspo.train_config import (
    DataPlan,
    TrainConfig,
    has_chat_template,
    plan_data,
    prompt_format,
    resolve,
    service_overrides,
)

log = logging.getLogger("conspo.train")
EXIT_UNBALANCED, EXIT_ENDED_EARLY = 1, 3


class Progress:
    """Live progress: a tqdm bar on a terminal, one line per change otherwise; the learner's
    ``waiting`` reason on a line of its own whenever it is set or changes."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
        self.last = ""
        self.waiting: str | None = None
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, status: dict[str, Any]) -> None:
        if self.quiet:
            return
        self._waiting(status.get("waiting"))
        line = status_line(status)
        if self.bar is not None:
            self.bar.n = min(self.total, int(status.get("step") or 0))
            self.bar.set_postfix_str(line, refresh=True)
        elif line != self.last:
            print(f"step {status.get('step') or 0:>3}/{self.total}  {line}", file=sys.stderr)
        self.last = line

    def _waiting(self, waiting: Any) -> None:
        reason = waiting.get("reason") if isinstance(waiting, dict) else None
        if reason and reason != self.waiting:
            text = f"waiting ({waiting.get('service', '?')}, {waiting.get('code', '?')}): {reason}"
            if self.bar is not None:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)
        self.waiting = reason

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def status_line(status: dict[str, Any]) -> str:
    """Policy version, reward, held-out accuracy, queue depths, staleness."""
    train = status.get("curves", {}).get("train") or [{}]
    evals = status.get("curves", {}).get("eval") or [{}]
    q = status.get("queues", {})
    point = train[-1]
    line = (
        f"v{status.get('policy_version') or 0}"
        f"  reward {point.get('reward_mean', float('nan')):.3f}"
        f"  held-out {_fmt_acc(evals[-1])}"
        f"  queued p/r/l {_depth(q, 'prompts')}/{_depth(q, 'rollouts')}/{_lag(q, 'labeled')}"
        f"  staleness {point.get('staleness_mean', 0.0):.2f}"
    )
    waiting = status.get("waiting")
    if isinstance(waiting, dict) and waiting.get("code"):
        line += f"  waiting: {waiting['code']}"
    return line


def _depth(queues: dict[str, Any], name: str) -> int:
    q = queues.get(name) or {}
    return int(q.get("pending", 0)) + int(q.get("lag", 0))


def _lag(queues: dict[str, Any], name: str) -> int:
    # The learner holds what it trained on until the next checkpoint: not a backlog.
    return int((queues.get(name) or {}).get("lag", 0))


def _fmt_acc(point: dict[str, Any]) -> str:
    acc = greedy(point)
    return "  -  " if acc is None else f"{acc:.1%}"


def greedy(point: dict[str, Any]) -> float | None:
    for key in ("greedy_accuracy", "greedy", "accuracy_greedy"):
        if key in point:
            return float(point[key])
    return None


def drained(status: dict[str, Any], datasets: list[dict[str, Any]]) -> bool:
    """Every dataset fed to its last epoch and every stream read to its end: nothing more
    can reach the learner."""
    if not datasets or any(d.get("state") != "finished" for d in datasets):
        return False
    q = status.get("queues", {})
    return _depth(q, "prompts") == 0 and _depth(q, "rollouts") == 0 and _lag(q, "labeled") == 0


def watch(stack: LocalStack, cfg: TrainConfig, progress: Progress) -> tuple[str, dict | None]:
    """Until the learner finishes or the run cannot go on: (how it ended, last ``waiting``)."""
    deadline = time.monotonic() + cfg.timeout_s
    drained_at: float | None = None
    waiting: dict | None = None
    while not stack.learner_finished():
        stack.check_alive()
        if not stack.find("learner").alive() and not stack.learner_finished():
            return "learner_stopped", waiting  # exited 0 unfinished: its wait_timeout_s
        if time.monotonic() > deadline:
            return "timeout", waiting
        try:
            status = stack.status()
            datasets = stack.datasets()
        except httpx.HTTPError:
            time.sleep(1.0)
            continue
        progress(status)
        now_waiting = status.get("waiting")
        if isinstance(now_waiting, dict):
            waiting = now_waiting
        if drained(status, datasets):
            drained_at = drained_at or time.monotonic()
            if now_waiting or time.monotonic() - drained_at >= cfg.idle_grace_s:
                return "data_exhausted", waiting
        else:
            drained_at = None
        time.sleep(1.0)
    return "finished", waiting


def stack_config(
    cfg: TrainConfig,
    raw: dict[str, Any],
    redis_url: str,
    model: Path,
    fmt: PromptFormat,
    plan: DataPlan,
) -> StackConfig:
    """The ``StackConfig`` of this run: knobs as fields, everything else as service env."""
    env = service_overrides(raw)
    if plan.root is not None:
        roots = json.loads(env["api"].get("CONSPO_DATASET_ROOTS", "[]") or "[]")
        env["api"]["CONSPO_DATASET_ROOTS"] = json.dumps([*roots, str(plan.root)])
    eval_every = cfg.eval_every if cfg.eval_every is not None else max(1, cfg.steps // 4)
    learner = env["learner"]
    if cfg.eval:
        learner["CONSPO_EVAL_SET"] = cfg.eval
        learner["CONSPO_EVAL_K"] = str(cfg.eval_k)
        learner["CONSPO_EVAL_PROMPT_FORMAT"] = fmt.model_dump_json()
        if cfg.eval_max_tokens is not None:
            learner["CONSPO_EVAL_MAX_TOKENS"] = str(cfg.eval_max_tokens)
    if cfg.tracking:
        learner["CONSPO_TRACKING"] = json.dumps(cfg.tracking)
    if cfg.wandb_project:
        learner["CONSPO_WANDB_PROJECT"] = cfg.wandb_project
    own = {"run", "eval_every", "log_level"}  # decided here from the config
    same = (StackConfig.model_fields.keys() & TrainConfig.model_fields.keys()) - own
    return StackConfig(
        **{name: getattr(cfg, name) for name in same},  # the knobs both spell alike
        run=cfg.run_name,
        out_dir=cfg.out_dir,
        redis_url=redis_url,
        model_path=model,
        eval_every=eval_every if cfg.eval else 0,
        log_level="WARNING" if cfg.quiet else cfg.log_level,
        env=env,
    )


def model_folder(cfg: TrainConfig) -> Path:
    if cfg.model is None:
        from conspo.models import ensure_checkpoint

        return ensure_checkpoint(None)
    model = Path(cfg.model).expanduser().resolve()
    if not (model / "config.json").is_file():
        raise SettingsError(
            f"--model {cfg.model}: not a model folder (no config.json; see docs/byo-model.md)"
        )
    return model


def _clear_previous(cfg: TrainConfig) -> None:
    """A fresh run: drop what a previous run of this name left (never anything else)."""
    out = cfg.out_dir
    for path in (out / cfg.run_name, out / "logs"):
        shutil.rmtree(path, ignore_errors=True)
    for name in ("summary.json", "eval.json"):
        (out / name).unlink(missing_ok=True)


def run_training(cfg: TrainConfig, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run it; returns the summary (also written to <out>/summary.json)."""
    from conspo.evaluation import eval_set_names

    if cfg.eval and cfg.eval not in eval_set_names():
        raise SettingsError(f"--eval {cfg.eval}: use one of {', '.join(eval_set_names())}")
    started = time.monotonic()
    model = model_folder(cfg)
    fmt = prompt_format(
        cfg.verifier,
        has_chat_template(model),
        template=cfg.template,
        system_prompt=cfg.system_prompt,
        chat=cfg.chat,
    )
    plan: DataPlan = plan_data(cfg, fmt)
    _clear_previous(cfg)
    with reachable_or_local(load(CommonSettings).redis_url) as redis_url:
        stack_cfg = stack_config(cfg, raw or {}, redis_url, model, fmt, plan)
        stack = LocalStack(stack_cfg)
        log.info(
            "run %s: model %s, data %s, redis %s, logs in %s",
            stack_cfg.run,
            model,
            plan.description,
            redis_url,
            stack.log_dir,
        )
        progress = Progress(cfg.steps, cfg.quiet)
        ended, waiting = "interrupted", None
        try:
            stack.start()
            stack.register_dataset(plan.spec)
            ended, waiting = watch(stack, cfg, progress)
        finally:
            progress.close()
            store = RunStore(stack.client, stack.keys)
            evals = store.series("eval")
            train = store.series("train")
            codes = stack.stop()
        accounting = LocalStack(stack_cfg).accounting()
    run_dir = stack_cfg.out_dir / stack_cfg.run
    summary = {
        "run": stack_cfg.run,
        "model": str(model),
        "data": plan.description,
        "backend": cfg.backend,
        "objective": cfg.objective,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "ended": ended,
        "waiting": waiting,
        "wall_seconds": round(time.monotonic() - started, 1),
        "accuracy_before": greedy(evals[0]) if evals else None,
        "accuracy_after": greedy(evals[-1]) if evals else None,
        "eval": evals,
        "final_eval": evals[-1] if evals else None,
        "final_train": train[-1] if train else {},
        "prompt_format": fmt.model_dump(),
        "accounting": accounting,
        "exit_codes": codes,
        "curves_png": str(run_dir / "curves.png"),
        "where": outputs(cfg, stack_cfg, has_eval=bool(evals)),
    }
    stack_cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if evals:
        (stack_cfg.out_dir / "eval.json").write_text(json.dumps(evals[-1], indent=2))
    (stack_cfg.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def outputs(cfg: TrainConfig, stack_cfg: StackConfig, *, has_eval: bool) -> dict[str, str]:
    """Where the run wrote what (printed at the end, kept in summary.json)."""
    run_dir = stack_cfg.out_dir / stack_cfg.run
    where = {
        "checkpoints": run_dir / "checkpoints",
        "metrics": run_dir / "metrics.jsonl",
        "curves": run_dir / "curves.png",
        "logs": stack_cfg.out_dir / "logs",
        "summary": stack_cfg.out_dir / "summary.json",
    }
    if has_eval:
        where["final_eval"] = stack_cfg.out_dir / "eval.json"
    if "tensorboard" in cfg.tracking:
        where["tensorboard"] = run_dir / "tensorboard"
    if "wandb" in cfg.tracking:
        where["wandb"] = run_dir / "wandb"
    return {name: str(path) for name, path in where.items()}


def print_results(summary: dict[str, Any]) -> int:
    """The lines ``conspo demo`` has always printed; the exit status from the books."""
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    acc = summary["accounting"]
    if before is not None or after is not None:
        print(
            f"\nheld-out greedy accuracy: {_pct(before)} -> {_pct(after)}  "
            f"({summary['objective']}, {summary['backend']}, {summary['steps']} steps, "
            f"{summary['wall_seconds']:.0f}s)"
        )
    print(
        "prompts: submitted {submitted}, generated {generated}, labelled {labelled}, trained "
        "{trained}, skipped {skipped}, dropped {dropped}, dead {dead}, still queued {q}, "
        "lost {lost}, duplicated {duplicated}".format(
            q=acc["queued_prompts"] + acc["queued_rollouts"] + acc["queued_labeled"], **acc
        )
    )
    print(f"learning curves: {summary['curves_png']}")
    return 0 if acc["lost"] == 0 and acc["duplicated"] == 0 else EXIT_UNBALANCED


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def report(summary: dict[str, Any]) -> int:
    """``print_results`` plus how the run ended and where everything is."""
    code = print_results(summary)
    step = summary["final_train"].get("step", 0) if summary["final_train"] else 0
    if summary["ended"] != "finished":
        why = summary["waiting"]["reason"] if summary.get("waiting") else books_reason(summary)
        print(f"the run ended at step {step} of {summary['steps']} ({summary['ended']}): {why}")
        code = code or EXIT_ENDED_EARLY
    for name, path in summary["where"].items():
        if name != "curves":
            print(f"{name.replace('_', ' ')}: {path}")
    return code


def books_reason(summary: dict[str, Any]) -> str:
    """Why no more steps came, from the books, when the learner published no reason."""
    acc = summary["accounting"]
    return (
        f"every prompt was consumed: {acc['trained']} groups trained, {acc['skipped']} skipped "
        f"(equal rewards: no contrast), {acc['dropped']} dropped (stale), {acc['dead']} dead"
    )


def main(args: argparse.Namespace) -> int:
    setup_logging("INFO", service="train")
    cfg, raw = resolve(args, getattr(args, "config", None))
    try:
        summary = run_training(cfg, raw)
    except KeyboardInterrupt:
        print("\ninterrupted: every service was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:  # a service died, the api refused the data
        print(f"conspo train: {exc}", file=sys.stderr)
        return 1
    return report(summary)
