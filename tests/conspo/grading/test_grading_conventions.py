"""The ``math`` verifier reads every benchmark's own final-answer line, on model-shaped text.

For each file in ``../shared/data/math`` the gold answer (mapped exactly as training and
evaluation map it, ``conspo.benchmarks``) is written into a completion the way a model prompted
in that benchmark's convention ends its solution, after some working, and must grade
``correct``; a neighbouring item's answer in the same shape must not. Graded in-process with
``grade_one`` (the pool adds nothing to what is tested here).

Accepted disagreements (measured; anything else failing is a regression):

* Minerva 72: the gold itself is malformed (``x_{0} \\cos (\\omega t)+$ $\\dot{x}_{0} ...``, a
  stray ``$ $`` inside), so math-verify cannot parse it (``error``); 112: the answer is longer
  than the 200 characters a fallback phrase captures (the boxed form of it passes).
* OlympiadBench 194: the gold ``$221,$8$`` is malformed (unbalanced ``$``).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from conspo.benchmarks import BENCHMARKS, load_benchmark
from conspo.grading.config import GradeConfig
from conspo.grading.grade import grade_one
from conspo.protocol import Verdict

CONFIG = GradeConfig()
WORKING = "Let me work through this carefully.\nFirst, 3 + 4 = 7, and 7 * 2 = 14.\n"

# benchmark -> [(shape name, completion template)]; {a} is the gold, {s} the gold without $...$
CONVENTIONS: dict[str, list[tuple[str, str]]] = {
    "gsm8k": [
        ("reference '#### N' line", WORKING + "So she has {a} left.\n#### {a}"),
        ("chain-of-thought 'The answer is N.'", WORKING + "The answer is {a}."),
        ("boxed", WORKING + "The total is $\\boxed{{{a}}}$."),
    ],
    "math500": [
        ("boxed", WORKING + "Therefore the answer is $\\boxed{{{a}}}$."),
        (
            "Hendrycks 'Final Answer' line",
            WORKING + "Final Answer: The final answer is ${a}$. I hope it is correct.",
        ),
    ],
    "aime24": [
        ("boxed", WORKING + "Hence $m+n = \\boxed{{{a}}}$."),
        ("'The answer is N.'", WORKING + "The answer is {a}."),
    ],
    "amc23": [
        ("boxed", WORKING + "So the answer is $\\boxed{{{a}}}$."),
        ("'The answer is N.'", WORKING + "The answer is {a}."),
    ],
    "minerva_math": [
        (
            "Minerva 'Final Answer' line",
            WORKING + "Final Answer: The final answer is {a}. I hope it is correct.",
        ),
        ("boxed", WORKING + "Thus $s = \\boxed{{{a}}}$."),
    ],
    "olympiadbench": [
        ("OlympiadBench closing line", WORKING + "So the final answer is \\boxed{{{s}}}."),
    ],
}
KNOWN_DISAGREEMENTS: dict[str, set[int]] = {
    "gsm8k": set(),
    "math500": set(),
    "aime24": set(),
    "amc23": set(),
    "minerva_math": {72, 112},
    "olympiadbench": {194},
}


def completion(template: str, gold: str) -> str:
    return template.format(a=gold, s=gold.strip().strip("$"))


def test_every_benchmark_has_conventions() -> None:
    assert set(CONVENTIONS) == set(BENCHMARKS) == set(KNOWN_DISAGREEMENTS)


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_each_benchmarks_answer_line_grades_correct(shared_data: Path, name: str) -> None:
    items = load_benchmark(name, data_dir=shared_data)
    assert len(items) == BENCHMARKS[name].size
    for shape, template in CONVENTIONS[name]:
        failed = {}
        for i, item in enumerate(items):
            label = grade_one(completion(template, item.answer), item.answer, "math", CONFIG)
            if label.verdict is not Verdict.CORRECT:
                failed[i] = (item.answer[:60], label.verdict.value, label.extracted)
        unexpected = {i: v for i, v in failed.items() if i not in KNOWN_DISAGREEMENTS[name]}
        assert not unexpected, f"{name}, {shape}: {len(unexpected)} not correct, e.g. " + str(
            list(unexpected.items())[:3]
        )


@pytest.mark.parametrize("name", ["gsm8k", "aime24", "amc23"])
def test_a_neighbours_answer_in_the_same_shape_is_wrong(shared_data: Path, name: str) -> None:
    items = load_benchmark(name, data_dir=shared_data)
    pairs = [(a, b) for a, b in itertools.pairwise(items) if a.answer != b.answer]
    assert len(pairs) > 0.8 * len(items)
    for shape, template in CONVENTIONS[name]:
        for gold, other in pairs:
            label = grade_one(completion(template, other.answer), gold.answer, "math", CONFIG)
            assert label.verdict is Verdict.WRONG, (shape, gold.answer, other.answer, label)


def test_working_without_an_answer_line_is_no_answer() -> None:
    label = grade_one(WORKING + "I am not sure how to finish.", "14", "math", CONFIG)
    assert label.verdict is Verdict.NO_ANSWER


def test_the_last_answer_line_wins() -> None:
    text = "#### 12\nWait, I made an error: 3 + 4 = 7.\n#### 7"
    assert grade_one(text, "7", "math", CONFIG).verdict is Verdict.CORRECT
    assert grade_one(text, "12", "math", CONFIG).verdict is Verdict.WRONG
