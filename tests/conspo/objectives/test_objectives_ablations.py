"""ConSPO's ablations against hand-computed cases (values written out or computed with plain
Python floats from the definitions in conspo.objectives.ablations, never from the code)."""

from __future__ import annotations

import math

import pytest
import torch

from conspo.objectives import (
    DEFAULT_MARGIN,
    conspo_linear,
    conspo_loss,
    conspo_nomargin,
    conspo_ratio,
    get_objective,
)

F64 = torch.float64


def batch(rows: list[list[float]], rewards: list[float], groups: list[int]):
    """Right-padded [B, T] log-probs (padding -inf, it must never leak) with their mask."""
    width = max(len(r) for r in rows)
    lp = torch.full((len(rows), width), -math.inf, dtype=F64)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        lp[b, : len(row)] = torch.tensor(row, dtype=F64)
        mask[b, : len(row)] = True
    return (
        lp.requires_grad_(),
        mask,
        torch.tensor(rewards, dtype=F64),
        torch.tensor(groups, dtype=torch.int64),
    )


# Group 7: positives score -1.0 (2 tokens) and -0.5 (1 token), negatives -2.0 (3 tokens) and
# -3.0 (1 token). Group 9: positive -0.2 (2 tokens), negative -1.2 (2 tokens). Group 4: only
# positives (no contrast, discarded).
ROWS = [[-1.0, -1.0], [-0.5], [-2.0, -2.0, -2.0], [-3.0], [-0.1, -0.3], [-1.0, -1.4], [-0.7]]
REWARDS = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
GROUPS = [7, 7, 7, 7, 9, 9, 4]


def test_linear_difference_value_and_uniform_credit():
    lp, mask, rewards, gids = batch(ROWS, REWARDS, GROUPS)
    loss, diag = conspo_linear(lp, mask, rewards, gids, margin=0.01)
    # J_7 = mean(-1, -0.5) - 0.01 - mean(-2, -3) = 1.74; J_9 = -0.2 - 0.01 + 1.2 = 0.99.
    assert float(loss.detach()) == pytest.approx(-(1.74 + 0.99) / 2, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, lp)
    # d loss / d token = -(1/N+)/|o| (positives), +(1/N-)/|o| (negatives), / 2 valid groups.
    expected = [
        [-0.25 / 2, -0.25 / 2, 0.0],
        [-0.5 / 2, 0.0, 0.0],
        [0.5 / 3 / 2] * 3,
        [0.5 / 2, 0.0, 0.0],
        [-0.5 / 2, -0.5 / 2, 0.0],
        [0.5 / 2, 0.5 / 2, 0.0],
        [0.0, 0.0, 0.0],
    ]
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)
    assert float(diag["valid_groups"]) == 2.0
    assert float(diag["score_gap"]) == pytest.approx((1.75 + 1.0) / 2, abs=1e-12)


def test_linear_margin_changes_the_value_not_the_gradient():
    grads = []
    for margin in (0.0, 0.5):
        lp, mask, rewards, gids = batch(ROWS, REWARDS, GROUPS)
        loss, _ = conspo_linear(lp, mask, rewards, gids, margin=margin)
        grads.append((float(loss.detach()), torch.autograd.grad(loss, lp)[0]))
    assert grads[1][0] == pytest.approx(grads[0][0] + 0.5, abs=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)


def _infonce(pos: list[float], neg: list[float], tau: float, margin: float) -> float:
    """J(q) from the note's ratio form, in plain floats."""
    total = 0.0
    for s in pos:
        num = math.exp((s - margin) / tau)
        total += tau * math.log(num / (num + sum(math.exp(x / tau) for x in neg)))
    return total / len(pos)


def test_ratio_scores_clip_and_contrast_by_hand():
    # One group: a positive whose token ratios are e^0.1 (inside) and e^0.3 (> 1.2: clipped),
    # a negative with e^-0.1 (inside) and e^-0.5 (< 0.8: clipped).
    lp, mask, rewards, gids = batch([[-1.0, -2.0], [-1.5, -0.5]], [1.0, 0.0], [3, 3])
    old = torch.tensor([[-1.1, -2.3], [-1.4, 0.0]], dtype=F64)
    tau, margin = 10.0, 0.01
    loss, diag = conspo_ratio(lp, mask, rewards, gids, old_logprobs=old, tau=tau, margin=margin)
    s_pos = (math.exp(0.1) + 1.2) / 2
    s_neg = (math.exp(-0.1) + 0.8) / 2
    assert float(loss.detach()) == pytest.approx(
        -_infonce([s_pos], [s_neg], tau, margin), abs=1e-12
    )
    (grad,) = torch.autograd.grad(loss, lp)
    p_pos = 1.0 / (1.0 + math.exp((s_neg - s_pos + margin) / tau))
    # dJ/ds+ = 1 - P, dJ/ds- = -(1 - P) (one positive); ds/d log pi_t = r_t / |o| unclipped.
    expected = [
        [-(1 - p_pos) * math.exp(0.1) / 2, 0.0],
        [(1 - p_pos) * math.exp(-0.1) / 2, 0.0],
    ]
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)
    assert float(diag["mean_p_pos"]) == pytest.approx(p_pos, abs=1e-12)
    assert float(diag["ratio_score_gap"]) == pytest.approx(s_pos - s_neg, abs=1e-12)
    assert float(diag["score_gap"]) == pytest.approx(-1.5 - (-1.0), abs=1e-12)  # log-L gap
    assert float(diag["clip_frac_high"]) == pytest.approx(0.25)
    assert float(diag["clip_frac_low"]) == pytest.approx(0.25)


def test_ratio_on_policy_weights_are_uniform():
    # Without old log-probs every ratio is 1, so every score is 1 and P_i = 1 / (1 + N-).
    lp, mask, rewards, gids = batch(ROWS[:4], REWARDS[:4], GROUPS[:4])
    loss, diag = conspo_ratio(lp, mask, rewards, gids, tau=10.0, margin=0.01)
    # J = tau * log(e^{(1-m)/tau} / (e^{(1-m)/tau} + 2 e^{1/tau})) = -tau log(1 + 2 e^{m/tau}).
    assert float(loss.detach()) == pytest.approx(
        10.0 * math.log(1 + 2 * math.exp(0.001)), abs=1e-12
    )
    assert float(diag["mean_p_pos"]) == pytest.approx(1 / (1 + 2 * math.exp(0.001)), abs=1e-12)
    (grad,) = torch.autograd.grad(loss, lp)
    assert float(grad[0, 0]) < 0 < float(grad[2, 0])  # still pushes positives up


def test_nomargin_is_conspo_at_zero_margin_by_hand():
    lp, mask, rewards, gids = batch(ROWS, REWARDS, GROUPS)
    loss, diag = conspo_nomargin(lp, mask, rewards, gids)
    j7 = _infonce([-1.0, -0.5], [-2.0, -3.0], 10.0, 0.0)
    j9 = _infonce([-0.2], [-1.2], 10.0, 0.0)
    assert float(loss.detach()) == pytest.approx(-(j7 + j9) / 2, abs=1e-12)
    assert diag["margin"] == 0.0
    lp2, *_ = batch(ROWS, REWARDS, GROUPS)
    reference, _ = conspo_loss(lp2, mask, rewards, gids, margin=0.0)
    assert float(loss.detach()) == float(reference.detach())


def test_fixedmargin_is_conspo_with_the_target_margin_by_hand():
    obj = get_objective("conspo_fixedmargin")
    margin = obj.margin_at(0, 200, DEFAULT_MARGIN, 0.3)
    assert margin == DEFAULT_MARGIN
    lp, mask, rewards, gids = batch(ROWS, REWARDS, GROUPS)
    loss, _ = obj(lp, mask, rewards, gids, margin=margin)
    j7 = _infonce([-1.0, -0.5], [-2.0, -3.0], 10.0, 0.01)
    j9 = _infonce([-0.2], [-1.2], 10.0, 0.01)
    assert float(loss.detach()) == pytest.approx(-(j7 + j9) / 2, abs=1e-12)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # steps 0, 15 (half of the 30-step ramp: alpha 0.3 of 100), 30 and 150 (past the end)
        ("conspo", [0.0, 0.005, 0.01, 0.01]),
        ("conspo_linear", [0.0, 0.005, 0.01, 0.01]),
        ("conspo_ratio", [0.0, 0.005, 0.01, 0.01]),
        ("conspo_fixedmargin", [0.01, 0.01, 0.01, 0.01]),
        ("conspo_nomargin", [0.0, 0.0, 0.0, 0.0]),
        ("grpo", [0.0, 0.0, 0.0, 0.0]),
    ],
)
def test_margin_schedules(name, expected):
    obj = get_objective(name)
    got = [obj.margin_at(step, 100, 0.01, 0.3) for step in (0, 15, 30, 150)]
    assert got == pytest.approx(expected, abs=1e-15)


def test_nomargin_has_no_margin_to_set():
    obj = get_objective("conspo_nomargin")
    assert "margin" not in obj.defaults
    assert obj.margin_schedule is None
    with pytest.raises(TypeError):
        obj.with_options(margin=0.01)
