"""Sequence-level ratio objectives: GSPO and GMPO.

Both replace GRPO's arithmetic mean of token ratios by a geometric mean, i.e. the exponential of
the mean token log-ratio, and both aggregate as a mean over sequences (denominator: sequences).
They differ in where clipping happens:

* GSPO (Zheng et al., "Group Sequence Policy Optimization", arXiv 2507.18071) clips the
  *sequence* ratio ``exp(mean_t log r_t)`` PPO-style with the paper's tiny range
  ``eps_low = 3e-4``, ``eps_high = 4e-4``.
* GMPO (Zhao et al., "Geometric-Mean Policy Optimization", arXiv 2507.20673) clips every
  *token* log-ratio in log space before the mean, one-sided by the advantage sign (the PPO
  trust region), with the paper's wide range ``(e^-0.4, e^0.4)``: objective
  ``A * exp(mean_t clip_sgn(log r_t))``, following the authors' released implementation.

The mean log-ratio is bounded (token log-ratios are clamped), so the ``exp`` cannot overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from conspo.objectives.common import (
    check_reduce,
    clipped_log_ratio,
    detach_all,
    group_advantages,
    k3_kl,
    masked_values,
    reduce_total,
    token_counts,
)
from conspo.objectives.grpo import prepare
from conspo.objectives.spec import ObjectiveSpec

__all__ = ["GMPO", "GSPO", "gmpo", "gspo"]


def _seq_kl(lp: Tensor, ref_logprobs: Tensor | None, m: Tensor, beta: float, diag: dict) -> Tensor:
    """Per-sequence token-mean k3 KL times beta (0 when beta == 0)."""
    if beta == 0.0:
        return torch.zeros(lp.shape[0], dtype=lp.dtype, device=lp.device)
    if ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs")
    kl = k3_kl(lp, ref_logprobs.detach(), m)
    diag["kl"] = (kl.sum() / m.sum().clamp(min=1)).detach()
    return beta * kl.sum(-1) / token_counts(m, lp.dtype).clamp(min=1)


def gspo(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    beta: float = 0.0,
    std: str = "population",
    adv_eps: float = 1e-6,
    reduce: str = "mean",
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """GSPO (arXiv 2507.18071): ``-min(s A, clip(s, 1-3e-4, 1+4e-4) A)`` per sequence, mean.

    ``s_i = exp(mean_t log r_t)``; advantage as GRPO. Clip fractions are over sequences.
    """
    check_reduce(reduce)
    m, lp, old, groups, diag = prepare(token_logprobs, mask, rewards, group_ids, old_logprobs)
    adv = group_advantages(rewards, groups, scale=True, std=std, eps=adv_eps, dtype=lp.dtype)
    n_tok = token_counts(m, lp.dtype)
    log_ratio = masked_values(clipped_log_ratio(lp, old), m)
    seq_ratio = torch.exp(log_ratio.sum(-1) / n_tok.clamp(min=1))
    clipped = seq_ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_seq = -torch.minimum(seq_ratio * adv, clipped * adv)
    per_seq = per_seq + _seq_kl(lp, ref_logprobs, m, beta, diag)
    r = seq_ratio.detach()
    n_seq = max(lp.shape[0], 1)
    diag["clip_frac_low"] = ((r < 1.0 - eps_low) & (adv < 0)).sum() / n_seq
    diag["clip_frac_high"] = ((r > 1.0 + eps_high) & (adv > 0)).sum() / n_seq
    denominator = torch.tensor(float(n_seq), dtype=lp.dtype, device=lp.device)
    diag["denominator"] = denominator
    return reduce_total(per_seq.sum(), denominator, reduce), detach_all(diag)


#: Sequence-level ratios to the behaviour policy; its own KL to the reference model.
GSPO = ObjectiveSpec(gspo, denominator="sequences", reference_kl="beta")


def gmpo(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    eps_low: float = 0.4,
    eps_high: float = 0.4,
    beta: float = 0.0,
    std: str = "population",
    adv_eps: float = 1e-6,
    reduce: str = "mean",
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """GMPO (arXiv 2507.20673): ``-A * exp(mean_t clip(log r_t))`` per sequence, mean.

    Token log-ratios are clipped one-sided by the advantage sign: ``min(log r, eps_high)``
    when ``A > 0``, ``max(log r, -eps_low)`` when ``A < 0`` (pessimistic, like PPO), with the
    paper's range ``(e^-0.4, e^0.4)``. Clip fractions are over tokens.
    """
    check_reduce(reduce)
    m, lp, old, groups, diag = prepare(token_logprobs, mask, rewards, group_ids, old_logprobs)
    adv = group_advantages(rewards, groups, scale=True, std=std, eps=adv_eps, dtype=lp.dtype)
    log_ratio = clipped_log_ratio(lp, old)
    a = adv[:, None]
    clipped = torch.where(
        a > 0,
        torch.clamp(log_ratio, max=eps_high),
        torch.where(a < 0, torch.clamp(log_ratio, min=-eps_low), log_ratio),
    )
    n_tok = token_counts(m, lp.dtype)
    seq_ratio = torch.exp(masked_values(clipped, m).sum(-1) / n_tok.clamp(min=1))
    per_seq = -adv * seq_ratio + _seq_kl(lp, ref_logprobs, m, beta, diag)
    lr = log_ratio.detach()
    n_all = m.sum().clamp(min=1)
    diag["clip_frac_low"] = ((lr < -eps_low) & (a < 0) & m).sum() / n_all
    diag["clip_frac_high"] = ((lr > eps_high) & (a > 0) & m).sum() / n_all
    denominator = torch.tensor(float(max(lp.shape[0], 1)), dtype=lp.dtype, device=lp.device)
    diag["denominator"] = denominator
    return reduce_total(per_seq.sum(), denominator, reduce), detach_all(diag)


GMPO = ObjectiveSpec(gmpo, denominator="sequences", reference_kl="beta")
