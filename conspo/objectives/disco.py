"""DisCO with the log-sum-exp (DRO) scoring of negatives.

Li et al., "DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained
Optimization", arXiv 2505.12366. Per valid group, with length-normalised log-likelihood scores
(DisCO's "log-L" score):

    J(q) = mean_{i in P} s_i - tau * log mean_{j in N} exp(s_j / tau),       tau = 10,

computed as ``tau * (logsumexp_N(s/tau) - log N-)`` (max-shifted segment log-sum-exp). The
trust region is DisCO's squared hinge ``beta * max(KL - delta, 0)^2`` on
``KL(pi_old || pi)`` with ``delta = 1e-4``, ``beta = 1e3`` (hyper-parameters
``kl_constraint_delta`` and ``kl_constraint_beta``: the learner's ``kl_beta`` setting is a KL
to the reference model, another term); see
:func:`conspo.objectives.common.disco_kl_penalty` for why it is applied per group here. Without
``old_logprobs`` the behaviour policy is taken to be the current one (KL 0, no penalty).

Aggregation default ``reduce="all_groups"``: sum over valid groups divided by all groups, which
is what DisCO does (invalid groups contribute zero but stay in the count); ``"mean"`` divides by
valid groups, ``"sum"`` does not divide.
"""

from __future__ import annotations

import torch
from torch import Tensor

from conspo.objectives.common import (
    binary_group_stats,
    check_batch,
    check_reduce,
    detach_all,
    disco_kl_penalty,
    group_diagnostics,
    group_index,
    masked_mean_all,
    masked_values,
    reduce_total,
    segment_logsumexp,
    segment_sum,
    sequence_scores,
)
from conspo.objectives.conspo import (
    CONSPO_REDUCES,
    DEFAULT_KL_CONSTRAINT_BETA,
    DEFAULT_KL_CONSTRAINT_DELTA,
)
from conspo.objectives.spec import ObjectiveSpec

__all__ = ["DISCO", "disco"]


def disco(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    tau: float = 10.0,
    kl_constraint_delta: float = DEFAULT_KL_CONSTRAINT_DELTA,
    kl_constraint_beta: float = DEFAULT_KL_CONSTRAINT_BETA,
    reduce: str = "all_groups",
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """DisCO-logL loss: minus the aggregated per-group objective plus the KL hinge."""
    check_reduce(reduce, CONSPO_REDUCES)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    m = check_batch(token_logprobs, mask, rewards, group_ids)
    lp = masked_values(token_logprobs, m)
    scores = sequence_scores(lp, m)
    dtype = scores.dtype
    groups = group_index(group_ids, dtype)
    stats = binary_group_stats(rewards, groups, dtype)
    zero = torch.zeros((), dtype=dtype, device=scores.device)

    pos_mean = segment_sum(torch.where(stats.positive, scores, zero), groups) / stats.n_pos.clamp(
        min=1
    )
    lse_neg, _ = segment_logsumexp(scores / tau, ~stats.positive, groups)
    neg_term = tau * (lse_neg - torch.log(stats.n_neg.clamp(min=1)))
    objective = torch.where(stats.valid, pos_mean - neg_term, zero)
    total = -objective.sum()

    n_valid = stats.valid.sum().to(dtype)
    n_all = torch.tensor(float(groups.count), dtype=dtype, device=scores.device)
    denominator = (n_all if reduce == "all_groups" else n_valid).clamp(min=1)
    diag: dict[str, Tensor | float] = dict(group_diagnostics(scores, stats, groups))
    if old_logprobs is not None and kl_constraint_beta != 0.0:
        old = masked_values(old_logprobs.detach(), m)
        penalty, _ = disco_kl_penalty(
            lp, old, m, groups, delta=kl_constraint_delta, beta=kl_constraint_beta
        )
        penalty = torch.where(stats.valid, penalty, zero).sum()
        total = total + penalty
        diag["kl"] = masked_mean_all(old - lp, m)
        diag["kl_penalty"] = penalty / denominator
    diag["denominator"] = denominator
    return reduce_total(total, denominator, reduce), detach_all(diag)


#: The KL hinge is to the behaviour policy: its log-probs are needed while the hinge is on.
DISCO = ObjectiveSpec(
    disco, denominator="valid_groups", behaviour_logprobs="kl_constraint_beta", temperature="tau"
)
