"""``arith``: the synthetic arithmetic task. The LAST integer in the completion is the answer.

Rule: the answer is the last match of ``[+-]?\\d+`` in the (sanitised) completion, compared as
an integer with the gold. Consequences, all intended and tested:

* ``"the answer is 12, not 13"`` answers 13 (the last integer), so it is wrong for gold 12;
* ``"+5"`` equals ``5``, ``"-0"`` equals ``0``, leading zeros do not matter (``007`` = 7);
* a sign glued to the number belongs to it: ``"10-3"`` answers ``-3``;
* no thousands separators or decimals: ``"1,234"`` answers 234 and ``"3.5"`` answers 5;
* no integer at all -> ``no_answer``.

Integers are compared in canonical decimal form (sign + digits without leading zeros) rather
than with ``int()``: Python refuses ``int()`` on strings of more than 4,300 digits, and a
completion can be 16,384 digits long.
"""

from __future__ import annotations

import re

from conspo.grading.config import GradeConfig
from conspo.grading.labels import make_label
from conspo.grading.verifiers.registry import register
from conspo.protocol import Label, Verdict

_INTEGER = re.compile(r"[+-]?\d+")
_GOLD = re.compile(r"\s*([+-]?\d+)\s*")


def canonical(integer: str) -> str:
    """``[+-]?\\d+`` in canonical form: no plus sign, no leading zeros, no negative zero."""
    digits = integer.lstrip("+-").lstrip("0") or "0"
    if integer.startswith("-") and digits != "0":
        return "-" + digits
    return digits


def last_integer(text: str) -> str | None:
    last = None
    for last in _INTEGER.finditer(text):  # noqa: B007 - we want the final match
        pass
    return last.group() if last is not None else None


@register("arith")
def grade_arith(completion: str, gold: str, config: GradeConfig) -> Label:
    gold_match = _GOLD.fullmatch(gold)
    if gold_match is None:
        return make_label(Verdict.ERROR, config, detail=f"gold is not an integer: {gold[:100]!r}")
    answer = last_integer(completion)
    if answer is None:
        return make_label(Verdict.NO_ANSWER, config, detail="no integer in completion")
    same = canonical(answer) == canonical(gold_match.group(1))
    return make_label(Verdict.CORRECT if same else Verdict.WRONG, config, extracted=answer)
