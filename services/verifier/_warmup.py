"""Imported by the forkserver (``set_forkserver_preload``) so that every worker forked from it
starts hot: math-verify, sympy and latex2sympy imported (~0.7 s) and their lazily compiled
regexes and parser tables built by one real grading (~0.1 s). Importing it anywhere else is
harmless. A failure here must not kill the forkserver, hence the broad except.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

try:
    from conspo.grading.config import GradeConfig
    from conspo.grading.grade import grade_one

    grade_one("so the answer is \\boxed{\\frac{1}{2}}", "0.5", "math", GradeConfig())
except Exception:  # pragma: no cover - only reached when math-verify is broken
    logger.warning("verifier warm-up failed", exc_info=True)
