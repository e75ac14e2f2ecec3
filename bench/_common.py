"""Shared bits of the benchmark scripts: machine description, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in model.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def describe(info: dict[str, Any]) -> str:
    gpu = info.get("gpu", "no GPU")
    return f"{info['cpus']} cores ({info['cpu']}), {gpu}, python {info['python']}, {info['date']}"


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_json(path: str | Path | None, name: str, payload: dict[str, Any]) -> Path:
    target = Path(path) if path else RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, default=str))
    return target


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- additions for the pipeline / learning benchmarks (async_vs_sync, objectives, vs_trl,
# verifier_throughput, run_all) -------------------------------------------------------------------


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages (the machine is shared: every report states them)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def header(info: dict[str, Any]) -> str:
    """Two lines every new script prints first: the machine and its load right now."""
    load = loadavg()
    return f"machine: {describe(info)}\nload average (1/5/15 min) at start: {load}"


def summary(text: str) -> str:
    """The one line ``run_all.py`` collects; printed last by every script."""
    line = f"summary: {text}"
    print(line, flush=True)
    return line


def goal(
    name: str, value: float, target: float, unit: str, *, higher_is_better: bool = True
) -> dict[str, Any]:
    """One entry of a results file's ``goals`` list: a measured figure against its goal (the
    schema ``bench/run_all.py`` reads from every script: name, value, goal, unit,
    higher_is_better)."""
    return {
        "name": name,
        "value": float(value),
        "goal": float(target),
        "unit": unit,
        "higher_is_better": bool(higher_is_better),
    }


def goal_met(entry: dict[str, Any]) -> bool:
    value, target = float(entry["value"]), float(entry["goal"])
    return value >= target if entry.get("higher_is_better", True) else value <= target


def result_paths(json_arg: str | Path | None, name: str) -> tuple[Path, Path]:
    """Where a script writes its JSON and its PNG(s): ``--json PATH`` decides the folder, else
    ``bench/results/``. The PNG sits next to the JSON with the same stem."""
    target = Path(json_arg) if json_arg else RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    return target, target.with_suffix(".png")


def model_path(arg: str | Path | None, task: str | None = None) -> Path:
    """``--model`` or the task's bundled warm-started checkpoint (default: ``arith``'s).

    Exits with a clear message when the folder holds no checkpoint."""
    from conspo.models import default_checkpoint

    path = Path(arg) if arg else Path(default_checkpoint(task))
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"no model checkpoint at {path}: pass --model PATH (a from_pretrained directory, "
            "e.g. one written by `python -m conspo.models.sft --out PATH`)"
        )
    return path


#: The RL settings a benchmark takes (keys of recipe.json's ``rl`` table).
RL_KEYS = ("lr", "group_size", "batch_groups", "temperature", "max_tokens")


def rl_fallback(task: str | None = None) -> dict[str, Any]:
    """A bundled task's RL settings (``conspo.tasks.registry``: what the demo runs with), read
    at run time so the benchmarks follow the demo."""
    from conspo.tasks.registry import get_task

    spec = get_task(task)
    return {
        "lr": spec.rl.lr,
        "group_size": spec.rl.group_size,
        "batch_groups": spec.rl.batch_groups,
        "temperature": spec.rl.temperature,
        "max_tokens": spec.max_tokens,
    }


def rl_hyperparameters(model: Path, task: str | None = None) -> tuple[dict[str, Any], str]:
    """RL hyper-parameters for ``model``: ``recipe.json``'s ``rl`` table (of the model, else of
    the task's bundled checkpoint) over the task's; returns them and where they came from."""
    from conspo.tasks.registry import get_task

    spec = get_task(task)
    fallback = rl_fallback(spec.name)
    for folder in (Path(model), spec.checkpoint):
        recipe = folder / "recipe.json"
        if not recipe.is_file():
            continue
        try:
            rl = json.loads(recipe.read_text()).get("rl")
        except (OSError, ValueError):
            continue
        if isinstance(rl, dict) and rl:
            known = {k: rl[k] for k in RL_KEYS if k in rl}
            return {**fallback, **known}, f"{recipe} (rl)"
    return fallback, f"conspo.tasks.registry ({spec.name}; no rl table in recipe.json)"


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def arith_training_rows(n_train: int | None = 4000) -> list[dict[str, str]]:
    """The first ``n_train`` rows of the demo's training split (``conspo.demo.training_rows``:
    every problem the learner's ``arith`` evaluation does not hold out)."""
    from conspo.demo import training_rows

    rows = training_rows()
    return rows if n_train is None else rows[:n_train]


# -- the pipeline benchmarks (async_vs_sync, vs_trl) run the stack the same way ------------------
def stack_config(
    run: str,
    work: str | Path,
    redis_url: str,
    model: Path,
    hp: dict[str, Any],
    *,
    objective: str,
    steps: int,
    staleness: int,
    seed: int,
    verifiers: int = 2,
    checkpoint_every: int = 10,
    learner_env: dict[str, str] | None = None,
    learner_threads: int | None = None,
    generator_threads: int | None = None,
):
    """The demo's stack (``conspo.launch.StackConfig``) in a fresh folder, no evaluation, no PNG
    redraws (~2 s of CPU per render here: not part of a step), quiet logs."""
    import shutil

    from conspo.launch import StackConfig

    out_dir = Path(work) / run
    shutil.rmtree(out_dir, ignore_errors=True)  # a stale checkpoint there would be resumed
    return StackConfig(
        run=run,
        out_dir=out_dir,
        redis_url=redis_url,
        model_path=model,
        objective=objective,
        steps=steps,
        batch_groups=hp["batch_groups"],
        group_size=hp["group_size"],
        verifiers=verifiers,
        max_staleness=staleness,
        seed=seed,
        lr=hp["lr"],
        temperature=hp["temperature"],
        max_tokens=hp["max_tokens"],
        eval_every=0,
        checkpoint_every=checkpoint_every,
        log_level="WARNING",
        learner_threads=learner_threads,
        generator_threads=generator_threads,
        env={"learner": {"CONSPO_PLOT_EVERY": "0", **(learner_env or {})}},
    )


def final_accounting(cfg: Any) -> dict[str, int]:
    """Where every submitted prompt went, read after ``stop()`` (which closes the stack's own
    client); the run's keys are deleted afterwards."""
    from conspo.launch import LocalStack
    from conspo.testing import delete_run

    after = LocalStack(cfg)
    try:
        accounting = after.accounting()
        delete_run(after.client, cfg.run)
    finally:
        after.client.close()
    return accounting


def train_records(path: Path) -> list[dict[str, Any]]:
    """The learner's per-step records (``kind == "train"``) of a ``metrics.jsonl``, by step; a
    torn last line (a learner killed mid-write) is skipped."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "train":
                out.append(rec)
    return sorted(out, key=lambda r: r["step"])
