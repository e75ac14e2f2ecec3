"""CISPO: clipped importance-sampling weight policy optimisation.

MiniMax, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention",
arXiv 2506.13585, eq. 4: every token keeps its gradient, weighted by a *stop-gradient* clipped
IS weight instead of PPO's clipped objective:

    J = 1/sum_i |o_i| * sum_i sum_t sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A_i * log pi(o_t)

Token-level mean over all tokens of the batch (denominator: tokens); group-normalised
advantage as GRPO.

Defaults (the paper publishes no numbers): no lower bound (``eps_low=None``; the paper says it
"did not impose a lower bound ... by setting eps_low to a large value") and ``eps_high=3.0``,
i.e. the IS weight is truncated at 4, the value ScaleRL (Khatri et al., "The Art of Scaling
Reinforcement Learning Compute for LLMs", arXiv 2510.13786) uses for its CISPO runs. Frameworks
that reuse GRPO's 0.2/0.28 get a much tighter truncation; pass ``eps_high`` to match them.
The loss *value* contains ``log pi`` (it is a REINFORCE surrogate); only its gradient is
meaningful.
"""

from __future__ import annotations

import torch
from torch import Tensor

from conspo.objectives.common import (
    check_reduce,
    clipped_log_ratio,
    detach_all,
    group_advantages,
    masked_values,
    reduce_total,
)
from conspo.objectives.grpo import add_kl, prepare
from conspo.objectives.spec import ObjectiveSpec

__all__ = ["CISPO", "cispo"]


def cispo(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    eps_low: float | None = None,
    eps_high: float = 3.0,
    beta: float = 0.0,
    std: str = "population",
    adv_eps: float = 1e-6,
    reduce: str = "mean",
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """CISPO (arXiv 2506.13585): ``-sg(clip(r)) * A * log pi`` per token, batch token mean."""
    check_reduce(reduce)
    m, lp, old, groups, diag = prepare(token_logprobs, mask, rewards, group_ids, old_logprobs)
    adv = group_advantages(rewards, groups, scale=True, std=std, eps=adv_eps, dtype=lp.dtype)
    ratio = torch.exp(clipped_log_ratio(lp, old)).detach()
    low = None if eps_low is None else 1.0 - eps_low
    weight = ratio.clamp(min=low, max=1.0 + eps_high)
    per_token = -(weight * adv[:, None]) * lp
    per_token = add_kl(per_token, lp, ref_logprobs, m, beta, diag)
    n_tok = m.sum().clamp(min=1)
    below = torch.zeros_like(m) if low is None else ratio < low
    diag["clip_frac_low"] = (below & m).sum() / n_tok
    diag["clip_frac_high"] = ((ratio > 1.0 + eps_high) & m).sum() / n_tok
    denominator = n_tok.to(lp.dtype)
    diag["denominator"] = denominator
    total = masked_values(per_token, m).sum()
    return reduce_total(total, denominator, reduce), detach_all(diag)


#: Token ratios to the behaviour policy, token-level mean; its own KL to the reference model.
CISPO = ObjectiveSpec(cispo, denominator="tokens", reference_kl="beta")
