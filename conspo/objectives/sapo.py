"""SAPO: soft adaptive policy optimisation (smooth sigmoid gates instead of hard clipping).

Gao et al. (Qwen), "Soft Adaptive Policy Optimization", arXiv 2511.20347:

    J = 1/G sum_i 1/|o_i| sum_t f(r_t) A_i,   f(r) = sigmoid(tau (r - 1)) * 4 / tau,

with ``tau = tau_pos`` for ``A > 0`` and ``tau_neg`` for ``A < 0``; paper defaults
``tau_pos = 1.0``, ``tau_neg = 1.05`` (negatives decay faster). ``d f / d log pi =
4 p (1 - p) r`` with ``p = sigmoid(tau (r - 1))``, i.e. exactly the on-policy gradient at
``r = 1``, smoothly attenuated away from it. Aggregation: seq-mean-token-mean (denominator:
sequences). ``sigmoid`` saturates, so the clamped ratio cannot overflow anything.

SAPO has no hard clip; as "clip fractions" we report the share of tokens whose gate weight
``4 p (1 - p)`` fell below 0.5, split by ``r < 1`` (low) and ``r > 1`` (high).
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
    token_counts,
)
from conspo.objectives.grpo import add_kl, prepare
from conspo.objectives.spec import ObjectiveSpec

__all__ = ["SAPO", "sapo"]


def sapo(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    beta: float = 0.0,
    std: str = "population",
    adv_eps: float = 1e-6,
    reduce: str = "mean",
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """SAPO (arXiv 2511.20347): ``-f(r) A`` per token with the soft gate ``f``."""
    check_reduce(reduce)
    if not (tau_pos > 0 and tau_neg > 0):
        raise ValueError("tau_pos and tau_neg must be > 0")
    m, lp, old, groups, diag = prepare(token_logprobs, mask, rewards, group_ids, old_logprobs)
    adv = group_advantages(rewards, groups, scale=True, std=std, eps=adv_eps, dtype=lp.dtype)
    ratio = torch.exp(clipped_log_ratio(lp, old))
    a = adv[:, None]
    tau = torch.full_like(a, tau_neg).masked_fill(a > 0, tau_pos)
    gate = torch.sigmoid(tau * (ratio - 1.0))
    per_token = -(gate * (4.0 / tau)) * a
    per_token = add_kl(per_token, lp, ref_logprobs, m, beta, diag)
    per_seq = masked_values(per_token, m).sum(-1) / token_counts(m, lp.dtype).clamp(min=1)

    g = gate.detach()
    weak = (4.0 * g * (1.0 - g) < 0.5) & m
    r = ratio.detach()
    n_tok = m.sum().clamp(min=1)
    diag["clip_frac_low"] = (weak & (r < 1.0)).sum() / n_tok
    diag["clip_frac_high"] = (weak & (r > 1.0)).sum() / n_tok
    diag["gate_weight_mean"] = masked_values(4.0 * g * (1.0 - g), m).sum() / n_tok
    denominator = torch.tensor(float(max(lp.shape[0], 1)), dtype=lp.dtype, device=lp.device)
    diag["denominator"] = denominator
    return reduce_total(per_seq.sum(), denominator, reduce), detach_all(diag)


#: Soft-gated token ratios to the behaviour policy; its own KL to the reference model.
SAPO = ObjectiveSpec(sapo, denominator="sequences", reference_kl="beta")
