"""The ``math`` verifier: equivalent forms are correct, near misses are wrong, verdicts and
rewards follow the GradeConfig. Graded in-process (no pool) through ``grade_one``."""

from __future__ import annotations

import pytest

from conspo.grading.config import GradeConfig
from conspo.grading.grade import grade_one
from conspo.protocol import Verdict

CONFIG = GradeConfig()


def grade(completion: str, gold: str, config: GradeConfig = CONFIG):
    return grade_one(completion, gold, "math", config)


@pytest.mark.parametrize(
    ("gold", "answer"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\frac{1}{2}", "1/2"),
        ("0.5", r"\frac{1}{2}"),
        ("0.5", r"\dfrac12"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
        (r"\{1,2\}", r"\{2,1\}"),
        ("3, 5, 7", "7, 5, 3"),
        ("[1, 2)", "[1,2)"),
        (r"(-\infty, 3]", r"(-\infty,3]"),
        (r"(0,1)\cup(2,3)", r"(2,3)\cup(0,1)"),
        (r"90^\circ", "90"),
        ("90", r"90^\circ"),
        (r"\text{(B)}", "B"),
        (r"\text{(B)}", "(B)"),
        (r"\text{(B)}", r"\textbf{(B)}"),
        (r"\text{Evelyn}", r"\text{Evelyn}"),
        ("x=5", "5"),
        ("5", "x = 5"),
        (r"3\sqrt{13}", r"\sqrt{117}"),
        (r"\$18.90", "18.90"),
        (r"5.4 \text{ cents}", "5.4"),
        ("27.0", "27"),
        ("1,450,000", "1450000"),
        ("10\\%", "10"),
        ("x^2 + 2x + 1", "(x+1)^2"),
        ("6 - 5i", "6-5i"),
    ],
)
def test_equivalent_forms_are_correct(gold: str, answer: str) -> None:
    label = grade(f"Work... so the result is $\\boxed{{{answer}}}$.", gold)
    assert label.verdict is Verdict.CORRECT, label
    assert label.reward == 1.0


@pytest.mark.parametrize(
    ("gold", "answer"),
    [
        (r"\frac{1}{3}", "0.33"),
        (r"(3,\pi/2)", r"(3,\pi)"),
        ("12", "13"),
        ("5", "-5"),
        (r"-\frac{\pi}{6}", r"\frac{\pi}{6}"),
        (r"\{1,2\}", r"\{1,2,3\}"),
        ("[1,2)", "[1,2]"),
        ("x^2+1", "x^2-1"),
        (r"\text{(B)}", "C"),
        (r"\text{Evelyn}", r"\text{Navin}"),
        ("2", r"2\sqrt{2}"),
        ("1234", "1243"),
        ("42", r"\text{correct}"),
    ],
)
def test_near_misses_are_wrong(gold: str, answer: str) -> None:
    label = grade(f"\\boxed{{{answer}}}", gold)
    assert label.verdict is Verdict.WRONG, label
    assert label.reward == 0.0


def test_last_box_counts_not_the_first() -> None:
    assert grade(r"maybe \boxed{13}? no: \boxed{12}", "12").verdict is Verdict.CORRECT
    assert grade(r"\boxed{12}, wait, \boxed{13}", "12").verdict is Verdict.WRONG


def test_fallback_phrase_without_box() -> None:
    label = grade("So the answer is $\\frac{3}{4}$.", "0.75")
    assert label.verdict is Verdict.CORRECT
    assert label.detail == "fallback"


def test_no_answer_gets_the_format_penalty() -> None:
    config = GradeConfig(no_answer_reward=-0.5)
    label = grade("I think it is probably twelve-ish", "12", config)
    assert label.verdict is Verdict.NO_ANSWER
    assert label.reward == -0.5
    assert grade(r"\boxed{11}", "12", config).reward == 0.0  # wrong is not penalised


def test_fallbacks_configurable() -> None:
    config = GradeConfig(fallback_patterns=(r"ANS=(\d+)",))
    assert grade("blah ANS=12", "12", config).verdict is Verdict.CORRECT
    assert grade("the answer is 12", "12", config).verdict is Verdict.NO_ANSWER


def test_bad_fallback_patterns_rejected() -> None:
    with pytest.raises(ValueError, match="capture group"):
        GradeConfig(fallback_patterns=(r"answer \d+",))
    with pytest.raises(ValueError, match="does not compile"):
        GradeConfig(fallback_patterns=(r"(unclosed",))


def test_custom_rewards() -> None:
    config = GradeConfig(correct_reward=2.0, wrong_reward=-1.0)
    assert grade(r"\boxed{4}", "4", config).reward == 2.0
    assert grade(r"\boxed{5}", "4", config).reward == -1.0


def test_only_the_tail_is_scanned() -> None:
    config = GradeConfig(scan_chars=100)
    assert grade(r"\boxed{4}" + "x" * 200, "4", config).verdict is Verdict.NO_ANSWER
    assert grade("x" * 200 + r"\boxed{4}", "4", config).verdict is Verdict.CORRECT


def test_overlong_answer_is_wrong_without_parsing() -> None:
    label = grade("\\boxed{" + "1+" * 400 + "1}", "801")
    assert label.verdict is Verdict.WRONG
    assert "longer than" in (label.detail or "")


def test_unparseable_gold_is_an_error_not_the_policys_fault() -> None:
    label = grade(r"\boxed{4}", "")
    assert label.verdict is Verdict.ERROR
    assert label.reward == 0.0


def test_extracted_answer_is_reported() -> None:
    label = grade(r"\boxed{\frac{1}{2}}", "0.5")
    assert label.extracted == r"\frac{1}{2}"


def test_gold_with_dollars_is_used_as_written() -> None:
    assert grade(r"\boxed{3}", "$3$").verdict is Verdict.CORRECT


INTEGER_PAIRS = [
    ("12", "12"),
    ("12", "13"),
    ("073", "73"),
    ("-0", "0"),
    ("+5", "5"),
    ("5", "-5"),
    ("1,234", "1234"),
    ("1,450,000", "1450000"),
    ("1,450,000", "145000"),
    ("-1,000", "-1000"),
    ("1000000000000000000001", "1000000000000000000000"),
    ("0", "00"),
]


@pytest.mark.parametrize(("gold", "answer"), INTEGER_PAIRS)
def test_integer_fast_path_agrees_with_math_verify(gold: str, answer: str) -> None:
    from math_verify import verify

    from conspo.grading.verifiers.math_answer import (
        answers_match,
        parse_gold,
        parse_prediction,
        plain_integer,
    )

    assert plain_integer(gold) is not None and plain_integer(answer) is not None
    slow = verify(parse_gold(gold, None), parse_prediction(answer, None))
    assert answers_match(gold, answer, CONFIG) == slow


@pytest.mark.parametrize("text", ["1.5", "27.0", "1,23", "12,3456", "1 000", "x", "", "--5"])
def test_integer_fast_path_declines_non_integers(text: str) -> None:
    from conspo.grading.verifiers.math_answer import plain_integer

    assert plain_integer(text) is None
