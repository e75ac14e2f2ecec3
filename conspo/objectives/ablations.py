"""ConSPO's ablations (arXiv 2605.12969, ablation table): each changes one choice of ConSPO.

Registered as (see ``registry``):

* ``conspo_linear``: the linear positive-minus-negative score difference instead of InfoNCE,
  per valid group ``J(q) = mean_{i in P}(s_i - m) - mean_{j in N} s_j`` with ConSPO's scores.
  Every positive gets the same credit ``1/N+`` and every negative the same suppression
  ``-1/N-``: no extra weight for poorly separated positives or high-scoring negatives. The
  margin only shifts the value (a constant has no gradient), so it is kept for comparable
  logs and nothing else. This is also DisCO's objective as its tau grows without bound, and
  what GRPO is with log-likelihood scores instead of clipped ratios (the note's Proposition 1,
  without GRPO's ``sqrt(p(1-p))`` group weight).
* ``conspo_ratio``: clipped-ratio scores instead of log-likelihoods, in ConSPO's InfoNCE form:
  ``s+ = mean_t min(r_t, 1 + eps)`` for a positive, ``s- = mean_t max(r_t, 1 - eps)`` for a
  negative, ``r_t = pi / pi_old`` (the scores the note's Proposition 1 finds inside GRPO; eps
  0.2 as GRPO). Near the behaviour policy every score is ~1, so the contrast weights
  ``P_i`` collapse to ``1/(1 + N-)``: what the log-likelihood's spread contributes is exactly
  what this ablation removes. Without ``old_logprobs`` the behaviour policy is the current one.
* ``conspo_nomargin``: ConSPO with ``m_t = 0`` throughout (no margin hyper-parameter at all,
  so no setting can bring one back).
* ``conspo_fixedmargin``: ConSPO with ``m_t = M`` from the first step (no curriculum); it is
  ``conspo_loss`` itself, registered with a constant margin schedule that the learner applies.

Aggregation and diagnostics follow ``conspo_loss`` (``reduce`` mean / all_groups / sum,
denominator: valid groups). ``score_gap`` is always the log-likelihood gap, so it means the
same for every objective; ``conspo_ratio`` adds ``ratio_score_gap`` and ``mean_p_pos`` of its
own scores.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from conspo.objectives.common import (
    POSITIVE_THRESHOLD,
    binary_group_stats,
    check_batch,
    check_reduce,
    clipped_log_ratio,
    detach_all,
    group_diagnostics,
    group_index,
    masked_values,
    reduce_total,
    segment_sum,
    sequence_scores,
    token_counts,
)
from conspo.objectives.conspo import (
    CONSPO,
    CONSPO_REDUCES,
    DEFAULT_KL_CONSTRAINT_BETA,
    DEFAULT_KL_CONSTRAINT_DELTA,
    DEFAULT_TAU,
    conspo_loss,
    group_denominator,
    infonce_total,
)
from conspo.objectives.spec import ObjectiveSpec

__all__ = [
    "CONSPO_FIXEDMARGIN",
    "CONSPO_LINEAR",
    "CONSPO_NOMARGIN",
    "CONSPO_RATIO",
    "DEFAULT_RATIO_EPS",
    "conspo_linear",
    "conspo_nomargin",
    "conspo_ratio",
]

#: GRPO's clip range, the one whose scores the note's Proposition 1 writes down.
DEFAULT_RATIO_EPS: float = 0.2


def conspo_linear(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    margin: float = 0.0,
    reduce: str = "mean",
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Minus the mean over valid groups of ``mean_P (s - m) - mean_N s`` (module doc)."""
    check_reduce(reduce, CONSPO_REDUCES)
    m = check_batch(token_logprobs, mask, rewards, group_ids)
    scores = sequence_scores(token_logprobs, m)
    dtype = scores.dtype
    groups = group_index(group_ids, dtype)
    stats = binary_group_stats(rewards, groups, dtype)
    zero = torch.zeros((), dtype=dtype, device=scores.device)
    pos_sum = segment_sum(torch.where(stats.positive, scores, zero), groups)
    neg_sum = segment_sum(torch.where(stats.positive, zero, scores), groups)
    gap = pos_sum / stats.n_pos.clamp(min=1) - margin - neg_sum / stats.n_neg.clamp(min=1)
    total = -torch.where(stats.valid, gap, zero).sum()
    denominator = group_denominator(stats, groups, reduce, scores)
    diag: dict[str, Tensor | float] = dict(group_diagnostics(scores, stats, groups))
    diag["margin"] = float(margin)
    diag["denominator"] = denominator
    return reduce_total(total, denominator, reduce), detach_all(diag)


#: Log-likelihood scores and no KL option: no behaviour log-probs, no temperature.
CONSPO_LINEAR = ObjectiveSpec(
    conspo_linear, denominator="valid_groups", behaviour_logprobs=False, margin_schedule="cosine"
)


def conspo_ratio(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    tau: float = DEFAULT_TAU,
    margin: float = 0.0,
    eps: float = DEFAULT_RATIO_EPS,
    reduce: str = "mean",
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """ConSPO's InfoNCE objective on clipped-ratio scores (module doc)."""
    check_reduce(reduce, CONSPO_REDUCES)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    m = check_batch(token_logprobs, mask, rewards, group_ids)
    lp = masked_values(token_logprobs, m)
    old = lp.detach() if old_logprobs is None else masked_values(old_logprobs.detach(), m)
    ratio = torch.exp(clipped_log_ratio(lp, old))
    positive = (rewards.detach() > POSITIVE_THRESHOLD)[:, None]
    # min(r, 1+eps) for positives, max(r, 1-eps) for negatives: clamp stops the gradient there.
    clipped = torch.where(positive, ratio.clamp(max=1.0 + eps), ratio.clamp(min=1.0 - eps))
    n_tok = token_counts(m, lp.dtype).clamp(min=1.0)
    scores = masked_values(clipped, m).sum(-1) / n_tok
    total, groups, stats, contrast = infonce_total(scores, rewards, group_ids, tau, margin)
    denominator = group_denominator(stats, groups, reduce, scores)

    diag: dict[str, Tensor | float] = dict(group_diagnostics(sequence_scores(lp, m), stats, groups))
    diag["ratio_score_gap"] = group_diagnostics(scores, stats, groups)["score_gap"]
    r = ratio.detach()
    n_all = m.sum().clamp(min=1)
    diag["clip_frac_high"] = ((r > 1.0 + eps) & positive & m).sum() / n_all
    diag["clip_frac_low"] = ((r < 1.0 - eps) & ~positive & m).sum() / n_all
    diag.update(contrast)
    diag["margin"] = float(margin)
    diag["denominator"] = denominator
    return reduce_total(total, denominator, reduce), detach_all(diag)


#: Ratio scores are relative to the behaviour policy: its log-probs are always needed.
CONSPO_RATIO = ObjectiveSpec(
    conspo_ratio,
    denominator="valid_groups",
    behaviour_logprobs=True,
    temperature="tau",
    margin_schedule="cosine",
)


def conspo_nomargin(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    tau: float = DEFAULT_TAU,
    reduce: str = "mean",
    old_logprobs: Tensor | None = None,
    kl_constraint: bool = False,
    kl_constraint_delta: float = DEFAULT_KL_CONSTRAINT_DELTA,
    kl_constraint_beta: float = DEFAULT_KL_CONSTRAINT_BETA,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """``conspo_loss`` with the margin fixed at 0 (it takes no margin argument)."""
    return conspo_loss(
        token_logprobs,
        mask,
        rewards,
        group_ids,
        tau=tau,
        margin=0.0,
        reduce=reduce,
        old_logprobs=old_logprobs,
        kl_constraint=kl_constraint,
        kl_constraint_delta=kl_constraint_delta,
        kl_constraint_beta=kl_constraint_beta,
    )


#: ConSPO's needs, without a margin.
CONSPO_NOMARGIN = replace(CONSPO, fn=conspo_nomargin, margin_schedule=None)
#: ``conspo_loss`` itself, its margin applied from the first step.
CONSPO_FIXEDMARGIN = replace(CONSPO, margin_schedule="constant")
