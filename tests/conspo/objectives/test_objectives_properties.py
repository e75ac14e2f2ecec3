"""Property tests over random shapes, masks, rewards and group layouts (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conspo.objectives import (
    OBJECTIVES,
    conspo_coefficients,
    conspo_loss,
    get_objective,
    sequence_scores,
)

F64 = torch.float64


@st.composite
def batches(draw):
    """(lp, mask, rewards, group_ids, old, ref) with arbitrary, interleaved group ids."""
    n_groups = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(1, 6), min_size=n_groups, max_size=n_groups))
    ids = draw(
        st.lists(st.integers(-(2**40), 2**40), min_size=n_groups, max_size=n_groups, unique=True)
    )
    T = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    gids = torch.tensor([gid for gid, n in zip(ids, sizes, strict=True) for _ in range(n)])
    B = gids.shape[0]
    gids = gids[torch.randperm(B, generator=gen)]
    rewards = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=B, max_size=B)))
    mask = torch.rand(B, T, generator=gen) < draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    scale = draw(st.sampled_from([0.1, 3.0, 1e4]))
    lp = -scale * torch.rand(B, T, generator=gen, dtype=F64)
    old = lp + 0.5 * torch.randn(B, T, generator=gen, dtype=F64)
    ref = lp + 0.5 * torch.randn(B, T, generator=gen, dtype=F64)
    return lp.requires_grad_(), mask, rewards.to(F64), gids, old, ref


PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(batch=batches(), tau=st.sampled_from([10.0, 1.0, 0.3]), margin=st.sampled_from([0.0, 0.3]))
def test_conspo_finite_and_coefficients_are_the_gradient(batch, tau, margin):
    lp, mask, rewards, gids, _, _ = batch
    loss, diag = conspo_loss(lp, mask, rewards, gids, tau=tau, margin=margin, reduce="sum")
    (grad,) = torch.autograd.grad(loss, lp)
    assert math.isfinite(loss.item())
    assert bool(torch.isfinite(grad).all())
    coef = conspo_coefficients(
        sequence_scores(lp.detach(), mask), rewards, gids, tau=tau, margin=margin
    )
    # ConSPO item 3 of the design note: coefficients sum to zero inside every group.
    for gid in gids.unique():
        in_group = coef[gids == gid]
        assert abs(float(in_group.sum())) <= 1e-9 * max(1.0, float(in_group.abs().sum()))
    # Per token the gradient is -c_i / |o_i| (loss = -J), zero on padding.
    lengths = mask.sum(-1).clamp(min=1).to(F64)
    expected = torch.where(mask, (-coef / lengths)[:, None].expand_as(lp), 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-7, atol=1e-12)
    assert float(diag["valid_groups"]) + float(diag["skipped_groups"]) == len(gids.unique())


@PROPERTY_SETTINGS
@given(
    batch=batches(),
    name=st.sampled_from(sorted(OBJECTIVES)),
    n_parts=st.integers(1, 3),
    assignment_seed=st.integers(0, 1000),
)
def test_any_objective_decomposes_over_whole_group_micro_batches(
    batch, name, n_parts, assignment_seed
):
    lp, mask, rewards, gids, old, _ = batch
    obj = get_objective(name)
    kw = {"old_logprobs": old} if obj.needs_old_logprobs else {}
    full, _ = obj(lp, mask, rewards, gids, **kw)
    (full_grad,) = torch.autograd.grad(full, lp)
    assert math.isfinite(full.item())
    assert bool(torch.isfinite(full_grad).all())

    denominator = obj.denominator(mask, rewards, gids)
    uniq = gids.unique()
    gen = torch.Generator().manual_seed(assignment_seed)
    part_of = torch.randint(0, n_parts, (len(uniq),), generator=gen)
    total = torch.zeros((), dtype=F64)
    for k in range(n_parts):
        idx = torch.isin(gids, uniq[part_of == k]).nonzero().flatten()
        if idx.numel() == 0:
            continue
        part_kw = {key: value[idx] for key, value in kw.items()}
        part, _ = obj(lp[idx], mask[idx], rewards[idx], gids[idx], reduce="sum", **part_kw)
        total = total + part / denominator
    (split_grad,) = torch.autograd.grad(total, lp) if total.requires_grad else (None,)
    scale = max(1.0, abs(full.item()))
    assert abs(total.item() - full.item()) <= 1e-9 * scale
    if split_grad is not None:
        torch.testing.assert_close(split_grad, full_grad, rtol=1e-8, atol=1e-10)
