"""Group probe: how much contrast a policy's G-sample groups carry, and of what kind.

Group-relative objectives learn only from mixed groups (some completions right, some wrong);
ConSPO contrasts length-normalised scores, so it also matters whether a group's wrong
completions differ from its right ones in length and content or only in the final answer. The
probe samples G completions per prompt at a temperature and reports:

- ``pass_rate``: mean correctness of the samples; ``mixed_fraction``: groups with 1..G-1 right;
- ``mean_tokens_correct`` / ``mean_tokens_wrong``: completion tokens (EOS included);
- over the wrong completions of mixed groups, ``wrong_length_differs``: the fraction whose
  token count differs from the gold completion's (``target`` + EOS), and
  ``wrong_diverges_before_answer``: the fraction whose text departs from the gold completion
  before the gold answer's last occurrence in it (an earlier step went wrong), as opposed to
  only in the final answer. For a task whose target is the answer alone this is always 0.

Deterministic for a seed (``sample_groups`` uses a private generator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from conspo.models.sampling import sample_groups
from conspo.tasks.registry import Problem

__all__ = ["GroupProbe", "probe_groups"]


class GroupProbe(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompts: int
    group_size: int
    temperature: float
    pass_rate: float
    mixed_fraction: float
    mean_tokens_correct: float | None
    mean_tokens_wrong: float | None
    wrong_length_differs: float | None
    wrong_diverges_before_answer: float | None


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _diverges_before_answer(text: str, target: str, answer: str) -> bool:
    answer_at = target.rfind(answer)
    cut = len(target) if answer_at < 0 else answer_at
    common = 0
    for a, b in zip(text, target, strict=False):
        if a != b:
            break
        common += 1
    return common < cut


def probe_groups(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    *,
    grade: Callable[[str, str], bool],
    max_new_tokens: int,
    group_size: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    max_batch_rows: int = 2048,
) -> GroupProbe:
    """Sample ``group_size`` completions per problem and summarise the groups."""
    if not problems:
        raise ValueError("no problems to probe")
    prompts = [list(ids) for ids in tokenizer([p.prompt for p in problems]).input_ids]
    groups = sample_groups(
        model,
        tokenizer,
        prompts,
        n=group_size,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        max_batch_rows=max_batch_rows,
    )
    n_correct = mixed = 0
    len_ok: list[float] = []
    len_bad: list[float] = []
    length_differs: list[float] = []
    diverges: list[float] = []
    for problem, group in zip(problems, groups, strict=True):
        right = [grade(s.text, problem.answer) for s in group]
        n_correct += sum(right)
        for s, ok in zip(group, right, strict=True):
            (len_ok if ok else len_bad).append(len(s.token_ids))
        if not 0 < sum(right) < len(group):
            continue
        mixed += 1
        gold_len = len(tokenizer(problem.target, add_special_tokens=False).input_ids) + 1
        for s, ok in zip(group, right, strict=True):
            if ok:
                continue
            length_differs.append(float(len(s.token_ids) != gold_len))
            diverges.append(float(_diverges_before_answer(s.text, problem.target, problem.answer)))
    return GroupProbe(
        prompts=len(problems),
        group_size=group_size,
        temperature=temperature,
        pass_rate=n_correct / (len(problems) * group_size),
        mixed_fraction=mixed / len(problems),
        mean_tokens_correct=_mean(len_ok),
        mean_tokens_wrong=_mean(len_bad),
        wrong_length_differs=_mean(length_differs),
        wrong_diverges_before_answer=_mean(diverges),
    )
