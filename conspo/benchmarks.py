"""The math benchmarks of ``../shared/data/math`` by name, with the field mapping of each.

One table serves training and evaluation: ``conspo train --data gsm8k`` submits the file to the
api's dataset endpoint with ``dataset_fields`` (the api maps every row with ``conspo.rows``), and
``conspo eval --benchmark gsm8k`` (or the learner's ``eval_set``) reads the same file with the
same mapping through ``load_benchmark``, so a question and its gold answer are read identically
in both places. The files are read in place (``conspo.paths.shared_data_dir()``), never copied.

``MATH_INSTRUCTION`` is the Qwen2.5-Math chain-of-thought instruction: ``default_format`` appends
it to the question as a template, and makes the prompt a chat turn when the model has a chat
template, so the model is asked to box its answer the way the verifier reads it first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from conspo.paths import shared_data_dir
from conspo.rows import AnswerField, PromptFormat, RowError, field_text, gold_answer

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MATH_MAX_TOKENS = 1024


class Benchmark(BaseModel):
    """A benchmark file and how its rows map to (question, gold answer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    file: str
    size: int
    prompt_field: str
    answer: AnswerField
    id_field: str | None = None
    verifier: str = "math"
    max_tokens: int = MATH_MAX_TOKENS

    def path(self, data_dir: Path | None = None) -> Path:
        return (data_dir or shared_data_dir()) / self.file


class BenchmarkItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    question: str
    answer: str
    row: dict[str, Any]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            name="math500",
            file="math500.jsonl",
            size=500,
            prompt_field="problem",
            answer=AnswerField(answer_field="answer"),
        ),
        Benchmark(
            name="aime24",
            file="aime24.jsonl",
            size=30,
            prompt_field="problem",
            answer=AnswerField(answer_field="answer"),
            id_field="id",
        ),
        Benchmark(
            name="amc23",
            file="amc23.jsonl",
            size=40,
            prompt_field="question",
            answer=AnswerField(answer_field="answer"),
            id_field="id",
        ),
        Benchmark(
            name="gsm8k",
            file="gsm8k.jsonl",
            size=1319,
            prompt_field="question",
            answer=AnswerField(answer_field="answer", answer_after="#### "),
            id_field="idx",
        ),
        Benchmark(
            name="minerva_math",
            file="minerva_math.jsonl",
            size=272,
            prompt_field="problem",
            answer=AnswerField(answer_field="solution", answer_boxed=True),
            id_field="idx",
        ),
        Benchmark(
            name="olympiadbench",
            file="olympiadbench.jsonl",
            size=675,
            prompt_field="question",
            answer=AnswerField(answer_field="final_answer"),
            id_field="id",
        ),
    )
}


class UnknownBenchmarkError(ValueError):
    def __init__(self, name: str, extra: tuple[str, ...] = ()) -> None:
        known = ", ".join([*extra, *sorted(BENCHMARKS)])
        super().__init__(f"unknown benchmark {name!r}: use one of {known}")


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UnknownBenchmarkError(name) from None


def dataset_fields(bench: Benchmark) -> dict[str, Any]:
    """The field mapping of ``bench`` as the api's dataset spec spells it."""
    fields: dict[str, Any] = {
        "prompt_field": bench.prompt_field,
        **bench.answer.model_dump(exclude_defaults=True),
        "verifier": bench.verifier,
    }
    if bench.id_field is not None:
        fields["id_field"] = bench.id_field
    return fields


def default_format(has_chat_template: bool) -> PromptFormat:
    """The math instruction after the question; a chat turn when the model has a template."""
    return PromptFormat(template="{prompt}\n" + MATH_INSTRUCTION, chat=has_chat_template)


def load_benchmark(
    name: str, n: int | None = None, data_dir: Path | None = None
) -> list[BenchmarkItem]:
    """The first ``n`` items (all when None) of a benchmark, mapped as the api maps them."""
    bench = get_benchmark(name)
    path = bench.path(data_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"benchmark file {path} not found (set CONSPO_SHARED_DATA to the folder holding it)"
        )
    items: list[BenchmarkItem] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if n is not None and len(items) >= n:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                question = field_text(row.get(bench.prompt_field), bench.prompt_field)
                answer = gold_answer(row, bench.answer)
                raw_id = row.get(bench.id_field) if bench.id_field else None
            except RowError as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from None
            item_id = str(line_no) if raw_id is None else field_text(raw_id, "id")
            items.append(BenchmarkItem(id=item_id, question=question, answer=answer, row=row))
    return items
