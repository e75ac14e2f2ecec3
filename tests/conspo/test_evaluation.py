"""Held-out evaluation: the arith split and the benchmarks, encoded as training encodes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from conspo.benchmarks import default_format
from conspo.evaluation import (
    Evaluator,
    Grader,
    ModelSampler,
    encode_set,
    evaluate,
    load_eval_set,
)
from conspo.models import default_checkpoint
from conspo.models.sft import evaluate as warm_start_evaluate
from conspo.models.tiny import context_length, load_policy
from conspo.prompting import encode_prompt
from conspo.protocol import Prompt
from conspo.rows import PromptFormat
from conspo.tasks.arith import make_split
from conspo.tasks.registry import get_task


@pytest.fixture(scope="module")
def tiny():
    return load_policy(default_checkpoint())


def test_arith_greedy_accuracy_matches_the_warm_start_evaluator(tiny):
    model, tokenizer = tiny
    eval_set = load_eval_set("arith", 24)
    assert [p.text for p in eval_set.prompts] == [
        p.prompt for p in make_split(0, 1000, 0).test[:24]
    ]
    ev = Evaluator(
        tokenizer,
        eval_set,
        k=2,
        temperature=1.0,
        top_p=1.0,
        max_tokens=None,
        seed=0,
        max_model_len=context_length(model, tokenizer),
    )
    record = ev.run(model, step=3)
    expected = warm_start_evaluate(model, tokenizer, make_split(0, 1000, 0).test[:24], greedy=True)
    assert record["greedy"] == pytest.approx(expected)
    assert 0.0 <= record["avg@2"] <= record["pass@2"] <= 1.0
    assert (record["step"], record["set"], record["n"], record["refused"]) == (3, "arith", 24, 0)
    assert ev.run(model, step=3)["avg@2"] == record["avg@2"]  # seeded sampling


def test_chunking_reports_progress_and_keeps_greedy_exact(tiny):
    model, tokenizer = tiny
    eval_set = load_eval_set("arith", 10)
    seen: list[int] = []
    kwargs = dict(max_model_len=128, k=2, temperature=1.0, top_p=1.0, seed=1)
    small = evaluate(
        ModelSampler(model, tokenizer), tokenizer, eval_set, chunk=3, progress=seen.append, **kwargs
    )
    whole = evaluate(ModelSampler(model, tokenizer), tokenizer, eval_set, chunk=64, **kwargs)
    assert seen == [3, 3, 3, 1, 3, 3, 3, 1]  # greedy pass, then sampled pass
    assert small["greedy"] == whole["greedy"]


def test_eval_prompts_encode_exactly_like_the_generator_encodes_training_prompts(
    shared_data: Path, user_model: Path
):
    """A GSM8K question as the api's feeder publishes it (same mapping, same format) gets the
    ids the generator would sample from; the learner's evaluation sees those very ids."""
    _, tokenizer = load_policy(user_model)
    fmt = default_format(has_chat_template=True)
    eval_set = load_eval_set("gsm8k", 4, fmt=fmt, data_dir=shared_data)
    ids, refused = encode_set(tokenizer, eval_set, 10_000)
    assert refused == []
    for prompt, got in zip(eval_set.prompts, ids, strict=True):
        assert prompt.messages is not None and prompt.messages[-1].content.endswith("\\boxed{}.")
        fed = Prompt.model_validate(prompt.model_dump())  # as decoded from the prompts stream
        assert got == encode_prompt(fed, tokenizer, 10_000)
        rendered = tokenizer.apply_chat_template(
            [m.model_dump() for m in prompt.messages], add_generation_prompt=True, tokenize=False
        )
        assert got == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_refused_prompts_count_as_wrong_and_are_reported(tiny):
    model, tokenizer = tiny
    eval_set = load_eval_set("arith", 4, fmt=PromptFormat(template="{prompt}" + "9" * 200))
    record = evaluate(
        ModelSampler(model, tokenizer), tokenizer, eval_set, max_model_len=128, k=1, seed=0
    )
    assert (record["refused"], record["greedy"], record["avg@1"]) == (4, 0.0, 0.0)


@pytest.mark.parametrize("name", ["math500", "aime24", "amc23", "gsm8k"])
def test_benchmark_sets_load_and_grade_their_own_gold_answers(shared_data, name):
    from conspo.evaluation import Grader

    eval_set = load_eval_set(name, 5, data_dir=shared_data)
    grade = Grader(eval_set.verifier)
    assert len(eval_set.prompts) == len(eval_set.answers) == 5
    for gold in eval_set.answers:
        assert grade(f"So the answer is \\boxed{{{gold}}}.", gold)
        assert not grade("I do not know.", gold)


def test_unknown_set_names_every_choice():
    with pytest.raises(ValueError, match="arith, chain, aime24"):
        load_eval_set("nope", 3)


def test_chain_set_is_the_task_held_out_split_graded_by_the_math_verifier():
    task = get_task("chain")
    eval_set = load_eval_set("chain", 30)
    test = task.test_problems(30)
    assert [p.text for p in eval_set.prompts] == [p.prompt for p in test]
    assert eval_set.answers == [p.answer for p in test]
    assert (eval_set.verifier, eval_set.max_tokens) == ("math", task.max_tokens)
    grade = Grader(eval_set.verifier)
    for p in test:
        assert grade(p.solution, p.answer)
        assert not grade(p.solution.replace("boxed", "box"), p.answer)  # no answer at all


def test_any_generation_backend_can_serve_an_evaluation(tiny):
    """``evaluate`` needs only ``Backend.generate``: the generator's own hf engine (the way
    ``conspo eval --backend vllm`` drives VLLMBackend) gives the in-process greedy numbers."""
    from services.generator.backends.base import Backend
    from services.generator.backends.hf import HFBackend

    model, tokenizer = tiny
    backend = HFBackend(model, tokenizer, seed_mode="batch")
    assert isinstance(backend, Backend)
    eval_set = load_eval_set("arith", 30)
    kwargs = dict(max_model_len=backend.max_model_len, k=2, seed=0)
    via_backend = evaluate(backend, backend.tokenizer, eval_set, **kwargs)
    in_process = evaluate(ModelSampler(model, tokenizer), tokenizer, eval_set, **kwargs)
    assert via_backend["greedy"] == in_process["greedy"]
    assert 0.0 <= via_backend["avg@2"] <= via_backend["pass@2"] <= 1.0
