"""The synthetic arithmetic task: problem space, split and the verifier's scoring rule."""

from __future__ import annotations

import pytest

from conspo.tasks.arith import (
    DEFAULT_N_TEST,
    DEFAULT_SPLIT_SEED,
    ArithProblem,
    ArithSpec,
    all_problems,
    extract_answer,
    iter_batches,
    make_split,
    score,
)


def _value(prompt: str) -> int:
    """Independent evaluation of `a<op>b=` (Python's own arithmetic)."""
    assert prompt.endswith("=")
    expr = prompt[:-1]
    assert set(expr) <= set("0123456789+-")
    return eval(expr)  # digits and +/- only, checked above


def test_problem_space_size_and_answers():
    problems = all_problems()
    assert len(problems) == 100 * 100 * 2
    assert len({p.prompt for p in problems}) == len(problems)
    for p in problems[::97]:
        assert int(p.answer) == _value(p.prompt)
    negatives = [p for p in problems if p.answer.startswith("-")]
    assert negatives
    assert all(p.answer == str(int(p.answer)) for p in problems)  # canonical "-7", no "+"


def test_examples_format():
    by_prompt = {p.prompt: p.answer for p in all_problems()}
    assert by_prompt["12+34="] == "46"
    assert by_prompt["3-10="] == "-7"
    assert by_prompt["99+99="] == "198"
    assert by_prompt["0-99="] == "-99"


def test_split_disjoint_sizes_and_deterministic():
    split = make_split(5000, 400, seed=7)
    assert len(split.train) == 5000
    assert len(split.test) == 400
    train = {p.prompt for p in split.train}
    test = {p.prompt for p in split.test}
    assert len(train) == 5000
    assert len(test) == 400
    assert not train & test
    again = make_split(5000, 400, seed=7)
    assert again.train == split.train
    assert again.test == split.test
    other = make_split(5000, 400, seed=8)
    assert other.test != split.test


def test_split_all_remaining_and_test_independent_of_train_size():
    full = make_split(None, DEFAULT_N_TEST, DEFAULT_SPLIT_SEED)
    assert len(full.train) + len(full.test) == 20_000
    assert not {p.prompt for p in full.train} & {p.prompt for p in full.test}
    small = make_split(100, DEFAULT_N_TEST, DEFAULT_SPLIT_SEED)
    assert small.test == full.test


def test_split_rejects_oversized_requests():
    with pytest.raises(ValueError, match="n_train"):
        make_split(19_900, 200, seed=0)
    with pytest.raises(ValueError, match="n_test"):
        make_split(0, 20_001, seed=0)


def test_custom_spec():
    spec = ArithSpec(min_operand=1, max_operand=3, ops=("+",))
    problems = all_problems(spec)
    assert [p.prompt for p in problems][:3] == ["1+1=", "1+2=", "1+3="]
    assert len(problems) == 9


def test_iter_batches_covers_each_problem_once_per_epoch():
    problems = make_split(50, 10, seed=0).train
    it = iter_batches(problems, 10, seed=3)
    epoch = [p for _ in range(5) for p in next(it)]
    assert sorted(p.prompt for p in epoch) == sorted(p.prompt for p in problems)
    again = iter_batches(problems, 10, seed=3)
    assert [p.prompt for p in next(again)] == [p.prompt for p in epoch[:10]]


def test_problem_messages():
    p = ArithProblem(prompt="1+2=", answer="3")
    assert p.messages() == [{"role": "user", "content": "1+2="}]


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("46", "46", True),
        ("The answer is 46.", "46", True),
        ("46 47", "46", False),  # the LAST integer counts
        ("47 then 46", "46", True),
        ("-7", "-7", True),
        ("7", "-7", False),
        ("+46", "46", True),
        ("046", "46", True),  # compared as ints
        ("12-34", "-34", True),  # "-34" is the last signed integer
        ("4 6", "46", False),
        ("", "46", False),  # no integer: no answer
        ("forty-six", "46", False),
        ("46.0", "46", False),  # last integer is 0
    ],
)
def test_score_rule(completion: str, answer: str, expected: bool):
    assert score(completion, answer) is expected


def test_extract_answer_none_and_huge():
    assert extract_answer("no digits here") is None
    assert extract_answer("1" * 100_000) is None  # beyond int()'s digit limit: no answer
    assert score("9" * 100_000, "9") is False
