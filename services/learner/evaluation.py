"""Held-out evaluation: greedy accuracy and sampled avg@k, as the paper reports them.

- ``arith``: the synthetic task's test split (the split every component agrees on, see
  ``conspo.tasks.arith``), first ``eval_samples`` problems, graded by ``arith.score`` (the
  ``arith`` verifier's rule).
- ``math500`` / ``aime24`` / ``amc23``: read in place from ``conspo.paths.shared_data_dir()``,
  prompted with the model's chat template and the Qwen2.5-Math instruction to box the answer,
  graded by the verifier registry's ``math`` verifier (math-verify). The verifier package is
  imported only for these sets.

avg@k is the mean correctness over k samples per problem at ``eval_temperature`` /
``eval_top_p`` (the paper: 0.6 / 0.95); greedy is pass@1 at temperature 0. Sampling uses a
private seeded generator (``sample_groups``), so evaluation never moves the training RNG and a
resumed run evaluates exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from conspo.models.sampling import sample_groups
from conspo.paths import shared_data_dir

log = logging.getLogger(__name__)

MATH_SETS = {"math500": "math500.jsonl", "aime24": "aime24.jsonl", "amc23": "amc23.jsonl"}
MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
ARITH_MAX_TOKENS = 8
MATH_MAX_TOKENS = 1024


@dataclass(frozen=True)
class EvalSet:
    name: str
    prompts: list[str]
    answers: list[str]
    grade: Callable[[str, str], bool]
    max_tokens: int
    chat: bool


def _answer_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def load_eval_set(name: str, n: int, data_dir: Path | None = None) -> EvalSet:
    if name == "arith":
        from conspo.tasks.arith import DEFAULT_N_TEST, DEFAULT_SPLIT_SEED, make_split, score

        test = make_split(0, DEFAULT_N_TEST, DEFAULT_SPLIT_SEED).test[:n]
        return EvalSet(
            name,
            [p.prompt for p in test],
            [p.answer for p in test],
            score,
            ARITH_MAX_TOKENS,
            chat=False,
        )
    if name not in MATH_SETS:
        raise ValueError(f"unknown eval_set {name!r}: use arith, {', '.join(MATH_SETS)}")
    path = (data_dir or shared_data_dir()) / MATH_SETS[name]
    prompts, answers = [], []
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            prompts.append(str(row.get("problem") or row["question"]))
            answers.append(_answer_text(row["answer"]))
            if len(prompts) >= n:
                break
    return EvalSet(name, prompts, answers, _math_grader(), MATH_MAX_TOKENS, chat=True)


def _math_grader() -> Callable[[str, str], bool]:
    from conspo.grading.config import GradeConfig
    from conspo.grading.grade import grade_one
    from conspo.protocol import Verdict

    config = GradeConfig()

    def grade(completion: str, gold: str) -> bool:
        return grade_one(completion, gold, "math", config).verdict == Verdict.CORRECT

    return grade


def prompt_ids(tokenizer: PreTrainedTokenizerBase, eval_set: EvalSet) -> list[list[int]]:
    if eval_set.chat and getattr(tokenizer, "chat_template", None):
        out = []
        for text in eval_set.prompts:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text + MATH_INSTRUCTION}],
                add_generation_prompt=True,
                tokenize=True,
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            out.append(list(ids))
        return out
    suffix = MATH_INSTRUCTION if eval_set.chat else ""
    return [list(ids) for ids in tokenizer([p + suffix for p in eval_set.prompts]).input_ids]


class Evaluator:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eval_set: EvalSet,
        *,
        k: int,
        temperature: float,
        top_p: float,
        max_tokens: int | None,
        seed: int,
        max_batch_rows: int = 1024,
    ) -> None:
        self.tokenizer = tokenizer
        self.set = eval_set
        self.k = k
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens or eval_set.max_tokens
        self.seed = seed
        self.max_batch_rows = max_batch_rows
        self.ids = prompt_ids(tokenizer, eval_set)

    def _accuracy(self, model, *, n: int, temperature: float, top_p: float) -> float:
        groups = sample_groups(
            model,
            self.tokenizer,
            self.ids,
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=self.max_tokens,
            seed=self.seed,
            max_batch_rows=self.max_batch_rows,
        )
        correct = sum(
            self.set.grade(s.text, gold)
            for gold, group in zip(self.set.answers, groups, strict=True)
            for s in group
        )
        return correct / max(1, len(self.ids) * n)

    def run(self, model, step: int) -> dict[str, Any]:
        start = time.perf_counter()
        greedy = self._accuracy(model, n=1, temperature=0.0, top_p=1.0)
        sampled = self._accuracy(model, n=self.k, temperature=self.temperature, top_p=self.top_p)
        return {
            "step": step,
            "set": self.set.name,
            "n": len(self.ids),
            "greedy": greedy,
            f"avg@{self.k}": sampled,
            "temperature": self.temperature,
            "eval_s": time.perf_counter() - start,
        }
