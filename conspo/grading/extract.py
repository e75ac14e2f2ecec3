"""Find the final answer in a completion: the last boxed answer, else the last fallback phrase.

Boxed answers: ``\\boxed{...}``, ``\\fbox{...}`` and ``\\framebox{...}`` (AIME reference
solutions use the latter), plus ``\\boxed 5`` (a command followed by a bare token, which some
models emit). Braces must balance; ``\\{`` and ``\\}`` are escaped and do not count.

Bounded, backtracking-free work, whatever the input:

* one regex finds the command names (a fixed alternation: linear);
* one pass over the brace tokens (``re.finditer`` over ``\\\\.|[{}]``, linear) pairs every
  ``{`` with its ``}`` using a stack, so each candidate's extent is then an O(1) lookup. A naive
  scan per candidate would be quadratic on ``\\boxed{`` repeated 10,000 times;
* at most ``max_candidates`` candidates are examined, from the last backwards. A candidate is
  skipped when it is unbalanced (its brace never closes) or empty (``\\boxed{}`` is usually the
  prompt's own instruction echoed), and the next earlier one is tried.

Trailing sentence periods inside a box are dropped (``\\boxed{104.}`` is 104: the AIME 2024
reference solutions contain exactly this).

The fallback patterns come from ``GradeConfig.fallback_patterns`` and run only on the
sanitised, length-capped tail; the captured phrase is trimmed to its first sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_BARE_TOKEN = re.compile(r"[^\s${}\\]{1,100}")
_SPACES = re.compile(r"[ \t]{0,100}")
# Where a fallback answer phrase ends: a sentence stop, a line end, or the usual sign-off.
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n|(?i:\s+I hope\b)")
_TRAILING_PUNCT = ".,;:!?"


@dataclass(frozen=True)
class Extraction:
    """An extracted answer and how it was found (``"boxed"`` or ``"fallback"``)."""

    answer: str
    source: str


def match_braces(text: str) -> dict[int, int]:
    """Map the index of every ``{`` that closes to the index of its ``}`` (escapes ignored)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for token in _BRACE_TOKEN.finditer(text):
        char = token.group()
        if char == "{":
            stack.append(token.start())
        elif char == "}" and stack:
            pairs[stack.pop()] = token.start()
    return pairs


def last_boxed(text: str, max_candidates: int) -> str | None:
    """Content of the last non-empty, balanced boxed answer among the last ``max_candidates``
    box commands, or None."""
    starts = [m.end() for m in _BOX_COMMAND.finditer(text)]
    pairs: dict[int, int] | None = None
    for after in reversed(starts[-max_candidates:]):
        pos = _SPACES.match(text, after).end()
        if pos < len(text) and text[pos] == "{":
            if pairs is None:
                pairs = match_braces(text)
            close = pairs.get(pos)
            content = text[pos + 1 : close].strip() if close is not None else ""
        elif pos > after:  # "\\boxed 5": a command, whitespace, then a bare token
            token = _BARE_TOKEN.match(text, pos)
            content = token.group() if token else ""
        else:
            content = ""
        content = _strip_stop(content)
        if content:
            return content
    return None


def _strip_stop(content: str) -> str:
    """Drop sentence punctuation typed inside the box (``\\boxed{104.}``), but not ``\\.``."""
    stripped = content.rstrip(" \t\n.")
    if stripped.endswith("\\") and len(stripped) < len(content):
        stripped = content[: len(stripped) + 1]  # keep the escaped "\\."
    return stripped.strip()


@lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p) for p in patterns)


def trim_phrase(phrase: str) -> str:
    """Cut a fallback capture to its first sentence and strip math delimiters and markup."""
    end = _SENTENCE_END.search(phrase)
    if end is not None:
        phrase = phrase[: end.start()]
    phrase = phrase.strip().strip("*").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if phrase.startswith(left) and phrase.endswith(right) and len(phrase) > len(left + right):
            phrase = phrase[len(left) : -len(right)].strip()
            break
    return phrase.rstrip(_TRAILING_PUNCT).strip()


def fallback_answer(text: str, patterns: tuple[str, ...]) -> str | None:
    """The trimmed capture of the fallback match that ends last; among matches ending at the
    same place the one starting last wins, so in "Final Answer: The final answer is 5" the
    inner phrase is used. Matches may overlap (each search restarts one past the last start)."""
    best: tuple[int, int, str] | None = None
    for pattern in _compiled(patterns):
        pos = 0
        while (match := pattern.search(text, pos)) is not None:
            key = (match.end(), match.start(), match.group(1) or "")
            if best is None or key[:2] > best[:2]:
                best = key
            pos = match.start() + 1
    if best is None:
        return None
    return trim_phrase(best[2]) or None


def extract_answer(
    text: str, *, max_candidates: int, fallback_patterns: tuple[str, ...] = ()
) -> Extraction | None:
    """The final answer of ``text`` (already sanitised and capped), or None."""
    boxed = last_boxed(text, max_candidates)
    if boxed is not None:
        return Extraction(boxed, "boxed")
    if fallback_patterns:
        answer = fallback_answer(text, fallback_patterns)
        if answer:
            return Extraction(answer, "fallback")
    return None
