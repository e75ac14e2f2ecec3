"""Build ``Label`` objects whose reward follows from the verdict and the ``GradeConfig``.

Verifiers decide the verdict; the reward is always derived here, so a run's reward scheme lives
in one place (``GradeConfig``) and cannot drift between verifiers.
"""

from __future__ import annotations

from conspo.grading.config import GradeConfig
from conspo.protocol import Label, Verdict

# Label.extracted / Label.detail are capped at 1,000 characters by the protocol.
_MAX_FIELD = 1_000


def clip(text: str | None, limit: int = _MAX_FIELD) -> str | None:
    """Shorten ``text`` to ``limit`` characters (marking the cut with an ellipsis)."""
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def reward_for(verdict: Verdict, config: GradeConfig) -> float:
    if verdict is Verdict.CORRECT:
        return config.correct_reward
    if verdict is Verdict.WRONG:
        return config.wrong_reward
    if verdict in (Verdict.NO_ANSWER, Verdict.TIMEOUT):
        return config.no_answer_reward
    return config.error_reward


def make_label(
    verdict: Verdict,
    config: GradeConfig,
    *,
    extracted: str | None = None,
    detail: str | None = None,
) -> Label:
    """A label for ``verdict`` with the configured reward; long fields are clipped."""
    return Label(
        reward=reward_for(verdict, config),
        verdict=verdict,
        extracted=clip(extracted),
        detail=clip(detail),
    )
