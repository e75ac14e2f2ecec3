"""Turning JSONL rows into prompt rows with a field mapping alone.

The benchmark files disagree on field names and answer formats, so the mapping covers them
without code: a prompt field (optionally through a template, as text or chat messages), an
answer field that may be a number (AMC's ``27.0`` -> ``"27"``), a list (OlympiadBench: first
item, or joined), a full solution whose last ``\\boxed{}`` is the answer (Minerva), or text whose
answer follows a marker (GSM8K's ``#### ``) or matches a regex. The row-level rules live in
``conspo.rows`` because ``conspo eval`` maps benchmark rows with them too (one mapping for
training and evaluation); this module adds what only the api needs: user regexes, ids, limits,
metadata, and the admission check (``check``: a prompt too long for the served model). A row
that cannot be mapped or is refused is rejected with its line number and reason; the rest load.

``answer_regex`` is user input applied to every row: it runs through the ``regex`` module with a
per-row timeout when that module is installed (it is, as a dependency of transformers), so a
pathological pattern costs a rejected row rather than a stuck worker thread.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conspo.rows import AnswerField, PromptFormat, RowError, field_text, gold_answer
from services.api.schemas import DatasetSpec, RejectedRow

try:  # a timeout on user-supplied patterns
    import regex as _regex
except ImportError:  # pragma: no cover - regex ships with transformers
    _regex = None

MAX_REJECTED_REPORTED = 100
REGEX_TIMEOUT_S = 0.05
_ROW_ID = re.compile(r"^[A-Za-z0-9_.@/+=-]{1,120}$")

__all__ = ["LoadResult", "Mapper", "RowError", "load_inline", "load_jsonl"]


@dataclass(frozen=True)
class LoadResult:
    rows: list[dict[str, Any]]
    rejected: list[RejectedRow]
    rejected_count: int


RowCheck = Callable[[dict[str, Any]], str | None]  # a mapped row -> why it is refused, or None


class Mapper:
    def __init__(self, spec: DatasetSpec, check: RowCheck | None = None) -> None:
        self.spec = spec
        self._format = PromptFormat(
            template=spec.template, system_prompt=spec.system_prompt, chat=spec.chat
        )
        self._answer = AnswerField(
            answer_field=spec.answer_field,
            answer_boxed=spec.answer_boxed,
            answer_after=spec.answer_after,
            answer_join=spec.answer_join,
        )
        self.check = check
        self._pattern: Any = None
        if spec.answer_regex is not None:
            try:
                self._pattern = (_regex or re).compile(spec.answer_regex)
            except Exception as exc:  # re.error and regex.error share no base class
                raise ValueError(f"answer_regex does not compile: {exc}") from None

    # -- pieces ---------------------------------------------------------------------------------
    def _search(self, text: str) -> str:
        try:
            if _regex is not None:
                match = self._pattern.search(text, timeout=REGEX_TIMEOUT_S)
            else:  # pragma: no cover
                match = self._pattern.search(text)
        except TimeoutError:
            raise RowError("answer_regex timed out on this row") from None
        if match is None:
            raise RowError("answer_regex does not match the answer field")
        return match.group(1) if self._pattern.groups else match.group(0)

    def answer(self, row: dict[str, Any]) -> str:
        text = gold_answer(row, self._answer)
        if self._pattern is not None:
            text = self._search(text)
        text = text.strip()
        if not text:
            raise RowError("the answer is empty")
        if len(text) > 10_000:
            raise RowError("the answer is longer than 10,000 characters")
        return text

    def _metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.spec.metadata_fields:
            if name not in row:
                continue
            value = row[name]
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            if value is None or isinstance(value, bool | int | float):
                out[name] = value
            elif isinstance(value, str):
                out[name] = value[:1000]
            else:
                out[name] = json.dumps(value, ensure_ascii=False)[:1000]
        return out

    # -- a row ----------------------------------------------------------------------------------
    def map_row(self, row: Any, line: int) -> dict[str, Any]:
        if not isinstance(row, dict):
            raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
        spec = self.spec
        raw_prompt = row.get(spec.prompt_field)
        if raw_prompt is None:
            raise RowError(f"prompt field {spec.prompt_field!r} is missing")
        prompt = field_text(raw_prompt, f"prompt field {spec.prompt_field!r}")
        rendered = self._format.render(prompt, row)
        text = rendered["messages"][-1]["content"] if "messages" in rendered else rendered["text"]
        if not text.strip():
            raise RowError("the prompt text is empty")
        if len(text) > 100_000:
            raise RowError("the prompt text is longer than 100,000 characters")
        if spec.id_field is not None:
            raw_id = row.get(spec.id_field)
            if raw_id is None:
                raise RowError(f"id field {spec.id_field!r} is missing")
            row_id = field_text(raw_id, f"id field {spec.id_field!r}")
            if not _ROW_ID.match(row_id):
                raise RowError(f"id {row_id[:50]!r} is not 1-120 characters of [A-Za-z0-9_.@/+=-]")
        else:
            row_id = str(line)
        out: dict[str, Any] = {"id": row_id, "answer": self.answer(row), **rendered}
        out["metadata"] = self._metadata(row)
        if self.check is not None:
            refused = self.check(out)
            if refused:
                raise RowError(refused)
        return out


def _accept(
    mapper: Mapper,
    rows: list[dict[str, Any]],
    seen: set[str],
    rejected: list[RejectedRow],
    row: Any,
    line: int,
) -> int:
    try:
        mapped = mapper.map_row(row, line)
        if mapped["id"] in seen:
            raise RowError(f"duplicate id {mapped['id']!r}")
    except RowError as exc:
        if len(rejected) < MAX_REJECTED_REPORTED:
            rejected.append(RejectedRow(line=line, reason=str(exc)[:500]))
        return 1
    seen.add(mapped["id"])
    rows.append(mapped)
    return 0


def load_jsonl(
    data: bytes, spec: DatasetSpec, max_rows: int, check: RowCheck | None = None
) -> LoadResult:
    mapper = Mapper(spec, check)
    rows: list[dict[str, Any]] = []
    rejected: list[RejectedRow] = []
    seen: set[str] = set()
    count = 0
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            count += _reject(rejected, number, "not UTF-8")
            continue
        except ValueError as exc:
            count += _reject(rejected, number, f"not JSON: {exc}")
            continue
        count += _accept(mapper, rows, seen, rejected, row, number)
        if len(rows) > max_rows:
            break
    return LoadResult(rows, rejected, count)


def load_inline(
    items: list[dict[str, Any]], spec: DatasetSpec, max_rows: int, check: RowCheck | None = None
) -> LoadResult:
    mapper = Mapper(spec, check)
    rows: list[dict[str, Any]] = []
    rejected: list[RejectedRow] = []
    seen: set[str] = set()
    count = 0
    for number, row in enumerate(items, start=1):
        count += _accept(mapper, rows, seen, rejected, row, number)
        if len(rows) > max_rows:
            break
    return LoadResult(rows, rejected, count)


def _reject(rejected: list[RejectedRow], line: int, reason: str) -> int:
    if len(rejected) < MAX_REJECTED_REPORTED:
        rejected.append(RejectedRow(line=line, reason=reason[:500]))
    return 1
