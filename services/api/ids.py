"""Redis stream entry ids as clients may send them: ``<ms>-<seq>``, both within 64 bits."""

from __future__ import annotations

import re

_ENTRY_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_MAX = 2**64 - 1


def parse_entry_id(value: str) -> tuple[int, int] | None:
    match = _ENTRY_ID.match(value)
    if match is None:
        return None
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms > _MAX or seq > _MAX:
        return None
    return ms, seq


def previous_entry_id(value: str) -> str | None:
    """The greatest id below ``value`` (None below 0-0), for an exclusive upper bound that also
    works on Redis < 6.2."""
    parsed = parse_entry_id(value)
    if parsed is None:
        return None
    ms, seq = parsed
    if seq > 0:
        return f"{ms}-{seq - 1}"
    if ms > 0:
        return f"{ms - 1}-{_MAX}"
    return None
