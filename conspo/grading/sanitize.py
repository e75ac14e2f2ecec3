"""Turn untrusted completion text into something every verifier can scan in bounded time.

A completion is model output: it can be megabytes long, contain NULs and terminal control
sequences, arrive as bytes that are not UTF-8, or carry lone surrogates (a tokenizer that
split a pair). Every verifier gets the output of :func:`sanitize`, which guarantees:

* a ``str`` that round-trips through UTF-8 (invalid bytes and lone surrogates become U+FFFD);
* no control characters except ``\\n`` and ``\\t`` (``\\r`` goes too, so ``\\r\\n`` reads as
  ``\\n``; C1 controls U+0080..U+009F and DEL go as well);
* at most ``max_chars`` characters, keeping the **tail**.

Why the tail: a reasoning model states its final answer last, and every verifier here takes
the *last* answer (last ``\\boxed{}``, last "the answer is", last integer). A completion that
ran into ``max_tokens`` or padded itself with junk loses only text that could not change the
verdict; keeping the head instead would drop exactly the part that matters. The price: a
``\\boxed{`` whose opening lies before the cut is not seen (its answer then counts as missing).

Bounded work: the raw input is cut to ``4 * max_chars`` code points (or ``16 * max_chars``
bytes) *before* anything else runs, so decoding, the one character-class regex below (linear,
no backtracking possible) and the final cut all cost O(max_chars) whatever the input size.
"""

from __future__ import annotations

import re

# C0 controls except \t (0x09) and \n (0x0A), DEL, and C1 controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]+")
# How much raw input survives the first cut, relative to max_chars: stripping control
# characters can only shrink the text, so 4x leaves room for heavily polluted tails.
_PRECUT_FACTOR = 4
_UTF8_MAX_BYTES = 4


def _tail(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[-limit:]


def to_text(value: str | bytes | bytearray | memoryview, max_chars: int) -> str:
    """Decode or repair ``value`` into a valid Unicode string of at most ~4 * max_chars."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value[-(_PRECUT_FACTOR * _UTF8_MAX_BYTES * max_chars) :])
        # A cut inside a multi-byte sequence yields one U+FFFD at the start: harmless.
        return raw.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise TypeError(f"completion must be str or bytes, got {type(value).__name__}")
    text = _tail(value, _PRECUT_FACTOR * max_chars)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: UTF-16 with surrogatepass keeps well-formed pairs and turns
        # each unpaired surrogate into U+FFFD on the way back.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def sanitize(value: str | bytes | bytearray | memoryview, max_chars: int) -> str:
    """Valid UTF-8-safe text, control characters stripped, at most ``max_chars`` (the tail)."""
    if max_chars <= 0:
        return ""
    text = to_text(value, max_chars)
    text = _CONTROL.sub("", text)
    return _tail(text, max_chars)
