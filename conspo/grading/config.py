"""What the verifier is asked to grade, and how: the two models that cross into worker processes.

``GradeConfig`` is one frozen pydantic model shared by every verifier, so a run's reward
definition is one serialisable object (it can live in the run's settings and be logged with
the results). Verifiers read only the fields they need.

Reward defaults are the plain RLVR ones: 1.0 for correct, 0.0 for everything else. A *format
penalty* is expressed by lowering ``no_answer_reward`` (for example -0.5): it applies when no
answer could be extracted, and also to ``timeout`` verdicts, since a completion that makes the
grader time out is almost always degenerate output. ``error_reward`` is separate on purpose:
an ``error`` usually means *our* failure (a crashed worker, an unknown verifier, a gold answer
that does not parse), which should not punish the policy.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Fallbacks for completions without \boxed{}: the answer lines of the benchmarks in
# ../shared/data/math (tests/conspo/grading/test_grading_conventions.py grades each one's own):
# "Final Answer: The final answer is X. I hope it is correct." (Minerva, Hendrycks MATH few-shot),
# "So the final answer is X" (OlympiadBench), "The answer is X." (GSM8K chain-of-thought
# few-shot, AIME/AMC write-ups), "Answer: X", and GSM8K's reference line "#### X".
# Each pattern has exactly one capture group (the answer). They are scanned in the sanitised
# tail; the match that *ends last* wins, in keeping with "the last boxed answer". Every
# quantifier that can repeat is bounded or anchored on a literal phrase, so a pattern costs
# O(len(text) * 200) at worst (no nested quantifiers).
DEFAULT_FALLBACK_PATTERNS: tuple[str, ...] = (
    r"(?i)final answer\s{0,5}(?:is|:)\s{0,5}:?[ \t]{0,5}([^\n]{1,200})",
    r"(?i)\bthe answer is\s{0,5}:?[ \t]{0,5}([^\n]{1,200})",
    r"(?i)(?:^|\n)[ \t*]{0,5}answer\s{0,3}:[ \t*]{0,5}([^\n]{1,200})",
    r"(?:^|\n)[ \t]{0,5}####[ \t]{0,5}([^\n]{1,200})",
)


class GradeConfig(BaseModel):
    """How completions are scored. Frozen and picklable: it is sent to every worker once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    correct_reward: float = 1.0
    wrong_reward: float = 0.0
    no_answer_reward: float = Field(
        default=0.0,
        description="reward when no answer is found (format penalty); also used for timeouts",
    )
    error_reward: float = Field(default=0.0, description="reward when grading itself failed")

    scan_chars: int = Field(
        default=16_384,
        ge=1,
        le=10_000_000,
        description="only the last scan_chars characters of a completion are examined",
    )
    max_boxed_candidates: int = Field(
        default=8,
        ge=1,
        le=10_000,
        description="how many \\boxed{} occurrences (from the last backwards) may be tried when "
        "later ones are empty or unbalanced",
    )
    max_answer_chars: int = Field(
        default=512,
        ge=1,
        le=1_000,
        description="an extracted answer longer than this is graded wrong without parsing",
    )
    fallback_patterns: tuple[str, ...] = Field(
        default=DEFAULT_FALLBACK_PATTERNS,
        max_length=32,
        description="regexes with one capture group, tried when no \\boxed{} answer exists",
    )

    # math-verify knobs (see math_verify.verify).
    float_rounding: int = Field(default=6, ge=0, le=30)
    numeric_precision: int = Field(default=15, ge=1, le=100)
    math_verify_timeout_s: int | None = Field(
        default=3,
        ge=1,
        description="math-verify's own signal.alarm timeout per parse/compare (whole seconds); "
        "a soft limit that lets a worker survive slow sympy calls. Ignored off the main "
        "thread. The hard limit is the pool's per-item kill.",
    )

    @field_validator("fallback_patterns")
    @classmethod
    def _compilable(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"fallback pattern {pattern!r} does not compile: {exc}") from None
            if compiled.groups < 1:
                raise ValueError(f"fallback pattern {pattern!r} needs a capture group")
        return patterns


class GradeItem(BaseModel):
    """One completion to grade against one gold answer with one named verifier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    completion: str | bytes
    gold: str = Field(max_length=10_000)
    verifier: str = Field(default="math", min_length=1, max_length=200)
