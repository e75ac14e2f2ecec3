"""The task registry: lookups, bundled checkpoints, splits, and the in-process grading rule
agreeing with the verifier the pipeline uses for each task."""

from __future__ import annotations

import json

import pytest

from conspo.grading.config import GradeConfig
from conspo.grading.grade import grade_one
from conspo.grading.verifiers.registry import get_verifier
from conspo.protocol import Verdict
from conspo.tasks.registry import DEFAULT_TASK, TASKS, UnknownTaskError, get_task


def test_default_and_unknown():
    assert get_task().name == DEFAULT_TASK == "arith"
    assert get_task(None) is get_task("arith")
    assert set(TASKS) == {"arith", "chain"}
    with pytest.raises(UnknownTaskError) as info:
        get_task("sudoku")
    assert isinstance(info.value, KeyError)
    assert "arith" in str(info.value) and "chain" in str(info.value)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_bundled_checkpoint_and_recipe(name):
    task = get_task(name)
    folder = task.checkpoint
    assert (folder / "config.json").is_file()
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe.get("task_name", "arith") == name
    assert (recipe["split_seed"], recipe["n_test"]) == (task.split_seed, task.n_test)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5 * 2**20
    get_verifier(task.verifier)  # the pipeline's verifier for the task exists


@pytest.mark.parametrize("name", sorted(TASKS))
def test_split_rows_and_held_out_prefix(name):
    task = get_task(name)
    split = task.split()
    train = {p.prompt for p in split.train}
    assert not train & {p.prompt for p in split.test}
    assert len(split.test) == task.n_test
    assert task.test_problems(7) == split.test[:7]
    rows = task.training_rows()
    assert len(rows) == len(split.train)
    assert rows[0] == {"prompt": split.train[0].prompt, "answer": split.train[0].answer}
    assert task.split(10).test == split.test  # fewer training problems, same held-out set


@pytest.mark.parametrize("name", sorted(TASKS))
def test_in_process_grade_agrees_with_the_pipeline_verifier(name):
    task = get_task(name)
    config = GradeConfig()
    for p in task.test_problems(40):
        gold_text = p.target
        texts = [gold_text, gold_text[:-1], gold_text + "7", "no idea", f"{p.answer}"]
        for text in texts:
            verdict = grade_one(text, p.answer, task.verifier, config).verdict
            assert task.grade(text, p.answer) == (verdict == Verdict.CORRECT), (name, text)
        assert task.grade(gold_text, p.answer)
