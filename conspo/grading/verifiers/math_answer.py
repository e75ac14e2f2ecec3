"""``math``: the last boxed answer (or a fallback phrase) compared with math-verify.

How the two sides are handed to math-verify was chosen by measurement on MATH-500 (gold
``answer`` vs the last boxed answer of the reference ``solution``): every combination of
``$gold$`` / ``\\boxed{gold}`` and ``$pred$`` / ``\\boxed{pred}`` agreed on 500/500 and on the
equivalence cases in the tests; ``$gold$`` with ``\\boxed{pred}`` was the fastest (2.5 s vs 4.3 s
for 500 pairs). The prediction is re-boxed because we already extracted the box content with our
own brace matcher, and math-verify's boxed normalisation then handles ``\\text{}``, units,
``^\\circ`` and ``\\$`` the same way it does in its benchmarks. A gold answer that itself contains
``$`` or ``\\boxed`` is passed as written (it is already a LaTeX snippet).

Integer fast path: when the gold and the extracted answer are both plain integers (optional
sign, digits, optionally grouped in thousands with commas, e.g. ``1,450,000``), they are
compared exactly in canonical form without calling math-verify. math-verify compares such
integers exactly too (``073`` = 73, ``1,234`` = 1234; a test cross-checks both paths), so
verdicts do not change, while the cost drops ~100x; integer answers are the bulk of RLVR math
data (GSM8K, AIME, AMC, about half of MATH). Anything else (decimals, ``27.0``, LaTeX, units)
goes to math-verify.

Verdicts: nothing extracted -> ``no_answer``; an extracted answer that does not parse, or is
longer than ``max_answer_chars`` -> ``wrong`` (an answer was given, it is just not a valid one);
a gold answer math-verify cannot extract anything from -> ``error`` (a data problem, not the
policy's fault).

Timeouts: math-verify's own ``signal.alarm`` timeout (``math_verify_timeout_s``) is used when we
run in a main thread (always the case in pool workers); it is a *soft* limit that lets a worker
survive a slow sympy simplification, but it cannot interrupt long C-level work (big-integer
powers). The hard limit is the pool's SIGKILL.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from conspo.grading.config import GradeConfig
from conspo.grading.extract import extract_answer
from conspo.grading.labels import make_label
from conspo.grading.verifiers.registry import register
from conspo.protocol import Label, Verdict

logger = logging.getLogger(__name__)

_GOLD_TARGETS = (LatexExtractionConfig(), ExprExtractionConfig())
_PRED_TARGETS = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


_PLAIN_INTEGER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)")


def plain_integer(text: str) -> str | None:
    """Canonical form of a plain integer (``"+1,024"`` -> ``"1024"``), else None."""
    text = text.strip()
    if len(text) > 5_000 or not _PLAIN_INTEGER.fullmatch(text):
        return None
    digits = text.lstrip("+-").replace(",", "").lstrip("0") or "0"
    return "-" + digits if text.startswith("-") and digits != "0" else digits


def _mv_timeout(config: GradeConfig) -> int | None:
    # signal.alarm only works in the main thread; elsewhere math-verify would raise ValueError.
    if threading.current_thread() is not threading.main_thread():
        return None
    return config.math_verify_timeout_s


def gold_source(gold: str) -> str:
    """The LaTeX snippet math-verify parses for a gold answer."""
    gold = gold.strip()
    if "$" in gold.replace("\\$", "") or "\\boxed" in gold:
        return gold
    return f"${gold}$"


@lru_cache(maxsize=512)
def parse_gold(gold: str, timeout_s: int | None) -> list[Any]:
    """Parsed gold answer (cached: a group's G completions share one gold)."""
    return parse(gold_source(gold), list(_GOLD_TARGETS), parsing_timeout=timeout_s)


def parse_prediction(answer: str, timeout_s: int | None) -> list[Any]:
    return parse(f"\\boxed{{{answer}}}", list(_PRED_TARGETS), parsing_timeout=timeout_s)


def answers_match(gold: str, answer: str, config: GradeConfig) -> bool | None:
    """math-verify's judgement of ``answer`` against ``gold``; None when the gold is unusable."""
    gold_int, answer_int = plain_integer(gold), plain_integer(answer)
    if gold_int is not None and answer_int is not None:
        return gold_int == answer_int
    timeout_s = _mv_timeout(config)
    gold_parsed = parse_gold(gold, timeout_s)
    if not gold_parsed:
        return None
    pred_parsed = parse_prediction(answer, timeout_s)
    if not pred_parsed:
        return False
    return verify(
        gold_parsed,
        pred_parsed,
        float_rounding=config.float_rounding,
        numeric_precision=config.numeric_precision,
        timeout_seconds=timeout_s,
    )


@register("math")
def grade_math(completion: str, gold: str, config: GradeConfig) -> Label:
    found = extract_answer(
        completion,
        max_candidates=config.max_boxed_candidates,
        fallback_patterns=config.fallback_patterns,
    )
    if found is None:
        return make_label(Verdict.NO_ANSWER, config, detail="no boxed answer or answer phrase")
    answer = found.answer
    if len(answer) > config.max_answer_chars:
        return make_label(
            Verdict.WRONG,
            config,
            extracted=answer,
            detail=f"{found.source} answer longer than {config.max_answer_chars} characters",
        )
    match = answers_match(gold, answer, config)
    if match is None:
        return make_label(
            Verdict.ERROR, config, extracted=answer, detail=f"gold answer does not parse: {gold}"
        )
    verdict = Verdict.CORRECT if match else Verdict.WRONG
    return make_label(verdict, config, extracted=answer, detail=found.source)
