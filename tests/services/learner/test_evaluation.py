"""Held-out evaluation: the arith split and the math benchmark loaders and graders."""

from __future__ import annotations

import pytest

from conspo.models.sft import evaluate
from conspo.tasks.arith import make_split
from conspo.tasks.registry import get_task
from services.learner.evaluation import Evaluator, load_eval_set


def test_arith_greedy_accuracy_matches_the_warm_start_evaluator(tiny):
    model, tokenizer = tiny
    eval_set = load_eval_set("arith", 24)
    assert eval_set.prompts == [p.prompt for p in make_split(0, 1000, 0).test[:24]]
    ev = Evaluator(tokenizer, eval_set, k=2, temperature=1.0, top_p=1.0, max_tokens=None, seed=0)
    record = ev.run(model, step=3)
    expected = evaluate(model, tokenizer, make_split(0, 1000, 0).test[:24], greedy=True)
    assert record["greedy"] == pytest.approx(expected)
    assert 0.0 <= record["avg@2"] <= 1.0
    assert (record["step"], record["set"], record["n"]) == (3, "arith", 24)
    assert ev.run(model, step=3)["avg@2"] == record["avg@2"]  # seeded sampling


def test_chain_eval_set_is_the_task_held_out_split_graded_by_the_math_verifier():
    task = get_task("chain")
    eval_set = load_eval_set("chain", 30)
    test = task.test_problems(30)
    assert eval_set.prompts == [p.prompt for p in test]
    assert eval_set.answers == [p.answer for p in test]
    assert eval_set.max_tokens == task.max_tokens
    assert not eval_set.chat
    for p in test:
        assert eval_set.grade(p.solution, p.answer)
        assert not eval_set.grade(p.solution.replace("boxed", "box"), p.answer)  # no answer


def test_unknown_eval_set_names_the_valid_ones():
    with pytest.raises(ValueError, match="chain"):
        load_eval_set("gsm9k", 3)


@pytest.mark.parametrize("name", ["math500", "aime24", "amc23"])
def test_math_sets_load_and_grade_their_own_gold_answers(shared_data, name):
    eval_set = load_eval_set(name, 5, shared_data)
    assert len(eval_set.prompts) == len(eval_set.answers) == 5
    for gold in eval_set.answers:
        assert eval_set.grade(f"So the answer is \\boxed{{{gold}}}.", gold)
        assert not eval_set.grade("I do not know.", gold)
