"""The synthetic verifiable task of the embedded demo: two-digit addition and subtraction.

Why this task: it is verifiable by an exact integer comparison, a tiny model can learn it from
scratch in minutes on a CPU, and (measured) a short warm start leaves it at a greedy pass@1 of
20-60% with 65-80% of prompts producing mixed groups (1..7 of 8 correct at temperature 1.0), so
RL has signal and visible headroom. Three-digit problems were too hard for the warm-start
budget (measured by the architecture study). Operands 0..99 (prompts of varying width) rather
than 10..99: with fixed-width operands the RL gain from a comparable warm start was smaller
(+9 vs +12 points in 200 steps).

Format: the prompt is the bare expression with an equals sign (`"12+34="`), the completion is the
integer answer followed by EOS (`"46"`, negatives as `"-7"`). Operands are 0..99 by default, so
the problem space is 100 * 100 * 2 = 20,000 expressions.

The split is a deterministic shuffle of the whole problem space with a seeded `random.Random`
(not the global RNG), held-out problems first: train and test never share a prompt, and the
same seed gives the same split on every machine and Python version.

`score` is the rule of the `arith` verifier: the LAST integer matching `[+-]?\\d+` in the
completion, compared as an int with the gold answer; a completion without an integer is wrong
(no answer). It lives here so the warm start and tests grade exactly like the pipeline.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

_INT_RE = re.compile(r"[+-]?\d+")


class ArithProblem(BaseModel):
    """One problem: the prompt text and the gold answer (an integer as text)."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    answer: str

    @property
    def target(self) -> str:
        """The supervised completion of the warm start: the answer alone (EOS is added)."""
        return self.answer

    def messages(self) -> list[dict[str, str]]:
        """The prompt as a one-message chat (for the chat-template route)."""
        return [{"role": "user", "content": self.prompt}]


class ArithSpec(BaseModel):
    """The problem space: operands in [min_operand, max_operand], the listed operators."""

    model_config = ConfigDict(frozen=True)

    min_operand: int = 0
    max_operand: int = 99
    ops: tuple[str, ...] = ("+", "-")


DEFAULT_SPEC = ArithSpec()

#: The held-out split every component agrees on (warm start, demo, tests): the first
#: `DEFAULT_N_TEST` problems of the space shuffled with `DEFAULT_SPLIT_SEED`.
DEFAULT_SPLIT_SEED = 0
DEFAULT_N_TEST = 1000


class ArithSplit(NamedTuple):
    train: list[ArithProblem]
    test: list[ArithProblem]


def make_problem(a: int, op: str, b: int) -> ArithProblem:
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    else:
        raise ValueError(f"unsupported operator {op!r}")
    return ArithProblem(prompt=f"{a}{op}{b}=", answer=str(value))


def all_problems(spec: ArithSpec = DEFAULT_SPEC) -> list[ArithProblem]:
    """Every problem of the space, in a fixed canonical order."""
    rng = range(spec.min_operand, spec.max_operand + 1)
    return [make_problem(a, op, b) for op in spec.ops for a in rng for b in rng]


def make_split(
    n_train: int | None, n_test: int, seed: int, spec: ArithSpec = DEFAULT_SPEC
) -> ArithSplit:
    """Deterministic disjoint split: `n_test` held-out problems, `n_train` training problems.

    `n_train=None` takes every problem that is not held out. The held-out set depends only on
    (`n_test`, `seed`, `spec`), so growing `n_train` never moves a problem into the test set.
    """
    pool = all_problems(spec)
    random.Random(seed).shuffle(pool)
    if n_test < 0 or n_test > len(pool):
        raise ValueError(f"n_test={n_test} outside [0, {len(pool)}]")
    test = pool[:n_test]
    rest = pool[n_test:]
    if n_train is None:
        n_train = len(rest)
    if n_train < 0 or n_train > len(rest):
        raise ValueError(f"n_train={n_train} outside [0, {len(rest)}] after {n_test} held out")
    return ArithSplit(train=rest[:n_train], test=test)


def iter_batches(
    problems: Sequence[ArithProblem], batch_size: int, seed: int
) -> Iterator[list[ArithProblem]]:
    """Endless batches: reshuffled epochs of `problems` (seeded, independent of global RNG)."""
    if not problems:
        raise ValueError("no problems")
    rng = random.Random(seed)
    order = list(range(len(problems)))
    buffer: list[int] = []
    while True:
        while len(buffer) < batch_size:
            rng.shuffle(order)
            buffer.extend(order)
        batch, buffer = buffer[:batch_size], buffer[batch_size:]
        yield [problems[i] for i in batch]


def extract_answer(completion_text: str) -> int | None:
    """The last integer (`[+-]?\\d+`) in the text, or None when there is none."""
    matches = _INT_RE.findall(completion_text)
    if not matches:
        return None
    try:
        return int(matches[-1])
    except ValueError:  # more digits than int() accepts (sys.get_int_max_str_digits)
        return None


def score(completion_text: str, answer: str) -> bool:
    """True when the last integer of the completion equals the gold answer."""
    value = extract_answer(completion_text)
    return value is not None and value == int(answer)
