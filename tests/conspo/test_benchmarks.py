"""The benchmark table: every shared file loads, and the api maps it exactly like evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from conspo.benchmarks import (
    BENCHMARKS,
    UnknownBenchmarkError,
    dataset_fields,
    default_format,
    get_benchmark,
    load_benchmark,
)
from services.api.datasets.mapping import load_jsonl
from services.api.schemas import DatasetSpec

FIRST_ANSWERS = {
    "math500": r"\left( 3, \frac{\pi}{2} \right)",
    "aime24": "204",
    "amc23": "27",
    "gsm8k": "18",
    "minerva_math": "1.6",
    "olympiadbench": "2",
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_loads_with_its_mapping(shared_data: Path, name: str) -> None:
    items = load_benchmark(name, data_dir=shared_data)
    assert len(items) == BENCHMARKS[name].size
    assert items[0].answer == FIRST_ANSWERS[name]
    assert all(item.question.strip() and item.answer for item in items)
    assert len({item.id for item in items}) == len(items)
    assert load_benchmark(name, n=3, data_dir=shared_data) == items[:3]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
@pytest.mark.parametrize("chat", [False, True])
def test_the_api_maps_a_benchmark_exactly_like_evaluation(
    shared_data: Path, name: str, chat: bool
) -> None:
    bench = BENCHMARKS[name]
    fmt = default_format(chat)
    spec = DatasetSpec(
        path=bench.file, **dataset_fields(bench), **fmt.model_dump(exclude_defaults=True)
    )
    loaded = load_jsonl(bench.path(shared_data).read_bytes(), spec, max_rows=10_000)
    assert loaded.rejected_count == 0
    items = load_benchmark(name, data_dir=shared_data)
    assert [r["id"] for r in loaded.rows] == [i.id for i in items]
    assert [r["answer"] for r in loaded.rows] == [i.answer for i in items]
    for row, item in zip(loaded.rows, items, strict=True):
        prompt = fmt.prompt(item.id, item.question, item.answer, bench.verifier)
        assert row.get("text") == prompt.text
        expected = [m.model_dump() for m in prompt.messages] if prompt.messages else None
        assert row.get("messages") == expected


def test_unknown_benchmark_lists_the_known_ones() -> None:
    with pytest.raises(UnknownBenchmarkError, match="gsm8k"):
        get_benchmark("gsm9k")


def test_a_missing_file_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="CONSPO_SHARED_DATA"):
        load_benchmark("gsm8k", data_dir=tmp_path)
