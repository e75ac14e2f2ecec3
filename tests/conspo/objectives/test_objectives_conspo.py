"""ConSPO against the math of the design note ../shared/design/conspo.md (ConSPO items 2-4: the
per-group objective in its InfoNCE and softplus forms, the gradients with respect to the scores,
the margin ramp).

Expected values are computed here from the note's formulas with plain Python floats / explicit
loops in float64, never from the code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conspo.objectives import (
    DEFAULT_MARGIN,
    DEFAULT_MARGIN_WARMUP_RATIO,
    DEFAULT_TAU,
    POSITIVE_THRESHOLD,
    conspo_coefficients,
    conspo_loss,
    conspo_surrogate_loss,
    count_valid_groups,
    margin_schedule,
    sequence_scores,
)

F64 = torch.float64


def make_groups(seed: int, sizes: list[int], *, score_scale: float = 3.0):
    """Random valid groups (>= 1 positive and 1 negative each), shuffled, arbitrary ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = (torch.randperm(10_000, generator=gen)[: len(sizes)] * 13 - 50_000).tolist()
    gids, rewards = [], []
    for gid, size in zip(ids, sizes, strict=True):
        n_pos = int(torch.randint(1, size, (1,), generator=gen))
        gids += [gid] * size
        rewards += [1.0] * n_pos + [0.0] * (size - n_pos)
    perm = torch.randperm(len(gids), generator=gen)
    group_ids = torch.tensor(gids, dtype=torch.int64)[perm]
    reward = torch.tensor(rewards, dtype=F64)[perm]
    scores = -score_scale * torch.rand(len(gids), generator=gen, dtype=F64)
    return scores, reward, group_ids


def lemma2(scores, rewards, group_ids, tau, margin):
    """dJ_g/ds for every completion, from the closed forms of ConSPO item 3 (Python loops)."""
    s = scores.tolist()
    out = [0.0] * len(s)
    for gid in set(group_ids.tolist()):
        members = [b for b in range(len(s)) if int(group_ids[b]) == gid]
        pos = [b for b in members if rewards[b] > 0.5]
        neg = [b for b in members if rewards[b] <= 0.5]
        if not pos or not neg:
            continue
        n_pos = len(pos)
        z = {
            i: math.exp((s[i] - margin) / tau) + sum(math.exp(s[j] / tau) for j in neg) for i in pos
        }
        for i in pos:
            out[i] = (1.0 - math.exp((s[i] - margin) / tau) / z[i]) / n_pos
        for j in neg:
            out[j] = -sum(math.exp(s[j] / tau) / z[i] for i in pos) / n_pos
    return torch.tensor(out, dtype=F64)


def naive_group_objectives(scores, rewards, group_ids, tau, margin):
    """Per-valid-group J(q) from the note's first (ratio) form, and the number of groups."""
    s = scores.tolist()
    values = []
    for gid in sorted(set(group_ids.tolist())):
        members = [b for b in range(len(s)) if int(group_ids[b]) == gid]
        pos = [s[b] for b in members if rewards[b] > 0.5]
        neg = [s[b] for b in members if rewards[b] <= 0.5]
        if not pos or not neg:
            continue
        total = 0.0
        for si in pos:
            num = math.exp((si - margin) / tau)
            den = num + sum(math.exp(sj / tau) for sj in neg)
            total += tau * math.log(num / den)
        values.append(total / len(pos))
    return values, len(set(group_ids.tolist()))


def score_grad(scores, rewards, group_ids, **kw):
    """Autograd dLoss/ds using T = 1 (the score of a one-token completion is its log-prob)."""
    lp = scores[:, None].clone().requires_grad_()
    loss, diag = conspo_loss(lp, torch.ones_like(lp, dtype=torch.bool), rewards, group_ids, **kw)
    loss.backward()
    return loss, lp.grad[:, 0], diag


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("tau", "margin"), [(10.0, 0.0), (10.0, 0.01), (0.7, 0.0), (0.5, 0.4)])
def test_autograd_score_gradients_match_lemma2(seed, tau, margin):
    scores, rewards, gids = make_groups(seed, [8, 5, 3, 8, 2])
    _, grad, _ = score_grad(scores, rewards, gids, tau=tau, margin=margin, reduce="sum")
    expected = lemma2(scores, rewards, gids, tau, margin)
    torch.testing.assert_close(-grad, expected, rtol=1e-10, atol=1e-13)
    coef = conspo_coefficients(scores, rewards, gids, tau=tau, margin=margin)
    torch.testing.assert_close(coef, expected, rtol=1e-10, atol=1e-13)
    for gid in gids.unique():
        assert abs(float(grad[gids == gid].sum())) < 1e-12


def test_mean_reduce_divides_lemma2_by_valid_groups():
    scores, rewards, gids = make_groups(7, [8, 8, 4])
    _, grad, diag = score_grad(scores, rewards, gids)
    expected = lemma2(scores, rewards, gids, DEFAULT_TAU, 0.0) / 3
    torch.testing.assert_close(-grad, expected, rtol=1e-10, atol=1e-13)
    assert float(diag["denominator"]) == 3.0


@pytest.mark.parametrize("tau", [10.0, 2.0])
def test_negative_gradient_ratio_is_exp_score_gap_over_tau(tau):
    scores, rewards, gids = make_groups(3, [8, 8, 6], score_scale=8.0)
    _, grad, _ = score_grad(scores, rewards, gids, tau=tau)
    for gid in gids.unique():
        neg = ((gids == gid) & (rewards <= 0.5)).nonzero().flatten().tolist()
        for j in neg:
            for k in neg:
                ratio = float(grad[j] / grad[k])
                assert ratio == pytest.approx(math.exp((scores[j] - scores[k]) / tau), rel=1e-10)


def test_larger_margin_raises_every_positive_coefficient():
    scores, rewards, gids = make_groups(11, [8, 8, 5, 3])
    small = conspo_coefficients(scores, rewards, gids, margin=0.0)
    large = conspo_coefficients(scores, rewards, gids, margin=0.5)
    positive = rewards > 0.5
    assert bool((large[positive] > small[positive]).all())
    _, g_small, _ = score_grad(scores, rewards, gids, margin=0.0)
    _, g_large, _ = score_grad(scores, rewards, gids, margin=0.5)
    assert bool((-g_large[positive] > -g_small[positive]).all())


def test_all_positive_and_all_negative_groups_are_skipped():
    scores, rewards, gids = make_groups(5, [6])
    extra_scores = torch.tensor([-0.3, -1.2, -0.7, -2.0, -0.1], dtype=F64)
    extra_rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=F64)
    extra_ids = torch.tensor([99, 99, 99, -4, -4])
    all_s = torch.cat([scores, extra_scores])
    all_r = torch.cat([rewards, extra_rewards])
    all_g = torch.cat([gids, extra_ids])
    loss, grad, diag = score_grad(all_s, all_r, all_g)
    assert bool((grad[len(scores) :] == 0).all())
    values, _ = naive_group_objectives(scores, rewards, gids, DEFAULT_TAU, 0.0)
    assert loss.item() == pytest.approx(-values[0], rel=1e-12)
    assert float(diag["valid_groups"]) == 1.0
    assert float(diag["skipped_groups"]) == 2.0
    assert float(diag["all_positive_groups"]) == 1.0
    assert float(diag["all_negative_groups"]) == 1.0


@pytest.mark.parametrize("reward", [0.0, 1.0])
def test_no_valid_group_gives_connected_zero_loss(reward):
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1], [-3.0, -1.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    rewards = torch.full((3,), reward, dtype=F64)
    loss, diag = conspo_loss(lp, mask, rewards, torch.tensor([4, 4, 9]))
    assert loss.item() == 0.0
    assert loss.requires_grad
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros_like(lp))
    assert float(diag["valid_groups"]) == 0.0
    assert float(diag["skipped_groups"]) == 2.0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("margin", [0.0, 0.01, 0.2])
def test_loss_equals_naive_float64_formula(seed, margin):
    gen = torch.Generator().manual_seed(100 + seed)
    _, rewards, gids = make_groups(seed, [8, 4, 7, 2, 5])
    rewards[gids == gids[0]] = 1.0  # one all-positive group on top
    B, T = rewards.shape[0], 9
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp = -4.0 * torch.rand(B, T, generator=gen, dtype=F64)
    scores = torch.tensor(
        [sum(lp[b, : lengths[b]].tolist()) / int(lengths[b]) for b in range(B)], dtype=F64
    )
    values, n_groups = naive_group_objectives(scores, rewards, gids, 10.0, margin)
    for reduce, expected in [
        ("mean", -sum(values) / len(values)),
        ("sum", -sum(values)),
        ("all_groups", -sum(values) / n_groups),
    ]:
        loss, diag = conspo_loss(lp, mask, rewards, gids, margin=margin, reduce=reduce)
        assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert float(diag["valid_groups"]) == len(values)


def test_diagnostics_p_pos_and_gap_against_formula():
    scores, rewards, gids = make_groups(21, [8, 8, 8], score_scale=0.5)
    _, _, diag = score_grad(scores, rewards, gids)
    s = scores.tolist()
    p_values, uniform, gaps = [], [], []
    for gid in set(gids.tolist()):
        members = [b for b in range(len(s)) if int(gids[b]) == gid]
        pos = [s[b] for b in members if rewards[b] > 0.5]
        neg = [s[b] for b in members if rewards[b] <= 0.5]
        for si in pos:
            z = math.exp(si / 10) + sum(math.exp(sj / 10) for sj in neg)
            p_values.append(math.exp(si / 10) / z)
            uniform.append(1.0 / (1 + len(neg)))
        gaps.append(sum(pos) / len(pos) - sum(neg) / len(neg))
    assert float(diag["mean_p_pos"]) == pytest.approx(sum(p_values) / len(p_values), rel=1e-12)
    assert float(diag["score_gap"]) == pytest.approx(sum(gaps) / len(gaps), rel=1e-12)
    # Sanity figure of the note: at tau = 10 the mean P_i sits near 1 / (1 + N-).
    assert float(diag["mean_p_pos"]) == pytest.approx(sum(uniform) / len(uniform), rel=0.05)
    assert float(diag["mean_p_pos_uniform"]) == pytest.approx(sum(uniform) / len(uniform))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_split_across_micro_batches_gives_unsplit_gradient(dtype):
    gen = torch.Generator().manual_seed(3)
    B, T = 20, 12
    gids = torch.tensor([7] * 8 + [3] * 6 + [11] * 6)
    rewards = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0] + [1, 0, 1, 1, 0, 0] + [0] * 6, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp = (-3.0 * torch.rand(B, T, generator=gen, dtype=F64)).to(dtype).requires_grad_()
    margin = 0.05
    full, _ = conspo_loss(lp, mask, rewards, gids, margin=margin)
    (full_grad,) = torch.autograd.grad(full, lp)

    scores = sequence_scores(lp.detach(), mask)
    coef = conspo_coefficients(scores, rewards, gids, margin=margin)
    n_valid = count_valid_groups(rewards, gids)
    assert n_valid == 2
    # Group 7 is split 3 / 5 across two micro-batches; group 3 and 11 sit in one of them each.
    parts = [
        torch.tensor([0, 1, 2, 8, 9, 10, 11, 12, 13]),
        torch.tensor([3, 4, 5, 6, 7, *range(14, 20)]),
    ]
    for idx in parts:
        surrogate = conspo_surrogate_loss(lp[idx], mask[idx], coef[idx], n_valid)
        surrogate.backward()
    torch.testing.assert_close(lp.grad, full_grad, rtol=0, atol=1e-6)
    if dtype == torch.float64:
        torch.testing.assert_close(lp.grad, full_grad, rtol=1e-12, atol=1e-15)


def test_token_gradient_is_coefficient_over_length():
    gen = torch.Generator().manual_seed(8)
    _, rewards, gids = make_groups(8, [5, 6])
    B, T = rewards.shape[0], 7
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp = (-2.0 * torch.rand(B, T, generator=gen, dtype=F64)).requires_grad_()
    loss, _ = conspo_loss(lp, mask, rewards, gids, reduce="sum")
    loss.backward()
    scores = torch.tensor(
        [sum(lp[b, : lengths[b]].tolist()) / int(lengths[b]) for b in range(B)], dtype=F64
    )
    c = lemma2(scores.to(F64), rewards, gids, 10.0, 0.0)
    expected = torch.where(mask, (-c / lengths.to(F64))[:, None].expand(B, T), 0.0)
    torch.testing.assert_close(lp.grad, expected, rtol=1e-10, atol=1e-14)


def test_kl_constraint_adds_squared_hinge_per_valid_group():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5], [-2.0, -0.3]], dtype=F64, requires_grad=True)
    mask = torch.ones(3, 2, dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    gids = torch.tensor([1, 1, 1])
    base, _ = conspo_loss(lp, mask, rewards, gids)
    # KL(old || new) estimate = mean(old - new) = 0.01 over the group's 6 tokens.
    old = lp.detach() + torch.tensor([[0.02, 0.0], [0.01, 0.01], [0.0, 0.02]], dtype=F64)
    with_kl, diag = conspo_loss(lp, mask, rewards, gids, old_logprobs=old, kl_constraint=True)
    assert (with_kl - base).item() == pytest.approx(1e3 * (0.01 - 1e-4) ** 2, rel=1e-10)
    assert float(diag["kl"]) == pytest.approx(0.01, rel=1e-10)
    small = lp.detach() + 5e-5
    inside, _ = conspo_loss(lp, mask, rewards, gids, old_logprobs=small, kl_constraint=True)
    assert inside.item() == pytest.approx(base.item(), rel=1e-14)
    # d/d lp_t of beta*(KL - delta)^2 = -2 beta (KL - delta) / n_tokens.
    (g_kl,) = torch.autograd.grad(with_kl, lp)
    (g_base,) = torch.autograd.grad(base, lp)
    expected = torch.full_like(lp, -2 * 1e3 * (0.01 - 1e-4) / 6)
    torch.testing.assert_close(g_kl - g_base, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="old_logprobs"):
        conspo_loss(lp, mask, rewards, gids, kl_constraint=True)


def test_reduce_validation():
    lp = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="reduce"):
        conspo_loss(
            lp, torch.ones(2, 2), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), reduce="x"
        )
    with pytest.raises(ValueError, match="tau"):
        conspo_loss(lp, torch.ones(2, 2), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), tau=0.0)


def test_positive_threshold_is_one_half():
    assert POSITIVE_THRESHOLD == 0.5
    lp = torch.tensor([[-1.0], [-2.0], [-3.0]], dtype=F64)
    ones = torch.ones(3, 1, dtype=torch.bool)
    gids = torch.zeros(3, dtype=torch.int64)
    # 0.5 itself is a negative, 0.51 a positive.
    _, diag = conspo_loss(lp, ones, torch.tensor([0.5, 0.51, 0.2], dtype=F64), gids)
    assert float(diag["valid_groups"]) == 1.0
    _, diag = conspo_loss(lp, ones, torch.tensor([0.5, 0.4, 0.2], dtype=F64), gids)
    assert float(diag["valid_groups"]) == 0.0


class TestMarginSchedule:
    def test_paper_constants(self):
        assert (DEFAULT_TAU, DEFAULT_MARGIN, DEFAULT_MARGIN_WARMUP_RATIO) == (10.0, 0.01, 0.3)

    @pytest.mark.parametrize(
        ("step", "expected"),
        [
            (0, 0.0),
            (150, 0.005),  # lambda = 0.15 = alpha / 2 -> cos(pi/2) = 0 -> M/2
            (75, 0.005 * (1 - math.cos(math.pi / 4))),
            (300, 0.01),
            (650, 0.01),
            (1000, 0.01),
            (5000, 0.01),
            (-10, 0.0),
        ],
    )
    def test_cosine_ramp_values(self, step, expected):
        assert margin_schedule(step, 1000, 0.01, 0.3) == pytest.approx(expected, abs=1e-15)

    def test_monotone_and_resumable(self):
        values = [margin_schedule(t, 200) for t in range(201)]
        assert all(b >= a for a, b in itertools.pairwise(values))
        assert margin_schedule(37, 200) == values[37]  # pure function of the step

    def test_degenerate_horizons(self):
        assert margin_schedule(0, 100, 0.02, 0.0) == pytest.approx(0.02)
        assert margin_schedule(0, 0, 0.02, 0.3) == pytest.approx(0.02)
        assert margin_schedule(5, 0, 0.02, 0.0) == pytest.approx(0.02)


class TestSequenceScores:
    def test_length_normalised_with_empty_rows(self):
        lp = torch.tensor([[-1.0, -3.0, -100.0], [-2.0, -4.0, -6.0], [-5.0, -5.0, -5.0]])
        mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
        lp.requires_grad_()
        s = sequence_scores(lp, mask)
        torch.testing.assert_close(s, torch.tensor([-2.0, -4.0, 0.0]))
        s.sum().backward()
        expected = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 0.0]])
        torch.testing.assert_close(lp.grad, expected)

    def test_garbage_in_padding_is_ignored(self):
        lp = torch.tensor([[-1.0, float("-inf")], [float("nan"), float("inf")]], requires_grad=True)
        mask = torch.tensor([[True, False], [False, False]])
        s = sequence_scores(lp, mask)
        s.sum().backward()
        assert torch.equal(s, torch.tensor([-1.0, 0.0]))
        assert torch.equal(lp.grad, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
