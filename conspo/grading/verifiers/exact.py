"""``exact``: the whole completion, normalised, must equal the normalised gold.

Normalisation (applied to both sides, in this order): Unicode NFKC, strip, collapse every run
of whitespace to one space, case-fold, drop one trailing period (then strip again). So
``"  Paris.\\n"`` equals ``"paris"``, but ``"Paris, France"`` does not equal ``"Paris"``: no
answer is extracted from surrounding text (use ``math`` or ``arith`` for that). An empty or
whitespace-only completion is ``no_answer``.
"""

from __future__ import annotations

import re
import unicodedata

from conspo.grading.config import GradeConfig
from conspo.grading.labels import make_label
from conspo.grading.verifiers.registry import register
from conspo.protocol import Label, Verdict

_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = _WHITESPACE.sub(" ", text.strip()).casefold()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


@register("exact")
def grade_exact(completion: str, gold: str, config: GradeConfig) -> Label:
    answer = normalize(completion)
    if not answer:
        return make_label(Verdict.NO_ANSWER, config, detail="empty completion")
    verdict = Verdict.CORRECT if answer == normalize(gold) else Verdict.WRONG
    return make_label(verdict, config, extracted=answer)
