"""Baselines against hand-computed numbers, the note's Proposition 1 and TRL's published formulas.

Every expected value is written out by hand (with the arithmetic in comments) or recomputed
here from the paper's formula with explicit float64 loops; nothing is taken from the code under
test. TRL is not imported: its GRPOTrainer loss semantics (loss_type "grpo" / "dapo" /
"dr_grpo") are re-stated in ``trl_reference``.
"""

from __future__ import annotations

import math

import pytest
import torch

from conspo.objectives import (
    cispo,
    dapo,
    dapo_dynamic_sampling_mask,
    dapo_overlong_penalty,
    disco,
    dr_grpo,
    gmpo,
    grpo,
    gspo,
    k3_kl,
    sapo,
)

F64 = torch.float64


def hand_batch():
    """One group, rewards [1, 0]; token ratios seq0 [1.5, 0.9 | pad], seq1 [0.5, 1.1, 1.0]."""
    ratios = torch.tensor([[1.5, 0.9, 7.0], [0.5, 1.1, 1.0]], dtype=F64)
    old = torch.full((2, 3), -1.0, dtype=F64)
    lp = (old + ratios.log()).requires_grad_()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return lp, old, mask, torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([5, 5])


def loss_and_grad(fn, lp, *args, **kw):
    loss, diag = fn(lp, *args, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.item(), grad, diag


class TestHandComputed:
    def test_grpo(self):
        lp, old, mask, r, g = hand_batch()
        # Population std of [1, 0] is 0.5 -> A = [+1, -1].
        # seq0 (A=+1): -min(r, 1.2) = [-1.2, -0.9] -> mean -1.05
        # seq1 (A=-1): +max(r, 0.8) = [0.8, 1.1, 1.0] -> mean 0.96667; loss = mean -0.041667
        loss, grad, diag = loss_and_grad(grpo, lp, mask, r, g, old_logprobs=old, adv_eps=0.0)
        assert loss == pytest.approx((-1.05 + 2.9 / 3) / 2, rel=1e-12)
        expected = torch.tensor(
            [[0.0, -0.9 / 2 / 2, 0.0], [0.0, 1.1 / 3 / 2, 1.0 / 3 / 2]], dtype=F64
        )
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
        assert float(diag["clip_frac_low"]) == pytest.approx(1 / 5)
        assert float(diag["clip_frac_high"]) == pytest.approx(1 / 5)
        assert float(diag["denominator"]) == 2.0

    def test_dr_grpo(self):
        lp, old, mask, r, g = hand_batch()
        # No std: A = r - mean = [+0.5, -0.5].
        # seq0 token losses -0.5*min(r, 1.2) = [-0.6, -0.45]  (sum -1.05)
        # seq1 token losses +0.5*max(r, 0.8) = [0.4, 0.55, 0.5] (sum 1.45)
        # loss = (sum over tokens) / (B * L) with L = T = 3 -> 0.4 / 6
        loss, grad, diag = loss_and_grad(dr_grpo, lp, mask, r, g, old_logprobs=old)
        assert loss == pytest.approx(0.4 / 6, rel=1e-12)
        expected = torch.tensor([[0.0, -0.45 / 6, 0.0], [0.0, 0.55 / 6, 0.5 / 6]], dtype=F64)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
        assert float(diag["denominator"]) == 2.0
        loss, grad, _ = loss_and_grad(dr_grpo, lp, mask, r, g, old_logprobs=old, max_len=4)
        assert loss == pytest.approx(0.4 / 8, rel=1e-12)
        torch.testing.assert_close(grad, expected * 6 / 8, rtol=1e-12, atol=1e-15)

    def test_dapo(self):
        lp, old, mask, r, g = hand_batch()
        # A = [+1, -1]; clip range [0.8, 1.28].
        # seq0: -min(r, 1.28) = [-1.28, -0.9]; seq1: max(r, 0.8) = [0.8, 1.1, 1.0]
        # token mean over the 5 tokens: (-2.18 + 2.9) / 5 = 0.144
        loss, grad, diag = loss_and_grad(dapo, lp, mask, r, g, old_logprobs=old, adv_eps=0.0)
        assert loss == pytest.approx(0.144, rel=1e-12)
        expected = torch.tensor([[0.0, -0.9 / 5, 0.0], [0.0, 1.1 / 5, 1.0 / 5]], dtype=F64)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
        assert float(diag["denominator"]) == 5.0
        assert float(diag["clip_frac_low"]) == pytest.approx(0.2)
        assert float(diag["clip_frac_high"]) == pytest.approx(0.2)

    def test_dapo_overlong_penalty_values(self):
        # max_len 4, buffer 2: free up to 2 tokens, then (2 - L) / 2, -1 beyond 4.
        pen = dapo_overlong_penalty(torch.tensor([0, 1, 2, 3, 4, 5]), max_len=4, overlong_buffer=2)
        assert pen.tolist() == [0.0, 0.0, 0.0, -0.5, -1.0, -1.0]
        with pytest.raises(ValueError, match="overlong_buffer"):
            dapo_overlong_penalty(torch.tensor([1]), max_len=4, overlong_buffer=0)

    def test_dapo_with_overlong_penalty(self):
        # On-policy (ratio 1), one group, rewards [1, 1, 0], lengths [1, 3, 4],
        # max_len 4, buffer 2 -> penalties [0, -0.5, -1] -> shaped [1, 0.5, -1].
        # mean 1/6, deviations [5/6, 1/3, -7/6], population var 78/108.
        # token loss -A_i; token mean = -(1*A0 + 3*A1 + 4*A2) / 8 = (17/6) / (8 std)
        lp = (-torch.linspace(0.1, 1.2, 12, dtype=F64).reshape(3, 4)).requires_grad_()
        mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
        r = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
        g = torch.tensor([2, 2, 2])
        loss, grad, _ = loss_and_grad(
            dapo, lp, mask, r, g, max_len=4, overlong_buffer=2, adv_eps=0.0
        )
        std = math.sqrt(78 / 108)
        assert loss == pytest.approx((17 / 6) / (8 * std), rel=1e-12)
        adv = torch.tensor([5 / 6, 1 / 3, -7 / 6], dtype=F64) / std
        expected = torch.where(mask, -adv[:, None] / 8, 0.0)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
        with pytest.raises(ValueError, match="both"):
            dapo(lp, mask, r, g, max_len=4)

    def test_gspo_unclipped_negative_clipped_positive(self):
        # seq0 (A=+1) log-ratios [2e-4, 6e-4]: s = exp(4e-4) > 1 + 4e-4 -> clipped, -1.0004
        # seq1 (A=-1) log-ratios [-1e-4, -2e-4, 0]: s = exp(-1e-4) in range -> +s
        old = torch.full((2, 3), -2.0, dtype=F64)
        lr = torch.tensor([[2e-4, 6e-4, 0.0], [-1e-4, -2e-4, 0.0]], dtype=F64)
        lp = (old + lr).requires_grad_()
        mask = torch.tensor([[True, True, False], [True, True, True]])
        r = torch.tensor([1.0, 0.0], dtype=F64)
        g = torch.tensor([0, 0])
        loss, grad, diag = loss_and_grad(gspo, lp, mask, r, g, old_logprobs=old, adv_eps=0.0)
        s1 = math.exp(-1e-4)
        assert loss == pytest.approx((-1.0004 + s1) / 2, rel=1e-10)
        expected = torch.tensor([[0.0, 0.0, 0.0], [s1 / 6, s1 / 6, s1 / 6]], dtype=F64)
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-15)
        assert float(diag["clip_frac_high"]) == 0.5
        assert float(diag["clip_frac_low"]) == 0.0

    def test_gspo_clipped_negative_unclipped_positive(self):
        # seq0 (A=+1) log-ratios [1e-4, 3e-4]: s0 = exp(2e-4) < 1.0004 -> -s0
        # seq1 (A=-1) mean log-ratio -4e-4: exp(-4e-4) < 1 - 3e-4 -> clipped, +0.9997
        old = torch.full((2, 3), -0.5, dtype=F64)
        lr = torch.tensor([[1e-4, 3e-4, 0.0], [-5e-4, -5e-4, -2e-4]], dtype=F64)
        lp = (old + lr).requires_grad_()
        mask = torch.tensor([[True, True, False], [True, True, True]])
        r = torch.tensor([1.0, 0.0], dtype=F64)
        loss, grad, diag = loss_and_grad(
            gspo, lp, mask, r, torch.tensor([3, 3]), old_logprobs=old, adv_eps=0.0
        )
        s0 = math.exp(2e-4)
        assert loss == pytest.approx((-s0 + 0.9997) / 2, rel=1e-10)
        expected = torch.tensor([[-s0 / 4, -s0 / 4, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-15)
        assert float(diag["clip_frac_low"]) == 0.5

    def test_k3_kl(self):
        # d = ref - logp = [0, 1, -1] -> e^d - d - 1 = [0, e - 2, e^-1]; padding -> 0
        lp = torch.tensor([[-1.0, -2.0, -1.0, -5.0]], dtype=F64)
        ref = torch.tensor([[-1.0, -1.0, -2.0, 0.0]], dtype=F64)
        kl = k3_kl(lp, ref, torch.tensor([[1, 1, 1, 0]]))
        expected = torch.tensor([[0.0, math.e - 2, math.exp(-1), 0.0]], dtype=F64)
        torch.testing.assert_close(kl, expected, rtol=1e-14, atol=1e-15)

    def test_dynamic_sampling_mask(self):
        r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
        g = torch.tensor([10, 10, -2, -2, 7, 7, 10])
        assert dapo_dynamic_sampling_mask(r, g).tolist() == [True, True] + [False] * 4 + [True]


def random_batch(seed, n_groups, group_size, width, *, spread=0.6, contiguous=False):
    gen = torch.Generator().manual_seed(seed)
    B = n_groups * group_size
    gids = torch.arange(n_groups).repeat_interleave(group_size) * 17 + 3
    if not contiguous:
        gids = gids[torch.randperm(B, generator=gen)]
    lengths = torch.randint(1, width + 1, (B,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    old = -3.0 * torch.rand(B, width, generator=gen, dtype=F64)
    lr = spread * (2 * torch.rand(B, width, generator=gen, dtype=F64) - 1)
    ref = old + 0.5 * torch.randn(B, width, generator=gen, dtype=F64)
    rewards = (torch.rand(B, generator=gen) > 0.5).to(F64)
    return (old + lr).requires_grad_(), old, ref, mask, rewards, gids, lengths


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("adv_eps", [0.0, 1e-6])
def test_grpo_proposition_1(seed, adv_eps):
    """GRPO with binary rewards = sqrt(p(1-p)) (mean_P s+ - mean_N s-), clipped-ratio scores."""
    eps, G = 0.2, 8
    lp, old, _, mask, _, gids, lengths = random_batch(seed, 4, G, 10, contiguous=True)
    # Pass counts 1, 4, 7 and 8 (the last group has no contrast: p(1-p) = 0).
    rewards = torch.zeros(4 * G, dtype=F64)
    for g, k in enumerate([1, 4, 7, 8]):
        rewards[g * G : g * G + k] = 1.0
    loss, diag = grpo(lp, mask, rewards, gids, old_logprobs=old, eps=eps, adv_eps=adv_eps)
    (grad,) = torch.autograd.grad(loss, lp)

    ratio = torch.exp(lp - old)
    total = 0.0
    for g in range(4):
        pos, neg = [], []
        for b in range(g * G, (g + 1) * G):
            n = int(lengths[b])
            if rewards[b] > 0.5:
                pos.append(torch.clamp(ratio[b, :n], max=1 + eps).sum() / n)
            else:
                neg.append(torch.clamp(ratio[b, :n], min=1 - eps).sum() / n)
        p = len(pos) / G
        if pos and neg:
            gap = sum(pos) / len(pos) - sum(neg) / len(neg)
            total = total + math.sqrt(p * (1 - p)) * gap
    expected = -total / 4
    (expected_grad,) = torch.autograd.grad(expected, lp)
    tol = 1e-12 if adv_eps == 0.0 else 1e-5
    assert loss.item() == pytest.approx(expected.item(), rel=tol, abs=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=tol, atol=1e-14)
    assert float(diag["valid_groups"]) == 3.0


def trl_reference(
    lp, old, ref, mask, rewards, group_size, *, loss_type, eps_low, eps_high, beta, max_len
):
    """TRL GRPOTrainer semantics (``view(-1, group_size)`` groups, unbiased std, eps 1e-4)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    adv = rewards - mean
    if loss_type != "dr_grpo":  # Dr.GRPO: scale_rewards off
        std = grouped.std(dim=1).repeat_interleave(group_size)
        adv = adv / (std + 1e-4)
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    if beta != 0.0:
        per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    m = mask.to(lp.dtype)
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dapo":
        return (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    return (per_token_loss * m).sum() / (per_token_loss.size(0) * max_len)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_dapo_dr_grpo_match_trl_formulas(seed, beta):
    G = 4
    lp, old, ref, mask, rewards, gids, _ = random_batch(seed, 3, G, 7, contiguous=True)
    rewards[:G] = 1.0  # one group with identical rewards
    cases = [
        (grpo, "grpo", {"eps": 0.2, "std": "sample", "adv_eps": 1e-4}, 0.2, 0.2, 7),
        (
            dapo,
            "dapo",
            {"eps_low": 0.2, "eps_high": 0.28, "std": "sample", "adv_eps": 1e-4},
            0.2,
            0.28,
            7,
        ),
        (dr_grpo, "dr_grpo", {"eps": 0.2, "max_len": 9}, 0.2, 0.2, 9),
    ]
    for fn, loss_type, kw, lo, hi, max_len in cases:
        loss, _ = fn(lp, mask, rewards, gids, old_logprobs=old, ref_logprobs=ref, beta=beta, **kw)
        expected = trl_reference(
            lp, old, ref, mask, rewards, G,
            loss_type=loss_type, eps_low=lo, eps_high=hi, beta=beta, max_len=max_len,
        )  # fmt: skip
        (g1,) = torch.autograd.grad(loss, lp)
        (g2,) = torch.autograd.grad(expected, lp)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-15), loss_type
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-15)


def population_advantages(rewards, gids):
    adv = torch.zeros_like(rewards)
    for gid in gids.unique():
        sel = gids == gid
        r = rewards[sel]
        std = float(r.std(unbiased=False))
        adv[sel] = (r - r.mean()) / std if std > 0 else 0.0
    return adv


@pytest.mark.parametrize("seed", range(3))
def test_gmpo_matches_geometric_mean_formula(seed):
    lp, old, _, mask, rewards, gids, lengths = random_batch(seed, 3, 5, 6, spread=0.8)
    loss, diag = gmpo(lp, mask, rewards, gids, old_logprobs=old, adv_eps=0.0)
    (grad,) = torch.autograd.grad(loss, lp)
    adv = population_advantages(rewards, gids).tolist()
    lr = (lp - old).detach().tolist()
    B = len(adv)
    expected, expected_grad = 0.0, torch.zeros_like(lp)
    for b in range(B):
        n, a = int(lengths[b]), adv[b]
        if a > 0:
            clipped = [min(x, 0.4) for x in lr[b][:n]]
            active = [x < 0.4 for x in lr[b][:n]]
        elif a < 0:
            clipped = [max(x, -0.4) for x in lr[b][:n]]
            active = [x > -0.4 for x in lr[b][:n]]
        else:
            continue
        ratio = math.exp(sum(clipped) / n)
        expected += -a * ratio / B
        for t in range(n):
            expected_grad[b, t] = -a * ratio / n / B if active[t] else 0.0
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
    assert float(diag["denominator"]) == B


@pytest.mark.parametrize(("seed", "eps_high"), [(0, 3.0), (1, 3.0), (2, 0.3)])
def test_cispo_matches_stop_gradient_formula(seed, eps_high):
    lp, old, _, mask, rewards, gids, lengths = random_batch(seed, 3, 5, 6, spread=1.6)
    loss, diag = cispo(lp, mask, rewards, gids, old_logprobs=old, eps_high=eps_high, adv_eps=0.0)
    (grad,) = torch.autograd.grad(loss, lp)
    adv = population_advantages(rewards, gids).tolist()
    ratio = torch.exp(lp - old).detach().tolist()
    logp = lp.detach().tolist()
    n_tok = int(lengths.sum())
    expected, expected_grad = 0.0, torch.zeros_like(lp)
    for b in range(len(adv)):
        for t in range(int(lengths[b])):
            w = min(ratio[b][t], 1 + eps_high)
            expected += -w * adv[b] * logp[b][t] / n_tok
            expected_grad[b, t] = -w * adv[b] / n_tok
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
    clipped = sum(
        ratio[b][t] > 1 + eps_high for b in range(len(adv)) for t in range(int(lengths[b]))
    )
    assert float(diag["clip_frac_high"]) == pytest.approx(clipped / n_tok)
    assert float(diag["denominator"]) == n_tok


@pytest.mark.parametrize("seed", range(3))
def test_sapo_matches_soft_gate_formula(seed):
    lp, old, _, mask, rewards, gids, lengths = random_batch(seed, 3, 5, 6, spread=1.0)
    loss, _ = sapo(lp, mask, rewards, gids, old_logprobs=old, adv_eps=0.0)
    (grad,) = torch.autograd.grad(loss, lp)
    adv = population_advantages(rewards, gids).tolist()
    ratio = torch.exp(lp - old).detach().tolist()
    B = len(adv)
    expected, expected_grad = 0.0, torch.zeros_like(lp)
    for b in range(B):
        n, a = int(lengths[b]), adv[b]
        tau = 1.0 if a > 0 else 1.05
        for t in range(n):
            p = 1.0 / (1.0 + math.exp(-tau * (ratio[b][t] - 1.0)))
            expected += -p * 4.0 / tau * a / n / B
            expected_grad[b, t] = -4.0 * p * (1 - p) * ratio[b][t] * a / n / B
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_sapo_on_policy_gradient_is_plain_policy_gradient():
    # At r = 1 the gate weight 4 p (1 - p) = 1: gradient = -A / (|o| B) per token.
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], dtype=F64, requires_grad=True)
    loss, _ = sapo(lp, torch.ones(2, 2), torch.tensor([1.0, 0.0]), torch.tensor([1, 1]))
    (grad,) = torch.autograd.grad(loss, lp)
    a = 0.5 / (0.5 + 1e-6)  # population std 0.5, default adv_eps 1e-6
    expected = torch.tensor([[-a / 4, -a / 4], [a / 4, a / 4]], dtype=F64)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("tau", [10.0, 1.0])
def test_disco_matches_log_sum_exp_formula(tau):
    gen = torch.Generator().manual_seed(4)
    s = -4.0 * torch.rand(14, generator=gen, dtype=F64)
    rewards = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0], dtype=F64)
    gids = torch.tensor([4, 4, 4, 4, 9, 9, 9, 9, 2, 2, 2, 6, 6, 6])  # group 2 / 6 invalid
    lp = s[:, None].clone().requires_grad_()
    loss, diag = disco(lp, torch.ones(14, 1), rewards, gids, tau=tau)
    (grad,) = torch.autograd.grad(loss, lp)
    expected, expected_grad = 0.0, torch.zeros(14, dtype=F64)
    for gid in (4, 9):
        idx = [b for b in range(14) if int(gids[b]) == gid]
        pos = [b for b in idx if rewards[b] > 0.5]
        neg = [b for b in idx if rewards[b] <= 0.5]
        z = sum(math.exp(float(s[j]) / tau) for j in neg)
        j_q = sum(float(s[i]) for i in pos) / len(pos) - tau * math.log(z / len(neg))
        expected += -j_q / 4  # DisCO: divide by all 4 groups
        for i in pos:
            expected_grad[i] = -1.0 / len(pos) / 4
        for j in neg:
            expected_grad[j] = math.exp(float(s[j]) / tau) / z / 4
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(grad[:, 0], expected_grad, rtol=1e-12, atol=1e-15)
    assert float(diag["denominator"]) == 4.0
    mean_loss, _ = disco(lp, torch.ones(14, 1), rewards, gids, tau=tau, reduce="mean")
    assert mean_loss.item() == pytest.approx(expected * 4 / 2, rel=1e-12)


def test_disco_squared_hinge_kl():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], dtype=F64, requires_grad=True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    r, g = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0, 0])
    base, _ = disco(lp, mask, r, g)
    old = lp.detach() + 0.003  # KL estimate 0.003 -> penalty 1e3 * (0.003 - 1e-4)^2
    with_kl, diag = disco(lp, mask, r, g, old_logprobs=old)
    assert (with_kl - base).item() == pytest.approx(1e3 * 0.0029**2, rel=1e-9)
    assert float(diag["kl"]) == pytest.approx(0.003, rel=1e-9)
    inside, _ = disco(lp, mask, r, g, old_logprobs=lp.detach() + 5e-5)
    assert inside.item() == pytest.approx(base.item(), rel=1e-14)
