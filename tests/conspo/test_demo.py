"""`conspo demo`'s configuration: everything task-specific comes from the task registry."""

from __future__ import annotations

import argparse

from conspo.demo import build_config, training_rows
from conspo.demo_args import add_demo_arguments
from conspo.tasks.registry import get_task


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    return parser.parse_args(list(argv))


def test_default_task_is_the_arithmetic_demo(tmp_path):
    cfg = build_config(_args("--out", str(tmp_path)), "redis://x:1/0", tmp_path)
    assert (cfg.run, cfg.eval_set, cfg.max_tokens) == ("demo-s0", "arith", 8)
    assert (cfg.steps, cfg.lr, cfg.batch_groups, cfg.eval_samples) == (200, 1e-4, 32, 500)


def test_chain_task_takes_its_budget_lr_and_eval_set(tmp_path):
    task = get_task("chain")
    cfg = build_config(_args("--task", "chain", "--seed", "2"), "redis://x:1/0", tmp_path)
    assert cfg.run == "demo-chain-s2"
    assert str(cfg.out_dir) == "runs/demo-chain-s2"
    assert (cfg.eval_set, cfg.max_tokens, cfg.lr) == ("chain", task.max_tokens, task.rl.lr)
    assert cfg.eval_samples == task.rl.eval_samples
    assert build_config(_args("--task", "chain", "--steps", "7"), "r", tmp_path).steps == 7


def test_training_rows_are_the_task_training_split():
    rows = training_rows("chain")
    task = get_task("chain")
    assert len(rows) == len(task.split().train)
    held_out = {p.prompt for p in task.test_problems()}
    assert not held_out & {r["prompt"] for r in rows}
    assert training_rows()[0]["prompt"].endswith("=")
