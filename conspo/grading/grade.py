"""Grade one completion in-process: sanitise, look up the verifier, run it, never raise.

This is what each pool worker runs per item, and what tests or tools may call directly when no
hard timeout is needed. Every failure becomes a ``Label``: an unknown verifier name or an
exception inside a verifier gives verdict ``error`` with the reason in ``detail``. The one
exception that escapes is ``MemoryError``: after it the process may be in a poor state, so the
pool worker reports ``error`` and has itself replaced.
"""

from __future__ import annotations

import logging

from conspo.grading.config import GradeConfig
from conspo.grading.labels import make_label
from conspo.grading.sanitize import sanitize
from conspo.grading.verifiers import UnknownVerifierError, get_verifier
from conspo.protocol import Label, Verdict

logger = logging.getLogger(__name__)

# conspo.protocol.Prompt caps gold answers at 10,000 characters.
MAX_GOLD_CHARS = 10_000


def _describe(exc: BaseException) -> str:
    # str() of an exception carrying a huge sympy object can itself be slow or fail.
    try:
        message = str(exc)[:300]
    except Exception:
        message = "<unprintable>"
    return f"{type(exc).__name__}: {message}"


def grade_one(
    completion: str | bytes, gold: str | bytes, verifier: str, config: GradeConfig
) -> Label:
    """The label of one completion; exceptions other than MemoryError become ``error``."""
    try:
        fn = get_verifier(verifier)
    except UnknownVerifierError as exc:
        return make_label(Verdict.ERROR, config, detail=str(exc))
    text = sanitize(completion, config.scan_chars)
    gold_text = sanitize(gold, MAX_GOLD_CHARS)
    try:
        label = fn(text, gold_text, config)
    except MemoryError:
        raise
    except Exception as exc:
        logger.debug("verifier %r raised", verifier, exc_info=True)
        detail = f"verifier {verifier!r} raised {_describe(exc)}"
        return make_label(Verdict.ERROR, config, detail=detail)
    if not isinstance(label, Label):
        return make_label(
            Verdict.ERROR,
            config,
            detail=f"verifier {verifier!r} returned {type(label).__name__}, not a Label",
        )
    return label
