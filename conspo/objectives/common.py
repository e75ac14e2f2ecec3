"""Shared building blocks of the objectives: masks, group segment operations, scores, KL.

Design choices that every objective inherits:

* **Padding is sanitised once.** ``masked_values`` replaces padded positions by 0 with
  ``torch.where`` before any arithmetic, so garbage in padding (``-inf``, NaN, huge values) never
  reaches an ``exp`` or a product, and the gradient there is exactly zero.
* **Groups are segments, not Python loops.** ``group_ids`` may hold arbitrary int64 values and
  need not be contiguous; ``torch.unique(return_inverse=True)`` maps them to ``0..n-1`` and every
  per-group reduction is an ``index_add`` / ``scatter_reduce`` over that index. The cost is a
  handful of tiny kernels whatever the number of groups.
* **Nothing exponentiates an unbounded value.** Log-sum-exp is max-shifted, log-ratios are
  clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` before ``exp`` (an importance ratio beyond
  e^20 ~ 5e8 is meaningless and would overflow float32 products); the clamp also stops the
  gradient there, which is the conservative choice for wildly off-policy tokens.
* **Invalid groups are masked with ``where`` after being computed on safe stand-in values**, so
  they give exact zeros (value and gradient) without data-dependent branching, and a batch with
  no valid group still returns a loss connected to the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LOG_RATIO_CLAMP",
    "POSITIVE_THRESHOLD",
    "BinaryGroupStats",
    "Groups",
    "as_bool_mask",
    "binary_group_stats",
    "check_batch",
    "clipped_log_ratio",
    "count_valid_groups",
    "disco_kl_penalty",
    "group_advantages",
    "group_index",
    "k3_kl",
    "masked_mean_all",
    "masked_values",
    "reduce_total",
    "segment_logsumexp",
    "segment_max",
    "segment_sum",
    "sequence_scores",
    "token_counts",
]

#: Rewards strictly above this value are positives (correct). Rewards are binary {0, 1} in the
#: paper; 0.5 splits them robustly even when a verifier returns 0.999 / 1e-6 or a float tensor.
POSITIVE_THRESHOLD: float = 0.5

#: Bound on |log pi - log pi_old| (and |ref - log pi|) before exponentiation. See module doc.
LOG_RATIO_CLAMP: float = 20.0

MEAN_REDUCES = ("mean", "sum")


def as_bool_mask(mask: Tensor, like: Tensor) -> Tensor:
    """Return ``mask`` as a bool tensor, checking that it matches ``like``'s shape."""
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != log-prob shape {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_batch(token_logprobs: Tensor, mask: Tensor, rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Validate the four batch tensors' shapes; return the mask as bool."""
    if token_logprobs.dim() != 2:
        raise ValueError(f"token_logprobs must be [B, T], got {tuple(token_logprobs.shape)}")
    batch = token_logprobs.shape[0]
    if rewards.shape != (batch,) or group_ids.shape != (batch,):
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} "
            f"must both be [{batch}]"
        )
    return as_bool_mask(mask, token_logprobs)


def masked_values(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` with padded positions replaced by 0 (zero gradient there, NaN-proof)."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def token_counts(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Number of valid tokens per sequence, as ``dtype`` (``[B]``)."""
    return mask.sum(-1).to(dtype)


def sequence_scores(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Length-normalised log-likelihood ``s(o) = (1/|o|) sum_t log pi(o_t)`` per sequence.

    An empty completion (mask all zero) scores 0 with zero gradient: its sum is 0 and the
    length is clamped to 1, so no 0/0 appears.
    """
    m = as_bool_mask(mask, token_logprobs)
    lp = masked_values(token_logprobs, m)
    return lp.sum(-1) / token_counts(m, lp.dtype).clamp(min=1.0)


def masked_mean_all(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the ``True`` positions of ``mask`` (0 when there are none)."""
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return total.sum() / mask.sum().clamp(min=1).to(values.dtype)


@dataclass(frozen=True)
class Groups:
    """Dense group index of a batch: ``index[b]`` in ``0..count-1`` and group sizes."""

    index: Tensor
    count: int
    sizes: Tensor


def group_index(group_ids: Tensor, dtype: torch.dtype = torch.float32) -> Groups:
    """Map arbitrary (non-contiguous) ``group_ids`` to a dense ``0..n-1`` index."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    count = uniq.numel()
    ones = torch.ones(group_ids.shape[0], dtype=dtype, device=group_ids.device)
    sizes = torch.zeros(count, dtype=dtype, device=group_ids.device).index_add(0, inverse, ones)
    return Groups(index=inverse, count=count, sizes=sizes)


def segment_sum(values: Tensor, groups: Groups) -> Tensor:
    """Per-group sum of a ``[B]`` tensor (differentiable)."""
    out = torch.zeros(groups.count, dtype=values.dtype, device=values.device)
    return out.index_add(0, groups.index, values)


def segment_max(values: Tensor, include: Tensor, groups: Groups) -> Tensor:
    """Per-group max over included entries (``-inf`` for groups with none); no gradient."""
    neg_inf = torch.full((), -math.inf, dtype=values.dtype, device=values.device)
    src = torch.where(include, values.detach(), neg_inf)
    out = torch.full((groups.count,), -math.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, groups.index, src, reduce="amax", include_self=True)


def segment_logsumexp(values: Tensor, include: Tensor, groups: Groups) -> tuple[Tensor, Tensor]:
    """Per-group ``log sum_{b in g, include[b]} exp(values[b])``, max-shifted.

    Returns ``(lse, has_any)``. Groups without an included entry get the finite stand-in 0 (not
    ``-inf``) and ``has_any = False``: callers mask them out, and the stand-in keeps every
    intermediate finite so the masked branch has an exactly zero, NaN-free gradient.
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    counts = segment_sum(include.to(values.dtype), groups)
    has_any = counts > 0
    shift = torch.where(has_any, segment_max(values, include, groups), zero)
    shifted = torch.where(include, values - shift[groups.index], zero)  # <= 0 where included
    terms = torch.where(include, torch.exp(shifted), zero)
    total = segment_sum(terms, groups)
    lse = torch.log(torch.where(has_any, total, torch.ones_like(total))) + shift
    return lse, has_any


@dataclass(frozen=True)
class BinaryGroupStats:
    """Positive / negative counts per group for binary rewards."""

    positive: Tensor  # [B] bool
    n_pos: Tensor  # [n] float
    n_neg: Tensor  # [n] float
    valid: Tensor  # [n] bool: at least one positive and one negative


def binary_group_stats(rewards: Tensor, groups: Groups, dtype: torch.dtype) -> BinaryGroupStats:
    """Split rewards at ``POSITIVE_THRESHOLD`` and count positives/negatives per group."""
    positive = rewards.detach() > POSITIVE_THRESHOLD
    n_pos = segment_sum(positive.to(dtype), groups)
    n_neg = groups.sizes.to(dtype) - n_pos
    return BinaryGroupStats(positive, n_pos, n_neg, (n_pos > 0) & (n_neg > 0))


def count_valid_groups(rewards: Tensor, group_ids: Tensor) -> int:
    """Number of groups holding at least one positive and one negative completion."""
    groups = group_index(group_ids)
    return int(binary_group_stats(rewards, groups, torch.float32).valid.sum())


def group_diagnostics(scores: Tensor, stats: BinaryGroupStats, groups: Groups) -> dict[str, Tensor]:
    """Group counts and the mean positive-minus-negative score gap over valid groups."""
    s = scores.detach()
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    pos_mean = segment_sum(torch.where(stats.positive, s, zero), groups) / stats.n_pos.clamp(min=1)
    neg_mean = segment_sum(torch.where(stats.positive, zero, s), groups) / stats.n_neg.clamp(min=1)
    n_valid = stats.valid.sum().to(s.dtype)
    gap = torch.where(stats.valid, pos_mean - neg_mean, zero).sum() / n_valid.clamp(min=1)
    all_pos = (stats.n_neg == 0).sum().to(s.dtype)
    all_neg = (stats.n_pos == 0).sum().to(s.dtype)
    return {
        "n_groups": torch.tensor(float(groups.count), dtype=s.dtype, device=s.device),
        "valid_groups": n_valid,
        "skipped_groups": all_pos + all_neg,
        "all_positive_groups": all_pos,
        "all_negative_groups": all_neg,
        "score_gap": gap,
    }


def group_advantages(
    rewards: Tensor,
    groups: Groups,
    *,
    scale: bool,
    std: str = "population",
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Group-relative advantage ``(r - mean_g) / (std_g + eps)`` (or ``r - mean_g`` unscaled).

    ``std="population"`` divides the variance by G (what the note's Proposition 1 assumes);
    ``"sample"`` by G - 1 (what ``torch.std`` and TRL use). A group with zero spread (or a single
    completion under ``"sample"``) gets advantage exactly 0 rather than 0/eps noise.
    """
    if std not in ("population", "sample"):
        raise ValueError(f"std must be 'population' or 'sample', got {std!r}")
    r = rewards.detach().to(dtype)
    sizes = groups.sizes.to(dtype)
    mean = segment_sum(r, groups) / sizes
    dev = r - mean[groups.index]
    if not scale:
        return dev
    ddof = 0.0 if std == "population" else 1.0
    dof = sizes - ddof
    var = segment_sum(dev * dev, groups) / dof.clamp(min=1)
    sd = torch.where(dof > 0, var.sqrt(), torch.zeros_like(var))[groups.index]
    spread = sd > 0
    return torch.where(spread, dev / torch.where(spread, sd + eps, torch.ones_like(sd)), 0.0)


def clipped_log_ratio(token_logprobs: Tensor, other_logprobs: Tensor) -> Tensor:
    """``log pi - log pi_other`` clamped to ``+-LOG_RATIO_CLAMP`` (inputs already sanitised)."""
    return (token_logprobs - other_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def k3_kl(token_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): ``exp(ref - logp) - (ref - logp) - 1``.

    Zero at padded positions. The log-ratio is clamped to ``+-LOG_RATIO_CLAMP`` before ``exp``.
    """
    m = as_bool_mask(mask, token_logprobs)
    d = clipped_log_ratio(masked_values(ref_logprobs, m), masked_values(token_logprobs, m))
    return masked_values(torch.exp(d) - d - 1.0, m)


def disco_kl_penalty(
    token_logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    groups: Groups,
    *,
    delta: float,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """DisCO's squared-hinge trust region ``beta * max(KL_g - delta, 0)^2``, per group.

    KL(pi_old || pi) is estimated from the behaviour samples as the token mean of
    ``log pi_old - log pi``. DisCO (arXiv 2505.12366) applies the hinge to the estimate over a
    whole mini-batch; a squared hinge of a batch mean is not additive over micro-batches, so we
    apply it per group, the unit the learner never splits. With one group per batch the two
    coincide. Returns ``(penalty[n], kl[n])``; inputs must already be sanitised.
    """
    dtype = token_logprobs.dtype
    per_seq = torch.where(mask, old_logprobs - token_logprobs, 0.0).sum(-1)
    n_tok = segment_sum(token_counts(mask, dtype), groups)
    kl = segment_sum(per_seq, groups) / n_tok.clamp(min=1)
    return beta * torch.relu(kl - delta).square(), kl


def reduce_total(total: Tensor, denominator: Tensor, reduce: str) -> Tensor:
    """``total`` for ``reduce='sum'``, else ``total / max(denominator, 1)``."""
    if reduce == "sum":
        return total
    return total / denominator.clamp(min=1)


def check_reduce(reduce: str, allowed: tuple[str, ...] = MEAN_REDUCES) -> None:
    """Raise ``ValueError`` for an unknown reduce mode."""
    if reduce not in allowed:
        raise ValueError(f"reduce must be one of {allowed}, got {reduce!r}")


def detach_all(diag: dict[str, Tensor | float]) -> dict[str, Tensor | float]:
    """Detach every tensor of a diagnostics dict (they must never hold a graph)."""
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in diag.items()}
