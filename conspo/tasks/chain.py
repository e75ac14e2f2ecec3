"""The scratchpad task: a chain of additions and subtractions, solved one line per step.

Why this task: the arithmetic demo's answers are at most 4 tokens, so every objective learns
it the same way. ConSPO's choices (length-normalised log-likelihood scores, contrast between a
group's positives and its strongest negatives, a margin curriculum) act on long completions of
varying length. Here a completion carries its intermediate steps and ends in a boxed answer
graded by the real ``math`` verifier, so a wrong completion is usually wrong from some middle
step on: its later lines, its length (results of one, two or three digits; skipped or repeated
steps) and its answer all differ from a correct one, not only its last token.

Format (character tokens, so every character is one token)::

    prompt      "47+38-25+16="
    completion  "47+38=85\\n85-25=60\\n60+16=76\\n\\boxed{76}" then EOS

A problem has ``min_operands..max_operands`` operands (3-5 by default: 2-4 steps, completions
of 26-56 tokens with EOS). The first operand is two-digit, the others ``1..max_operand``, and
every running total stays in ``0..max_total`` (0..199): the model never needs a sign or a
fourth digit, so errors come from the arithmetic and the bookkeeping, which is what RL can fix.
The space is far too large to enumerate (about 10^9 problems), so the split is generated: one
seeded ``random.Random`` draws unique problems, the first ``n_test`` are held out and the next
``n_train`` are for training. Drawing more training problems never changes the held-out ones,
and nothing depends on the global RNG or the Python version.

``grade`` is the pipeline's own rule: ``conspo.grading.grade_one`` with the ``math`` verifier
(last ``\\boxed{}``, math-verify's integer comparison), what the verifier service runs; imported
lazily so that building a split does not import math-verify.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = [
    "DEFAULT_N_TEST",
    "DEFAULT_N_TRAIN",
    "DEFAULT_SPEC",
    "DEFAULT_SPLIT_SEED",
    "ChainProblem",
    "ChainSpec",
    "ChainSplit",
    "grade",
    "make_problem",
    "make_split",
    "sample_problem",
]

#: The verifier (``conspo.grading`` registry name) the pipeline grades this task with.
VERIFIER = "math"


class ChainProblem(BaseModel):
    """One problem: the prompt, the gold answer, and the scratchpad the warm start imitates."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    answer: str
    solution: str

    @property
    def target(self) -> str:
        """The supervised completion (EOS is added by the trainer)."""
        return self.solution

    def messages(self) -> list[dict[str, str]]:
        """The prompt as a one-message chat (for the chat-template route)."""
        return [{"role": "user", "content": self.prompt}]


class ChainSpec(BaseModel):
    """The problem distribution (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    min_operands: int = 3
    max_operands: int = 5
    max_operand: int = 99
    max_total: int = 199

    @model_validator(mode="after")
    def _sane(self) -> ChainSpec:
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError("need 2 <= min_operands <= max_operands")
        if self.max_operand < 10 or self.max_total < 99:
            raise ValueError("need max_operand >= 10 and max_total >= 99")
        return self


DEFAULT_SPEC = ChainSpec()

#: The split every component agrees on (warm start, demo, learner evaluation, benchmark).
DEFAULT_SPLIT_SEED = 0
DEFAULT_N_TEST = 1000
DEFAULT_N_TRAIN = 20_000


class ChainSplit(NamedTuple):
    train: list[ChainProblem]
    test: list[ChainProblem]


def make_problem(operands: list[int], ops: list[str]) -> ChainProblem:
    """The problem ``operands[0] ops[0] operands[1] ...`` with its line-by-line solution."""
    if len(ops) != len(operands) - 1 or not ops:
        raise ValueError("need one operator between each pair of operands")
    total = operands[0]
    lines = []
    for op, b in zip(ops, operands[1:], strict=True):
        if op == "+":
            value = total + b
        elif op == "-":
            value = total - b
        else:
            raise ValueError(f"unsupported operator {op!r}")
        lines.append(f"{total}{op}{b}={value}")
        total = value
    prompt = str(operands[0]) + "".join(f"{op}{b}" for op, b in zip(ops, operands[1:], strict=True))
    solution = "\n".join(lines) + f"\n\\boxed{{{total}}}"
    return ChainProblem(prompt=prompt + "=", answer=str(total), solution=solution)


def sample_problem(rng: random.Random, spec: ChainSpec = DEFAULT_SPEC) -> ChainProblem:
    """One random problem whose running totals stay in ``0..spec.max_total``."""
    n = rng.randint(spec.min_operands, spec.max_operands)
    total = rng.randint(10, 99)
    operands, ops = [total], []
    while len(operands) < n:
        op = rng.choice("+-")
        b = rng.randint(1, spec.max_operand)
        value = total + b if op == "+" else total - b
        if 0 <= value <= spec.max_total:  # redraw the step otherwise (always possible)
            operands.append(b)
            ops.append(op)
            total = value
    return make_problem(operands, ops)


def make_split(
    n_train: int | None = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    seed: int = DEFAULT_SPLIT_SEED,
    spec: ChainSpec = DEFAULT_SPEC,
) -> ChainSplit:
    """Disjoint unique problems: the first ``n_test`` drawn are held out, the next
    ``n_train`` train (None: ``DEFAULT_N_TRAIN``). Prefix-stable: a larger ``n_train`` only
    appends problems."""
    if n_train is None:
        n_train = DEFAULT_N_TRAIN
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    rng = random.Random(seed)
    seen: set[str] = set()
    drawn: list[ChainProblem] = []
    while len(drawn) < n_test + n_train:
        problem = sample_problem(rng, spec)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            drawn.append(problem)
    return ChainSplit(train=drawn[n_test:], test=drawn[:n_test])


def grade(completion_text: str, answer: str) -> bool:
    """True when the ``math`` verifier grades the completion correct (the pipeline's rule)."""
    from conspo.grading.grade import grade_one
    from conspo.protocol import Verdict

    return grade_one(completion_text, answer, VERIFIER, _grade_config()).verdict == Verdict.CORRECT


@lru_cache(maxsize=1)
def _grade_config():
    from conspo.grading.config import GradeConfig

    return GradeConfig()
