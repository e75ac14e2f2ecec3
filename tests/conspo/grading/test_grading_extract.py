"""Final-answer extraction: last balanced boxed answer, fallback phrases, bounded cost."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conspo.grading.config import DEFAULT_FALLBACK_PATTERNS
from conspo.grading.extract import extract_answer, fallback_answer, last_boxed, match_braces
from conspo.grading.sanitize import sanitize


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{42}.", "42"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\fbox{7}", "7"),
        (r"\framebox{204} minutes", "204"),
        (r"$\boxed 5$", "5"),
        (r"\boxed  {  x=3 }", "x=3"),
        (r"\boxed{104.}", "104"),
        (r"\boxed{x \in [1,2)}", r"x \in [1,2)"),
        # unbalanced last box: fall back to the earlier, balanced one
        (r"\boxed{12} and finally \boxed{13", "12"),
        # empty boxes (an echoed instruction) are skipped
        (r"\boxed{9} Put your answer in \boxed{}", "9"),
        # escaped braces do not count for balance
        (r"\boxed{\{1,2\}", None),
        (r"\boxedx{3}", None),
        ("no box here", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text, max_candidates=8) == expected


def test_match_braces_pairs_nested_and_ignores_escapes() -> None:
    text = r"{a{b}\{c}"
    assert match_braces(text) == {0: 8, 2: 4}


def test_max_candidates_limits_how_far_back_we_look() -> None:
    text = r"\boxed{1}" + r"\boxed{}" * 5
    assert last_boxed(text, max_candidates=6) == "1"
    assert last_boxed(text, max_candidates=5) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Thus the answer is 12.", "12"),
        ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("Final answer: 3/4", "3/4"),
        ("**Final Answer:** 17", "17"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),
        ("Answer: (3, 4)\n", "(3, 4)"),
        ("the answer is 7. Then later the answer is 8", "8"),
        ("nothing to see", None),
    ],
)
def test_fallback_phrases(text: str, expected: str | None) -> None:
    assert fallback_answer(text, DEFAULT_FALLBACK_PATTERNS) == expected


def test_boxed_beats_fallback_and_fallbacks_can_be_disabled() -> None:
    text = "the answer is 3, so \\boxed{4}"
    found = extract_answer(text, max_candidates=8, fallback_patterns=DEFAULT_FALLBACK_PATTERNS)
    assert found is not None and (found.answer, found.source) == ("4", "boxed")
    assert extract_answer("the answer is 3", max_candidates=8, fallback_patterns=()) is None


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 10_000,
        "\\boxed{}" * 10_000,
        "{" * 16_384,
        "\\boxed{" + "{" * 16_000 + "1",
        "the answer is " * 1_200,
        "final answer: " * 1_200,
        "Final answer is\n" * 1_000,
        "answer:" + " " * 16_000,
        "\\" * 16_384,
    ],
    ids=[
        "open-boxes",
        "empty-boxes",
        "braces",
        "deep-open",
        "phrase-spam",
        "final-spam",
        "final-newlines",
        "answer-spaces",
        "backslashes",
    ],
)
def test_adversarial_extraction_is_fast(text: str) -> None:
    text = text[-16_384:]  # what sanitize hands over
    start = time.perf_counter()
    extract_answer(text, max_candidates=8, fallback_patterns=DEFAULT_FALLBACK_PATTERNS)
    assert time.perf_counter() - start < 0.5


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_extraction_never_raises_on_arbitrary_text(text: str) -> None:
    extract_answer(
        sanitize(text, 16_384), max_candidates=8, fallback_patterns=DEFAULT_FALLBACK_PATTERNS
    )


_PLAIN = st.text(
    alphabet=st.characters(blacklist_characters="{}\\.", blacklist_categories=("Cs", "Cc")),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(prefix=st.text(max_size=100), content=_PLAIN, suffix=_PLAIN)
def test_the_last_box_is_found_whatever_precedes_it(prefix: str, content: str, suffix: str) -> None:
    text = prefix + "\\boxed{" + content + "}" + suffix
    expected = content.strip() or None
    if expected is None:  # an empty box is skipped; whatever the prefix holds may then win
        return
    assert last_boxed(text, max_candidates=8) == expected


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)), st.integers(1, 50))
def test_sanitize_output_is_clean_and_capped(raw: str | bytes, cap: int) -> None:
    out = sanitize(raw, cap)
    assert len(out) <= cap
    out.encode("utf-8")
    assert not any(ord(ch) < 32 and ch not in "\n\t" for ch in out)
    assert not any(0x7F <= ord(ch) <= 0x9F for ch in out)
