"""``exact`` and ``arith``: the synthetic task's verifiers and their documented rules."""

from __future__ import annotations

import pytest

from conspo.grading.config import GradeConfig
from conspo.grading.grade import grade_one
from conspo.grading.verifiers.arith import canonical
from conspo.protocol import Verdict

CONFIG = GradeConfig()


def arith(completion: str, gold: str) -> Verdict:
    return grade_one(completion, gold, "arith", CONFIG).verdict


def exact(completion: str, gold: str) -> Verdict:
    return grade_one(completion, gold, "exact", CONFIG).verdict


@pytest.mark.parametrize(
    ("completion", "gold", "verdict"),
    [
        ("42", "42", Verdict.CORRECT),
        ("12 + 30 = 42", "42", Verdict.CORRECT),
        ("-17", "-17", Verdict.CORRECT),
        ("the result is -17", "17", Verdict.WRONG),  # sign flip
        ("+5", "5", Verdict.CORRECT),
        ("5", "+5", Verdict.CORRECT),
        ("007", "7", Verdict.CORRECT),
        ("-0", "0", Verdict.CORRECT),
        # The LAST integer is the answer: "12, not 13" answers 13.
        ("the answer is 12, not 13", "12", Verdict.WRONG),
        ("the answer is 12, not 13", "13", Verdict.CORRECT),
        ("10-3", "-3", Verdict.CORRECT),  # a glued sign belongs to the number
        ("1,234", "234", Verdict.CORRECT),  # no thousands separators
        ("3.5", "5", Verdict.CORRECT),  # no decimals
        ("forty-two", "42", Verdict.NO_ANSWER),
        ("   \n\t ", "42", Verdict.NO_ANSWER),
        ("", "42", Verdict.NO_ANSWER),
        (" 42 ", " 42\n", Verdict.CORRECT),
    ],
)
def test_arith(completion: str, gold: str, verdict: Verdict) -> None:
    assert arith(completion, gold) is verdict


def test_arith_huge_integers_compare_without_int_conversion() -> None:
    digits = "9" * 10_000  # int() refuses > 4,300 digits
    assert arith(digits, digits) is Verdict.CORRECT
    assert arith(digits + "8", digits) is Verdict.WRONG


def test_arith_non_integer_gold_is_an_error() -> None:
    label = grade_one("42", "forty-two", "arith", CONFIG)
    assert label.verdict is Verdict.ERROR
    assert label.reward == CONFIG.error_reward


def test_arith_no_answer_reward() -> None:
    label = grade_one("no digits", "4", "arith", GradeConfig(no_answer_reward=-1.0))
    assert label.reward == -1.0


@pytest.mark.parametrize(
    ("raw", "expected"), [("+5", "5"), ("-005", "-5"), ("-0", "0"), ("000", "0"), ("12", "12")]
)
def test_canonical(raw: str, expected: str) -> None:
    assert canonical(raw) == expected


@pytest.mark.parametrize(
    ("completion", "gold", "verdict"),
    [
        ("Paris", "paris", Verdict.CORRECT),
        ("  Paris.\n", "Paris", Verdict.CORRECT),
        ("New   York\tCity", "new york city", Verdict.CORRECT),
        ("STRASSE", "straße", Verdict.CORRECT),  # case-fold, not lower()
        ("Paris, France", "Paris", Verdict.WRONG),
        ("Paris..", "Paris", Verdict.WRONG),  # only one trailing period goes
        ("12", "13", Verdict.WRONG),
        ("-5", "5", Verdict.WRONG),
        ("   ", "Paris", Verdict.NO_ANSWER),
    ],
)
def test_exact(completion: str, gold: str, verdict: Verdict) -> None:
    assert exact(completion, gold) is verdict
