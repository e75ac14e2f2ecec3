"""ConSPO: contrastive sequence-level objective (Zhang et al., arXiv 2605.12969).

Per group q with positives P and negatives N (scores ``s`` = length-normalised log-likelihood
under the current policy, no ratio, no clipping):

    J(q) = -(tau / N+) * sum_{i in P} softplus(-(D_i - m) / tau),
    D_i  = s_i - tau * logsumexp_{j in N}(s_j / tau).

This is the note's InfoNCE form evaluated stably: one max-shifted log-sum-exp over the
negatives per group (a segment operation) and one softplus per positive, never an ``exp`` of a
raw score. Groups with only positives or only negatives have no contrast and are discarded;
they are counted in the diagnostics.

Batch aggregation is not fixed by the paper, so it is a setting:

* ``reduce="mean"`` (default): mean over valid groups;
* ``reduce="all_groups"``: sum over valid groups divided by all groups (DisCO's choice);
* ``reduce="sum"``: negative sum over valid groups, for learners that micro-batch by whole
  groups and divide by the full-batch denominator themselves.

Splitting a group across micro-batches or ranks is only correct through
:func:`conspo_coefficients` (``c_i = dJ/ds_i``, computed on whole groups from detached scores)
and :func:`conspo_surrogate_loss`; Lemma 2 of the note gives their closed form, which is what
we compute (cheaper and exact, no second autograd pass). The optional DisCO KL constraint is
not covered by the coefficients: keep groups whole when it is on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from conspo.objectives.common import (
    BinaryGroupStats,
    Groups,
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
    sequence_scores,
)
from conspo.objectives.spec import ObjectiveSpec

__all__ = [
    "CONSPO",
    "CONSPO_REDUCES",
    "DEFAULT_KL_CONSTRAINT_BETA",
    "DEFAULT_KL_CONSTRAINT_DELTA",
    "DEFAULT_MARGIN",
    "DEFAULT_MARGIN_WARMUP_RATIO",
    "DEFAULT_TAU",
    "conspo_coefficients",
    "conspo_loss",
    "conspo_surrogate_loss",
    "group_denominator",
    "infonce_total",
    "margin_schedule",
]

#: Paper values (arXiv 2605.12969): temperature, target margin M, warm-up fraction alpha.
DEFAULT_TAU: float = 10.0
DEFAULT_MARGIN: float = 0.01
DEFAULT_MARGIN_WARMUP_RATIO: float = 0.3
#: DisCO's squared-hinge KL constraint (arXiv 2505.12366), off by default for ConSPO.
DEFAULT_KL_CONSTRAINT_DELTA: float = 1e-4
DEFAULT_KL_CONSTRAINT_BETA: float = 1e3

CONSPO_REDUCES = ("mean", "sum", "all_groups")


def margin_schedule(
    step: int | float,
    total_steps: int | float,
    target: float = DEFAULT_MARGIN,
    warmup_ratio: float = DEFAULT_MARGIN_WARMUP_RATIO,
) -> float:
    """Cosine margin ramp ``m_t = (M/2)(1 - cos(pi * min(lambda/alpha, 1)))``.

    ``lambda = step / total_steps`` clipped to [0, 1]. A pure function of the step counter, so
    the margin resumes exactly from a checkpointed step. ``total_steps <= 0`` (unknown horizon)
    counts as finished training and ``warmup_ratio <= 0`` as no ramp: both give the full margin.
    """
    progress = 1.0 if total_steps <= 0 else min(max(step / total_steps, 0.0), 1.0)
    rho = 1.0 if warmup_ratio <= 0 else min(progress / warmup_ratio, 1.0)
    return 0.5 * target * (1.0 - math.cos(math.pi * rho))


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def _contrast_terms(scores: Tensor, rewards: Tensor, group_ids: Tensor, tau: float, margin: float):
    """Shared quantities: ``(groups, stats, a_i = (s_i - m)/tau, L_g per row, counted_i)``."""
    groups = group_index(group_ids, scores.dtype)
    stats = binary_group_stats(rewards, groups, scores.dtype)
    idx = groups.index
    lse_neg, _ = segment_logsumexp(scores / tau, ~stats.positive, groups)  # L_g
    a = (scores - margin) / tau
    counted = stats.positive & stats.valid[idx]
    return groups, stats, a, lse_neg[idx], counted


def conspo_loss(
    token_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    tau: float = DEFAULT_TAU,
    margin: float = 0.0,
    reduce: str = "mean",
    old_logprobs: Tensor | None = None,
    kl_constraint: bool = False,
    kl_constraint_delta: float = DEFAULT_KL_CONSTRAINT_DELTA,
    kl_constraint_beta: float = DEFAULT_KL_CONSTRAINT_BETA,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """ConSPO loss: minus the mean over valid groups of the note's per-group objective J(q).

    Args:
        token_logprobs: ``[B, T]`` current-policy token log-probs.
        mask: ``[B, T]`` valid-token mask (bool or 0/1).
        rewards: ``[B]`` binary rewards; positives are ``rewards > 0.5``.
        group_ids: ``[B]`` integer prompt ids (any values, any order).
        tau: temperature (paper: 10).
        margin: margin m_t subtracted from positives (see :func:`margin_schedule`).
        reduce: ``"mean"`` | ``"all_groups"`` | ``"sum"`` (see module doc).
        old_logprobs: behaviour-policy token log-probs, needed with ``kl_constraint``.
        kl_constraint: add DisCO's ``kl_constraint_beta * max(KL_g - kl_constraint_delta,
            0)^2`` per valid group (a trust region to the behaviour policy; the learner's
            ``kl_beta`` setting is another term, a KL to the reference model).

    Returns ``(loss, diagnostics)``. With no valid group the loss is a zero still connected to
    ``token_logprobs`` (backward gives zero gradients).
    """
    check_reduce(reduce, CONSPO_REDUCES)
    _check_tau(tau)
    m = check_batch(token_logprobs, mask, rewards, group_ids)
    scores = sequence_scores(token_logprobs, m)
    total, groups, stats, contrast = infonce_total(scores, rewards, group_ids, tau, margin)
    denominator = group_denominator(stats, groups, reduce, scores)

    diag: dict[str, Tensor | float] = dict(group_diagnostics(scores, stats, groups))
    if kl_constraint:
        if old_logprobs is None:
            raise ValueError("kl_constraint=True needs old_logprobs")
        lp = masked_values(token_logprobs, m)
        old = masked_values(old_logprobs.detach(), m)
        penalty, _ = disco_kl_penalty(
            lp, old, m, groups, delta=kl_constraint_delta, beta=kl_constraint_beta
        )
        total = total + torch.where(stats.valid, penalty, 0.0).sum()
        diag["kl"] = masked_mean_all(old - lp, m)
        diag["kl_penalty"] = torch.where(stats.valid, penalty, 0.0).sum() / denominator
    loss = reduce_total(total, denominator, reduce)
    diag.update(contrast)
    diag["margin"] = float(margin)
    diag["denominator"] = denominator
    return loss, detach_all(diag)


#: Scores are log-likelihoods (no ratio): behaviour log-probs only for the KL constraint.
CONSPO = ObjectiveSpec(
    conspo_loss,
    denominator="valid_groups",
    behaviour_logprobs="kl_constraint",
    temperature="tau",
    margin_schedule="cosine",
)


def infonce_total(
    scores: Tensor, rewards: Tensor, group_ids: Tensor, tau: float, margin: float
) -> tuple[Tensor, Groups, BinaryGroupStats, dict[str, Tensor]]:
    """``-sum over valid groups of J(q)`` for any per-completion ``scores`` (differentiable),
    with the group index, the positive / negative counts and the ``P_i`` diagnostics."""
    groups, stats, a, lse_neg, counted = _contrast_terms(scores, rewards, group_ids, tau, margin)
    idx = groups.index
    # -J contribution of positive i: (tau / N+) * softplus(L_g - a_i); invalid -> exactly 0.
    weight = torch.where(counted, tau / stats.n_pos[idx].clamp(min=1), 0.0)
    softplus = F.softplus(lse_neg - a)
    total = (weight * softplus).sum()
    p_pos = torch.exp(-softplus.detach())  # P_i = sigmoid(a_i - L_g)
    n_counted = counted.sum().clamp(min=1).to(scores.dtype)
    uniform = 1.0 / (1.0 + stats.n_neg[idx])
    contrast = {
        "mean_p_pos": torch.where(counted, p_pos, 0.0).sum() / n_counted,
        "mean_p_pos_uniform": torch.where(counted, uniform, 0.0).sum() / n_counted,
    }
    return total, groups, stats, contrast


def group_denominator(stats: BinaryGroupStats, groups: Groups, reduce: str, like: Tensor) -> Tensor:
    """Valid groups (``reduce="mean"`` / ``"sum"``) or all groups (``"all_groups"``), >= 1."""
    value = torch.tensor(float(groups.count)) if reduce == "all_groups" else stats.valid.sum()
    return value.to(dtype=like.dtype, device=like.device).clamp(min=1)


def conspo_coefficients(
    scores: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    tau: float = DEFAULT_TAU,
    margin: float = 0.0,
) -> Tensor:
    """Per-completion ``c_i = dJ_total/ds_i`` with ``J_total = sum over valid groups of J(q)``.

    Lemma 2 of the note: ``(1 - P_i)/N+`` for a positive, ``-(1/N+) sum_{i in P} P_ij`` for a
    negative, 0 in invalid groups. ``P_ij = exp(s_j/tau - log Z_i)`` is summed over positives in
    log space, so every exponent is <= log N+. The result is detached; ``scores`` must cover
    whole groups. With ``-(c * s).sum() / n_valid_groups`` on any partition of the batch
    (:func:`conspo_surrogate_loss`), the summed gradients equal those of ``conspo_loss``.
    """
    _check_tau(tau)
    s = scores.detach()
    groups, stats, a, lse_neg, counted = _contrast_terms(s, rewards, group_ids, tau, margin)
    idx = groups.index
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    log_z = torch.logaddexp(a, lse_neg)  # log Z_i for positives
    inv_npos = 1.0 / stats.n_pos[idx].clamp(min=1)
    c_pos = torch.sigmoid(lse_neg - a) * inv_npos  # (1 - P_i) / N+, no cancellation
    # log sum_{i in P_g} 1/Z_i over counted positives, then P-weighted negatives.
    log_inv_z, _ = segment_logsumexp(-log_z, counted, groups)
    x = s / tau
    neg_exponent = torch.where(stats.positive, zero, x + log_inv_z[idx])
    c_neg = -torch.exp(neg_exponent) * inv_npos
    valid = stats.valid[idx]
    coef = torch.where(stats.positive, c_pos, c_neg)
    return torch.where(valid, coef, zero)


def conspo_surrogate_loss(
    token_logprobs: Tensor,
    mask: Tensor,
    coefficients: Tensor,
    n_valid_groups: int | float | Tensor,
) -> Tensor:
    """Surrogate ``-(c.detach() * s).sum() / n_valid_groups`` for split groups.

    Its value is not the ConSPO loss; its gradient is. Apply it to any part of a batch (a
    micro-batch, a rank's shard) with the coefficients of the whole batch and the whole batch's
    number of valid groups (clamped to >= 1, like the loss).
    """
    scores = sequence_scores(token_logprobs, mask)
    if isinstance(n_valid_groups, Tensor):
        denom = n_valid_groups.to(scores.dtype).clamp(min=1)
    else:
        denom = max(float(n_valid_groups), 1.0)
    return -(coefficients.detach().to(scores.dtype) * scores).sum() / denom
