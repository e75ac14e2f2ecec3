"""Turning JSONL rows into prompt rows with a field mapping alone.

The benchmark files disagree on field names and answer formats, so the mapping covers them
without code: a prompt field (optionally through a template), an answer field that may be a
number (AMC's ``27.0`` -> ``"27"``), a list (OlympiadBench: first item, or joined), a full
solution whose last ``\\boxed{}`` is the answer (Minerva), or text whose answer follows a marker
(GSM8K's ``#### ``) or matches a regex. A row that cannot be mapped, or that the api's admission
check refuses (``check``: a prompt too long for the served model), is rejected with its line
number and reason; the rest load.

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

from services.api.schemas import DatasetSpec, RejectedRow

try:  # a timeout on user-supplied patterns
    import regex as _regex
except ImportError:  # pragma: no cover - regex ships with transformers
    _regex = None

MAX_REJECTED_REPORTED = 100
REGEX_TIMEOUT_S = 0.05
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ROW_ID = re.compile(r"^[A-Za-z0-9_.@/+=-]{1,120}$")
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)\s*\{")


class RowError(ValueError):
    """This row cannot become a prompt; the message says why."""


@dataclass(frozen=True)
class LoadResult:
    rows: list[dict[str, Any]]
    rejected: list[RejectedRow]
    rejected_count: int


def scalar_text(value: Any, what: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RowError(f"{what} is not a finite number")
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    if isinstance(value, str):
        return value
    raise RowError(f"{what} is a {type(value).__name__}, expected text or a number")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``) whose braces balance."""
    for match in list(_BOX_COMMAND.finditer(text))[-20:][::-1]:
        depth, i = 1, match.end()
        start = i
        while i < len(text):
            char = text[i]
            if char == "\\":
                i += 2
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    content = text[start:i].strip()
                    if content:
                        return content
                    break
            i += 1
    return None


RowCheck = Callable[[dict[str, Any]], str | None]  # a mapped row -> why it is refused, or None


class Mapper:
    def __init__(self, spec: DatasetSpec, check: RowCheck | None = None) -> None:
        self.spec = spec
        self.check = check
        self._pattern: Any = None
        if spec.answer_regex is not None:
            try:
                self._pattern = (_regex or re).compile(spec.answer_regex)
            except Exception as exc:  # re.error and regex.error share no base class
                raise ValueError(f"answer_regex does not compile: {exc}") from None

    # -- pieces ---------------------------------------------------------------------------------
    def _render(self, row: dict[str, Any], prompt: str) -> str:
        template = self.spec.template
        if template is None:
            return prompt

        def substitute(match: re.Match[str]) -> str:
            token = match.group(0)
            if token == "{{":
                return "{"
            if token == "}}":
                return "}"
            name = match.group(1)
            if name == "prompt":
                return prompt
            if name not in row or row[name] is None:
                raise RowError(f"template field {name!r} is missing")
            return scalar_text(row[name], f"template field {name!r}")

        return _PLACEHOLDER.sub(substitute, template)

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
        spec = self.spec
        value = row.get(spec.answer_field)
        if value is None:
            raise RowError(f"answer field {spec.answer_field!r} is missing")
        if isinstance(value, list):
            items = [scalar_text(v, "answer item") for v in value if v is not None]
            if not items:
                raise RowError(f"answer field {spec.answer_field!r} is an empty list")
            text = spec.answer_join.join(items) if spec.answer_join is not None else items[0]
        else:
            text = scalar_text(value, f"answer field {spec.answer_field!r}")
        if spec.answer_boxed:
            boxed = last_boxed(text)
            if boxed is None:
                raise RowError(f"no \\boxed{{}} answer in field {spec.answer_field!r}")
            text = boxed
        if spec.answer_after is not None:
            at = text.rfind(spec.answer_after)
            if at < 0:
                raise RowError(f"marker {spec.answer_after!r} not found in the answer field")
            text = text[at + len(spec.answer_after) :].strip()
            text = text.splitlines()[0] if text else ""
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
        prompt = scalar_text(raw_prompt, f"prompt field {spec.prompt_field!r}")
        text = self._render(row, prompt)
        if not text.strip():
            raise RowError("the prompt text is empty")
        if len(text) > 100_000:
            raise RowError("the prompt text is longer than 100,000 characters")
        if spec.id_field is not None:
            raw_id = row.get(spec.id_field)
            if raw_id is None:
                raise RowError(f"id field {spec.id_field!r} is missing")
            row_id = scalar_text(raw_id, f"id field {spec.id_field!r}")
            if not _ROW_ID.match(row_id):
                raise RowError(f"id {row_id[:50]!r} is not 1-120 characters of [A-Za-z0-9_.@/+=-]")
        else:
            row_id = str(line)
        out: dict[str, Any] = {"id": row_id, "answer": self.answer(row)}
        if spec.system_prompt is not None:
            out["messages"] = [
                {"role": "system", "content": spec.system_prompt},
                {"role": "user", "content": text},
            ]
        else:
            out["text"] = text
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
