"""GRPO and its token-ratio descendants Dr.GRPO and DAPO.

All three share one per-token PPO surrogate ``min(r_t A, clip(r_t, 1-eps_low, 1+eps_high) A)``
with the group-relative advantage; they differ only in the advantage scaling and in how token
losses are aggregated, which is exactly what decides micro-batching:

* GRPO (Shao et al., "DeepSeekMath", arXiv 2402.03300): ``(r - mean)/(std + eps)``; mean over
  the tokens of a sequence, then over sequences. Denominator: sequences.
* Dr.GRPO (Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective",
  arXiv 2503.20783): ``r - mean`` (no std); per-sequence token *sum* divided by a constant
  (the maximum completion length), then mean over sequences. Denominator: sequences.
* DAPO (Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
  arXiv 2503.14476): clip-higher (0.2 / 0.28), token-level mean over all tokens of the batch,
  soft overlong penalty added to the reward, no KL. Denominator: tokens.

``old_logprobs=None`` means on-policy (``pi_old = pi.detach()``, ratio 1), as TRL does with a
single iteration per batch. The optional ``beta * k3`` KL to ``ref_logprobs`` is added per
token before aggregation (TRL's convention). Groups with identical rewards have zero advantage;
they still count in the denominators, as in TRL: filter them beforehand (DAPO's dynamic
sampling, :func:`dapo_dynamic_sampling_mask`) to drop them from the mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from conspo.objectives.common import (
    Groups,
    binary_group_stats,
    check_batch,
    check_reduce,
    clipped_log_ratio,
    detach_all,
    group_advantages,
    group_diagnostics,
    group_index,
    k3_kl,
    masked_values,
    reduce_total,
    sequence_scores,
    token_counts,
)
from conspo.objectives.spec import ObjectiveSpec

__all__ = [
    "DAPO",
    "DR_GRPO",
    "GRPO",
    "dapo",
    "dapo_dynamic_sampling_mask",
    "dapo_overlong_penalty",
    "dr_grpo",
    "grpo",
]


def prepare(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    old_logprobs: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Groups, dict[str, Tensor | float]]:
    """Sanitise inputs; return ``(mask, logp, old_logp, groups, base diagnostics)``."""
    m = check_batch(token_logprobs, mask, rewards, group_ids)
    lp = masked_values(token_logprobs, m)
    old = lp.detach() if old_logprobs is None else masked_values(old_logprobs.detach(), m)
    groups = group_index(group_ids, lp.dtype)
    stats = binary_group_stats(rewards, groups, lp.dtype)
    diag: dict[str, Tensor | float] = dict(group_diagnostics(sequence_scores(lp, m), stats, groups))
    return m, lp, old, groups, diag


def add_kl(
    per_token_loss: Tensor,
    lp: Tensor,
    ref_logprobs: Tensor | None,
    m: Tensor,
    beta: float,
    diag: dict[str, Tensor | float],
) -> Tensor:
    """Add ``beta * k3`` per token when ``beta != 0`` (requires ``ref_logprobs``)."""
    if beta == 0.0:
        return per_token_loss
    if ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs")
    kl = k3_kl(lp, ref_logprobs.detach(), m)
    diag["kl"] = (kl.sum() / m.sum().clamp(min=1)).detach()
    return per_token_loss + beta * kl


def ppo_token_objective(
    lp: Tensor,
    old: Tensor,
    advantages: Tensor,
    m: Tensor,
    eps_low: float,
    eps_high: float,
    diag: dict[str, Tensor | float],
) -> Tensor:
    """Per-token ``min(r A, clip(r) A)`` (``[B, T]``, padded positions not yet masked).

    Clip fractions follow TRL: a token counts as clipped low when ``r < 1 - eps_low`` and
    ``A < 0``, high when ``r > 1 + eps_high`` and ``A > 0`` (only then is the clip active).
    """
    ratio = torch.exp(clipped_log_ratio(lp, old))
    adv = advantages[:, None]
    obj = torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    r = ratio.detach()
    n_tok = m.sum().clamp(min=1)
    diag["clip_frac_low"] = ((r < 1.0 - eps_low) & (adv < 0) & m).sum() / n_tok
    diag["clip_frac_high"] = ((r > 1.0 + eps_high) & (adv > 0) & m).sum() / n_tok
    return obj


def _denominator(value: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).clamp(min=1)


def grpo(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    eps: float = 0.2,
    beta: float = 0.0,
    std: str = "population",
    adv_eps: float = 1e-6,
    reduce: str = "mean",
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """GRPO (arXiv 2402.03300): clipped token ratio, std-normalised group advantage.

    Defaults: ``eps=0.2``; population std (the note's Proposition 1; TRL uses ``std="sample"``,
    ``adv_eps=1e-4``); ``beta=0`` (modern practice; DeepSeekMath used 0.04 with k3).
    Aggregation: seq-mean-token-mean. ``reduce="sum"``: sum over sequences of token means.
    """
    check_reduce(reduce)
    m, lp, old, groups, diag = prepare(token_logprobs, mask, rewards, group_ids, old_logprobs)
    adv = group_advantages(rewards, groups, scale=True, std=std, eps=adv_eps, dtype=lp.dtype)
    per_token = -ppo_token_objective(lp, old, adv, m, eps, eps, diag)
    per_token = add_kl(per_token, lp, ref_logprobs, m, beta, diag)
    per_seq = masked_values(per_token, m).sum(-1) / token_counts(m, lp.dtype).clamp(min=1)
    denominator = _denominator(lp.shape[0], lp)
    diag["denominator"] = denominator
    return reduce_total(per_seq.sum(), denominator, reduce), detach_all(diag)


#: Token ratios to the behaviour policy; its own ``beta * k3`` KL to the reference model.
GRPO = ObjectiveSpec(grpo, denominator="sequences", reference_kl="beta")


def dr_grpo(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    eps: float = 0.2,
    beta: float = 0.0,
    max_len: int | None = None,
    reduce: str = "mean",
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Dr.GRPO (arXiv 2503.20783): no std, token sum / constant, mean over sequences.

    The constant is ``max_len`` (the generation budget, as in the paper and TRL's
    ``max_completion_length``); ``None`` uses the padded width T of this batch. A learner that
    re-pads micro-batches must pass ``max_len`` so every micro-batch uses the same constant.
    """
    check_reduce(reduce)
    m, lp, old, groups, diag = prepare(token_logprobs, mask, rewards, group_ids, old_logprobs)
    length = float(lp.shape[1] if max_len is None else max_len)
    if length <= 0:
        raise ValueError(f"max_len must be > 0, got {length}")
    adv = group_advantages(rewards, groups, scale=False, dtype=lp.dtype)
    per_token = -ppo_token_objective(lp, old, adv, m, eps, eps, diag)
    per_token = add_kl(per_token, lp, ref_logprobs, m, beta, diag)
    total = masked_values(per_token, m).sum() / length
    denominator = _denominator(lp.shape[0], lp)
    diag["denominator"] = denominator
    diag["length_constant"] = length
    return reduce_total(total, denominator, reduce), detach_all(diag)


#: As GRPO; the length constant is the generation budget, the same in every micro-batch.
DR_GRPO = ObjectiveSpec(
    dr_grpo, denominator="sequences", reference_kl="beta", generation_budget="max_len"
)


def dapo_overlong_penalty(lengths: Tensor, max_len: int, overlong_buffer: int) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to the reward.

    0 up to ``max_len - overlong_buffer`` tokens, then a linear ramp down to -1 at ``max_len``,
    and -1 beyond. (Paper: L_max = 20480, L_cache = 4096.)
    """
    if overlong_buffer <= 0 or max_len < overlong_buffer:
        raise ValueError("need 0 < overlong_buffer <= max_len")
    n = lengths.to(torch.float64)
    free = float(max_len - overlong_buffer)
    ramp = (free - n) / float(overlong_buffer)
    penalty = torch.where(n <= free, 0.0, torch.where(n <= max_len, ramp, -1.0))
    return penalty


def dapo_dynamic_sampling_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """``[B]`` bool: True for completions whose group is informative (not all equal).

    DAPO's dynamic sampling keeps only groups with ``0 < #correct < G`` and samples more prompts
    until the batch is full; correctness is ``rewards > 0.5`` (before any length shaping).
    """
    groups = group_index(group_ids)
    stats = binary_group_stats(rewards, groups, torch.float32)
    return stats.valid[groups.index]


def dapo(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    beta: float = 0.0,
    std: str = "population",
    adv_eps: float = 1e-6,
    max_len: int | None = None,
    overlong_buffer: int | None = None,
    reduce: str = "mean",
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """DAPO (arXiv 2503.14476): clip-higher, token-level mean over the batch's tokens.

    The soft overlong penalty is added to ``rewards`` when both ``max_len`` and
    ``overlong_buffer`` are given. ``reduce="sum"``: sum of token losses.
    """
    check_reduce(reduce)
    if (max_len is None) != (overlong_buffer is None):
        raise ValueError("give both max_len and overlong_buffer, or neither")
    m, lp, old, groups, diag = prepare(token_logprobs, mask, rewards, group_ids, old_logprobs)
    shaped = rewards.detach().to(lp.dtype)
    if max_len is not None and overlong_buffer is not None:
        penalty = dapo_overlong_penalty(m.sum(-1), max_len, overlong_buffer).to(lp.dtype)
        shaped = shaped + penalty
        diag["overlong_penalty"] = penalty.mean()
    adv = group_advantages(shaped, groups, scale=True, std=std, eps=adv_eps, dtype=lp.dtype)
    per_token = -ppo_token_objective(lp, old, adv, m, eps_low, eps_high, diag)
    per_token = add_kl(per_token, lp, ref_logprobs, m, beta, diag)
    total = masked_values(per_token, m).sum()
    denominator = _denominator(m.sum(), lp)
    diag["denominator"] = denominator
    return reduce_total(total, denominator, reduce), detach_all(diag)


#: Token-level mean over the batch.
DAPO = ObjectiveSpec(dapo, denominator="tokens", reference_kl="beta")
