"""The scratchpad task: problems, solutions, split, and grading by the real `math` verifier."""

from __future__ import annotations

import random
import re

import pytest

from conspo.grading.config import GradeConfig
from conspo.grading.grade import grade_one
from conspo.protocol import Verdict
from conspo.tasks.chain import (
    DEFAULT_SPEC,
    ChainSpec,
    grade,
    make_problem,
    make_split,
    sample_problem,
)
from conspo.tasks.registry import get_task

LINE = re.compile(r"(\d+)([+-])(\d+)=(\d+)")


def _value(prompt: str) -> int:
    """Independent evaluation of the prompt (Python's own arithmetic)."""
    assert prompt.endswith("=")
    expr = prompt[:-1]
    assert set(expr) <= set("0123456789+-")
    return eval(expr)  # digits and +/- only, checked above


def test_worked_example():
    p = make_problem([63, 34, 52, 65], ["+", "-", "+"])
    assert p.prompt == "63+34-52+65="
    assert p.answer == "110"
    assert p.solution == "63+34=97\n97-52=45\n45+65=110\n\\boxed{110}"
    assert p.target == p.solution


def test_make_problem_rejects_bad_shapes():
    with pytest.raises(ValueError, match="operator"):
        make_problem([1, 2], [])
    with pytest.raises(ValueError, match="unsupported"):
        make_problem([1, 2], ["*"])
    with pytest.raises(ValueError):
        ChainSpec(min_operands=4, max_operands=3)


def test_sampled_problems_follow_the_spec_and_solve_themselves():
    rng = random.Random(5)
    counts = set()
    for _ in range(3000):
        p = sample_problem(rng)
        assert int(p.answer) == _value(p.prompt)
        lines = p.solution.split("\n")
        assert lines[-1] == f"\\boxed{{{p.answer}}}"
        steps = [LINE.fullmatch(line) for line in lines[:-1]]
        assert all(steps), p.solution
        counts.add(len(steps) + 1)
        first = int(steps[0].group(1))
        assert 10 <= first <= 99
        previous = first
        for m in steps:
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            assert a == previous  # each line starts from the last result
            assert c == (a + b if op == "+" else a - b)
            assert 1 <= b <= DEFAULT_SPEC.max_operand
            assert 0 <= c <= DEFAULT_SPEC.max_total
            previous = c
    assert counts == {3, 4, 5}


def test_completions_are_20_to_64_tokens_and_vary_in_length():
    task = get_task("chain")
    train = task.split().train
    lengths = [len(p.solution) + 1 for p in train]  # one token per character, plus EOS
    assert min(lengths) >= 20
    assert max(lengths) <= task.max_tokens
    assert max(lengths) - min(lengths) >= 25


def test_split_is_disjoint_deterministic_and_prefix_stable():
    a = make_split(500, 200, seed=3)
    b = make_split(800, 200, seed=3)
    assert len(a.train) == 500 and len(a.test) == 200
    assert a.test == b.test
    assert b.train[:500] == a.train
    prompts = [p.prompt for p in b.train + b.test]
    assert len(set(prompts)) == len(prompts)
    assert make_split(500, 200, seed=4).test != a.test
    with pytest.raises(ValueError):
        make_split(-1, 10)


def _slip(solution: str, line: int) -> str:
    """The solution with an arithmetic slip (+1) in step `line`, propagated to the end, as a
    model that got that step wrong would continue."""
    lines = solution.split("\n")[:-1]
    out, carry = [], 0
    for i, text in enumerate(lines):
        a, op, b, c = LINE.fullmatch(text).groups()
        a, c = int(a) + carry, int(c) + carry
        if i == line:
            c, carry = c + 1, carry + 1
        out.append(f"{a}{op}{b}={c}")
    return "\n".join(out) + f"\n\\boxed{{{c}}}"


def _verdict(text: str, gold: str) -> Verdict:
    return grade_one(text, gold, "math", GradeConfig()).verdict


def test_grading_uses_the_math_verifier_on_model_shaped_completions():
    p = make_problem([63, 34, 52, 65], ["+", "-", "+"])
    assert grade(p.solution, p.answer)
    wrong = _slip(p.solution, 0)  # 97 -> 98, then 46, 111
    assert wrong == "63+34=98\n98-52=46\n46+65=111\n\\boxed{111}"
    assert not grade(wrong, p.answer)
    assert _verdict(wrong, p.answer) == Verdict.WRONG
    # A model that stopped mid-way, or ran out of tokens repeating a line: no answer at all.
    cut = "63+34=97\n97-52=45\n45+65=110\n45+65=110\n45+65=1"
    assert not grade(cut, p.answer)
    assert _verdict(cut, p.answer) == Verdict.NO_ANSWER
    # What math-verify's integer rule accepts: leading zeros, spaces, a trailing sentence.
    assert grade("63+34=97\n97-52=45\n45+65=110\n\\boxed{ 0110 }", p.answer)
    assert grade("63+34=97\n\\boxed{3}\n45+65=110\n\\boxed{110}", p.answer)  # the last box
    assert not grade("63+34=97\n97-52=45\n45+65=110\n\\boxed{110}\n\\boxed{7}", p.answer)
    # The final answer is all that is graded: a lucky answer after a wrong step counts.
    assert grade("63+34=98\n98-52=45\n45+65=110\n\\boxed{110}", p.answer)


def test_wrong_completions_differ_before_the_answer_and_in_length():
    rng = random.Random(11)
    earlier, longer = 0, 0
    problems = [sample_problem(rng) for _ in range(300)]
    for p in problems:
        wrong = _slip(p.solution, 0)
        assert not grade(wrong, p.answer)
        first_diff = next(
            i for i, (x, y) in enumerate(zip(wrong, p.solution, strict=False)) if x != y
        )
        earlier += first_diff < p.solution.rindex("\\boxed")
        longer += len(wrong) != len(p.solution)
    assert earlier == len(problems)  # a slip in step 1 shows up in step 1, not only at the end
    assert longer > 0  # e.g. 99 -> 100: the later lines and the answer grow a digit
