"""Flags of ``conspo demo`` (kept apart so ``conspo --help`` stays cheap to import)."""

from __future__ import annotations

import argparse

from conspo.tasks.registry import TASKS


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task", default=None, choices=sorted(TASKS), help="bundled task (default: arith)"
    )
    p.add_argument("--steps", type=int, default=None, help="learner steps (default: the task's)")
    p.add_argument(
        "--objective",
        default=None,
        help="a registered objective: conspo (default), grpo, dapo, dr_grpo, disco, gspo, "
        "conspo_linear, conspo_ratio, conspo_nomargin, conspo_fixedmargin, ...",
    )
    p.add_argument("--verifiers", type=int, default=None, help="verifier replicas")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="redo the warm start instead of reusing it")
    p.add_argument("--out", default=None, help="output directory (default runs/demo-<seed>)")
    p.add_argument("--max-staleness", type=int, default=None)
    p.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        default=None,
        help="generation engine (default: CONSPO_BACKEND, else hf; vllm needs `make vllm-env`)",
    )
    p.add_argument("--quiet", action="store_true", help="no live progress display")
