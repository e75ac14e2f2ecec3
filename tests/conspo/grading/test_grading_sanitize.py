"""Sanitising untrusted completions: valid text, no control characters, bounded length."""

from __future__ import annotations

import time

import pytest

from conspo.grading.sanitize import sanitize


def test_invalid_utf8_bytes_become_replacement_characters() -> None:
    assert sanitize(b"ok \xff\xfe \xc3\xa9 \xe2\x82", 100) == "ok \ufffd\ufffd é \ufffd"


def test_lone_surrogates_replaced_and_pairs_kept() -> None:
    text = "a\ud800b\udc00c" + "\U0001f600"  # two lone surrogates, then a real emoji
    out = sanitize(text, 100)
    assert out == "a\ufffdb\ufffdc\U0001f600"
    out.encode("utf-8")  # must not raise


def test_control_characters_stripped_except_newline_and_tab() -> None:
    raw = "a\x00b\x07c\x1b[31md\re\nf\tg\x7fh\x85i"
    assert sanitize(raw, 100) == "abc[31mde\nf\tghi"


def test_keeps_the_tail() -> None:
    assert sanitize("x" * 50 + "END", 10) == "x" * 7 + "END"
    assert sanitize(b"y" * 50 + b"END", 10) == "y" * 7 + "END"


def test_tail_counts_characters_after_stripping() -> None:
    # Controls inside the tail are removed first, so the answer is still fully kept.
    assert sanitize("\x00" * 20 + "abc", 3) == "abc"


@pytest.mark.parametrize("max_chars", [0, -1])
def test_non_positive_cap_gives_empty(max_chars: int) -> None:
    assert sanitize("abc", max_chars) == ""


def test_megabytes_are_cut_before_work() -> None:
    big = "\x00a" * 5_000_000 + "answer"
    start = time.perf_counter()
    out = sanitize(big, 16_384)
    assert time.perf_counter() - start < 0.5
    assert out.endswith("answer") and len(out) <= 16_384


def test_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        sanitize(123, 10)  # type: ignore[arg-type]
