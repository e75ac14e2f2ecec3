"""Flags of ``conspo train`` and ``conspo eval`` (kept apart so ``conspo --help`` stays cheap).

Every flag defaults to None ("not given"), so ``conspo.train_config`` can tell a flag from a
default and let ``--config``'s ``[train]`` table and service tables fill what was not given.
"""

from __future__ import annotations

import argparse


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_format_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt format (the same for training and evaluation)")
    g.add_argument(
        "--template",
        default=None,
        help="prompt template, {prompt} = the question, {field} = any field "
        "(default for the math verifier: the question + the boxed-answer instruction)",
    )
    g.add_argument("--system-prompt", default=None, help="a system message (prompts become chat)")
    g.add_argument(
        "--chat",
        choices=("auto", "on", "off"),
        default=None,
        help="render prompts with the model's chat template (auto: when it has one)",
    )


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (from_pretrained layout)")
    p.add_argument(
        "--data",
        default=None,
        help="a JSONL file, or a benchmark of ../shared/data/math: "
        "math500, gsm8k, aime24, amc23, minerva_math, olympiadbench",
    )
    d = p.add_argument_group("data fields (for a JSONL file; benchmarks know theirs)")
    d.add_argument("--prompt-field", default=None, help="default: prompt")
    d.add_argument("--answer-field", default=None, help="default: answer")
    d.add_argument("--answer-after", default=None, help="answer follows this marker ('#### ')")
    d.add_argument("--answer-boxed", action="store_true", default=None, help="last \\boxed{}")
    d.add_argument("--answer-join", default=None, help="join a list answer with this")
    d.add_argument("--id-field", default=None)
    d.add_argument("--epochs", type=int, default=None, help="passes over the data (default: auto)")
    add_format_arguments(p)
    p.add_argument("--verifier", default=None, help="math (default), exact, arith, or a plugin")
    p.add_argument("--objective", default=None, help="conspo, grpo, dr_grpo, dapo, gspo, ...")
    p.add_argument("--steps", type=int, default=None, help="learner steps")
    p.add_argument("--backend", choices=("hf", "vllm"), default=None, help="generator engine")
    p.add_argument("--generators", type=int, default=None)
    p.add_argument("--verifiers", type=int, default=None)
    p.add_argument("--batch-groups", type=int, default=None, help="groups per learner step (B)")
    p.add_argument("--group-size", type=int, default=None, help="completions per prompt (G)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="completion token budget")
    p.add_argument("--max-staleness", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval", default=None, help="held-out set: arith or a benchmark name")
    e.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    e.add_argument("--eval-samples", type=int, default=None, help="problems evaluated")
    e.add_argument("--eval-k", type=int, default=None, help="samples per problem (avg@k)")
    e.add_argument("--eval-max-tokens", type=int, default=None)
    t = p.add_argument_group("tracking")
    t.add_argument("--tracking", type=_csv, default=None, help="wandb,tensorboard")
    t.add_argument("--wandb-project", default=None)
    p.add_argument("--out", default=None, help="output folder (default runs/<run>)")
    p.add_argument("--quiet", action="store_true", default=None, help="no live progress")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the bundled tiny model)")
    p.add_argument(
        "--benchmark",
        default="arith",
        help="arith, math500, aime24, amc23, gsm8k, minerva_math, olympiadbench",
    )
    p.add_argument("--k", type=int, default=4, help="samples per problem for avg@k / pass@k")
    p.add_argument("--n", type=int, default=None, help="first N problems (default: all)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=None, help="default: per benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--device", default="auto", help="hf: auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--chunk", type=int, default=None, help="prompts per engine call")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    add_format_arguments(p)
