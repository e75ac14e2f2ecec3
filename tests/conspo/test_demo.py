"""`conspo demo`'s configuration: everything task-specific comes from the task registry."""

from __future__ import annotations

import argparse

from conspo.demo import DEFAULTS, demo_task, run_name, training_rows
from conspo.demo_args import add_demo_arguments
from conspo.tasks.registry import get_task
from conspo.train_config import prompt_format, resolve


def _config(*argv: str):
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args(list(argv))
    task = {**DEFAULTS, **demo_task(task=args.task)}
    cfg, _ = resolve(args, None, task=task, tables=("train", "demo"))
    return cfg


def test_default_task_is_the_arithmetic_demo():
    cfg = _config()
    assert (cfg.verifier, cfg.eval, cfg.max_tokens, cfg.dataset_name) == (
        "arith",
        "arith",
        8,
        "arith-train",
    )
    assert (cfg.steps, cfg.lr, cfg.batch_groups, cfg.eval_samples) == (200, 1e-4, 32, 500)
    assert cfg.model == get_task("arith").checkpoint
    assert run_name(None, 3) == "demo-s3"


def test_chain_task_takes_its_model_verifier_budget_lr_and_eval_set():
    task = get_task("chain")
    cfg = _config("--task", "chain", "--seed", "2")
    assert (cfg.verifier, cfg.eval, cfg.max_tokens) == ("math", "chain", task.max_tokens)
    assert (cfg.lr, cfg.eval_samples) == (task.rl.lr, task.rl.eval_samples)
    assert cfg.model == task.checkpoint
    fmt = prompt_format(cfg.verifier, True, template=cfg.template, chat=cfg.chat)
    assert fmt.prompt("x", "63+34-52+65=", "110", "math").text == "63+34-52+65="  # bare, as SFT
    assert cfg.rows is not None and len(cfg.rows) == len(task.split().train)
    assert run_name("chain", cfg.seed) == "demo-chain-s2"
    assert _config("--task", "chain", "--steps", "7").steps == 7  # flags beat the task


def test_training_rows_are_the_task_training_split():
    rows = training_rows("chain")
    task = get_task("chain")
    assert len(rows) == len(task.split().train)
    held_out = {p.prompt for p in task.test_problems()}
    assert not held_out & {r["prompt"] for r in rows}
    assert training_rows()[0]["prompt"].endswith("=")
