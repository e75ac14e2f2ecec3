"""Held-out evaluation: greedy pass@1 and sampled avg@k, as the paper reports them.

One implementation serves the learner's periodic evaluation and ``conspo eval``:

- the prompts are ``Prompt`` objects built by ``conspo.rows.PromptFormat`` (the mapping the api
  applies to training rows) and encoded by ``conspo.prompting.encode_prompt`` (what the
  generator applies to every rollout), so a policy is evaluated on the ids it was trained on,
  chat template included;
- completions are graded by the verifier registry (``conspo.grading``), the same rule the
  verifier service applies to training rewards;
- sampling goes through any object with the generation engines' ``generate(prompt_ids,
  params)`` method (``services/generator/backends``: ``hf``, ``vllm``); ``ModelSampler`` adapts
  an in-process model (the learner's own, or one loaded by ``conspo eval --backend hf``).

Sets: every bundled task of ``conspo.tasks.registry`` (``arith``, ``chain``: the task's held-out
split, first ``n`` problems, text prompts, the task's verifier and generation budget) and every
benchmark of ``conspo.benchmarks`` (read in place from ``../shared/data/math``).

Metrics: ``greedy`` is pass@1 at temperature 0; ``avg@k`` the mean correctness over k samples
per problem at (temperature, top_p) (the paper: 0.6 / 0.95); ``pass@k`` the fraction of
problems with at least one correct sample. Prompts go in chunks (a progress bar can follow
them); each chunk samples with its own seed derived from the run's seed, so the numbers are a
pure function of (weights, set, seed): a resumed run evaluates exactly like an uninterrupted one,
and evaluation never touches the training RNG. A prompt the encoder refuses (too long for the
context, untokenisable) counts as wrong and is reported in ``refused``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from conspo.grading.config import GradeConfig
from conspo.prompting import PromptRejectedError, encode_prompt
from conspo.protocol import Prompt, SamplingParams, Verdict
from conspo.rows import PromptFormat
from conspo.tasks.registry import TASKS

log = logging.getLogger(__name__)

#: Prompts per engine call. Each chunk has its own seed, so the learner and ``conspo eval``
#: share this value to give the same numbers for the same weights and seed.
EVAL_CHUNK = 64
TASK_SETS = tuple(TASKS)


class HasText(Protocol):
    text: str


class Sampler(Protocol):
    """What evaluation needs of an engine: ``Backend.generate`` of the generator service."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Sequence[Sequence[HasText]]: ...


@dataclass(frozen=True)
class EvalSet:
    name: str
    prompts: list[Prompt]
    verifier: str
    max_tokens: int

    @property
    def answers(self) -> list[str]:
        return [p.answer for p in self.prompts]


def eval_set_names() -> list[str]:
    from conspo.benchmarks import BENCHMARKS

    return [*TASK_SETS, *sorted(BENCHMARKS)]


def load_eval_set(
    name: str,
    n: int | None = None,
    *,
    fmt: PromptFormat | None = None,
    chat_template: bool = False,
    data_dir: Path | None = None,
) -> EvalSet:
    """The first ``n`` items of set ``name`` as prompts. ``fmt`` is the training run's prompt
    format; None takes the set's default (for benchmarks: the math instruction, as a chat turn
    when ``chat_template``)."""
    if name in TASKS:
        task = TASKS[name]
        fmt = fmt or PromptFormat()
        prompts = [
            fmt.prompt(f"{name}-{i}", p.prompt, p.answer, task.verifier)
            for i, p in enumerate(task.test_problems(n))
        ]
        return EvalSet(name, prompts, task.verifier, task.max_tokens)
    from conspo.benchmarks import (
        UnknownBenchmarkError,
        default_format,
        get_benchmark,
        load_benchmark,
    )

    try:
        bench = get_benchmark(name)
    except UnknownBenchmarkError:
        raise UnknownBenchmarkError(name, TASK_SETS) from None
    fmt = fmt or default_format(chat_template)
    prompts = [
        fmt.prompt(item.id, item.question, item.answer, bench.verifier, item.row)
        for item in load_benchmark(name, n, data_dir)
    ]
    return EvalSet(name, prompts, bench.verifier, bench.max_tokens)


def encode_set(
    tokenizer: Any, eval_set: EvalSet, max_model_len: int
) -> tuple[list[list[int] | None], list[str]]:
    """Ids per prompt (None where refused) and the refusal reasons."""
    ids: list[list[int] | None] = []
    refused: list[str] = []
    for prompt in eval_set.prompts:
        try:
            ids.append(encode_prompt(prompt, tokenizer, max_model_len))
        except PromptRejectedError as exc:
            ids.append(None)
            refused.append(f"{prompt.prompt_id}: {exc}")
    if refused:
        log.warning(
            "%s: %d of %d prompts refused (scored wrong), e.g. %s",
            eval_set.name,
            len(refused),
            len(ids),
            refused[0],
        )
    return ids, refused


def chunk_seed(seed: int, phase: str, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{phase}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


class Grader:
    """``(completion, gold) -> correct?`` with the named verifier, in-process."""

    def __init__(self, verifier: str, config: GradeConfig | None = None) -> None:
        from conspo.grading.grade import grade_one

        self._grade_one = grade_one
        self.verifier = verifier
        self.config = config or GradeConfig()

    def __call__(self, completion: str, gold: str) -> bool:
        label = self._grade_one(completion, gold, self.verifier, self.config)
        return label.verdict == Verdict.CORRECT


def _correct_counts(
    sampler: Sampler,
    ids: list[list[int] | None],
    answers: list[str],
    grade: Callable[[str, str], bool],
    params: SamplingParams,
    *,
    seed: int,
    phase: str,
    chunk: int,
    progress: Callable[[int], None] | None,
) -> list[int]:
    """Correct samples per prompt (refused prompts: 0)."""
    counts = [0] * len(ids)
    todo = [i for i, x in enumerate(ids) if x is not None]
    for c, start in enumerate(range(0, len(todo), chunk)):
        part = todo[start : start + chunk]
        call = params.model_copy(update={"seed": chunk_seed(seed, phase, c)})
        groups = sampler.generate([ids[i] for i in part], call)  # type: ignore[misc]
        for i, group in zip(part, groups, strict=True):
            counts[i] = sum(grade(s.text, answers[i]) for s in group)
        if progress is not None:
            progress(len(part))
    return counts


def evaluate(
    sampler: Sampler,
    tokenizer: Any,
    eval_set: EvalSet,
    *,
    max_model_len: int,
    k: int,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_tokens: int | None = None,
    seed: int = 0,
    chunk: int = EVAL_CHUNK,
    grade: Callable[[str, str], bool] | None = None,
    progress: Callable[[int], None] | None = None,
    encoded: tuple[list[list[int] | None], list[str]] | None = None,
) -> dict[str, Any]:
    """Greedy pass@1, avg@k and pass@k of ``sampler`` on ``eval_set``. ``progress`` is called
    with the number of prompts finished per chunk (twice over the set: greedy, then sampled)."""
    start = time.perf_counter()
    ids, refused = encoded or encode_set(tokenizer, eval_set, max_model_len)
    grade = grade or Grader(eval_set.verifier)
    budget = max_tokens or eval_set.max_tokens
    answers = eval_set.answers
    common = dict(seed=seed, chunk=chunk, progress=progress)
    greedy = _correct_counts(
        sampler,
        ids,
        answers,
        grade,
        SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=budget),
        phase="greedy",
        **common,
    )
    sampled = _correct_counts(
        sampler,
        ids,
        answers,
        grade,
        SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=budget),
        phase="sampled",
        **common,
    )
    n = max(1, len(ids))
    return {
        "set": eval_set.name,
        "n": len(ids),
        "greedy": sum(greedy) / n,
        f"avg@{k}": sum(sampled) / (n * k),
        f"pass@{k}": sum(c > 0 for c in sampled) / n,
        "k": k,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": budget,
        "refused": len(refused),
        "eval_s": time.perf_counter() - start,
    }


class ModelSampler:
    """``Sampler`` over a transformers model in this process (``conspo.models.sample_groups``:
    the sampling the ``hf`` generator backend uses)."""

    def __init__(self, model: Any, tokenizer: Any, max_batch_rows: int = 1024) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_rows = max_batch_rows

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Sequence[Sequence[HasText]]:
        from conspo.models.sampling import sample_groups

        return sample_groups(
            self.model,
            self.tokenizer,
            prompts,
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_new_tokens=params.max_tokens,
            stop=params.stop,
            seed=params.seed,
            max_batch_rows=self.max_batch_rows,
        )


class Evaluator:
    """The learner's periodic evaluation: a fixed set and settings, run on its current model."""

    def __init__(
        self,
        tokenizer: Any,
        eval_set: EvalSet,
        *,
        k: int,
        temperature: float,
        top_p: float,
        max_tokens: int | None,
        seed: int,
        max_model_len: int,
        max_batch_rows: int = 1024,
    ) -> None:
        self.tokenizer = tokenizer
        self.set = eval_set
        self.options = dict(
            k=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed
        )
        self.max_model_len = max_model_len
        self.max_batch_rows = max_batch_rows
        self.encoded = encode_set(tokenizer, eval_set, max_model_len)
        self.grade = Grader(eval_set.verifier)

    def run(self, model: Any, step: int) -> dict[str, Any]:
        sampler = ModelSampler(model, self.tokenizer, self.max_batch_rows)
        record = evaluate(
            sampler,
            self.tokenizer,
            self.set,
            max_model_len=self.max_model_len,
            grade=self.grade,
            encoded=self.encoded,
            chunk=EVAL_CHUNK,
            **self.options,
        )
        return {"step": step, **record}
