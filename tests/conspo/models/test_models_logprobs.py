"""Teacher-forced completion log-probs: equal to the sampler's behaviour log-probs, correct
padding and masks, token-budget micro-batching with identical values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from conspo.models.logprobs import completion_logprobs
from conspo.models.sampling import sample_groups


def _prompts(tok):
    return [tok(p).input_ids for p in ["1+2=", "12+34=", "hello there 99-1=", "7", "55-5="]]


def _padded(rows: list[list[float]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_behaviour_logprobs_of_sampler(peaked, temperature):
    model, tok = peaked
    prompts = _prompts(tok)  # mixed lengths: the sampler left-pads them
    groups = sample_groups(
        model, tok, prompts, n=4, temperature=temperature, top_p=0.9, max_new_tokens=14, seed=11
    )
    P = [p for p, g in zip(prompts, groups, strict=True) for _ in g]
    C = [s.token_ids for g in groups for s in g]
    behaviour = _padded([s.logprobs for g in groups for s in g])
    assert len({len(c) for c in C}) > 1  # completions of mixed lengths too
    logp, mask, _ = completion_logprobs(model, P, C, temperature=temperature)
    assert logp.shape == behaviour.shape == mask.shape
    assert torch.equal(
        mask, (torch.arange(mask.shape[1]) < torch.tensor([len(c) for c in C])[:, None]).float()
    )
    assert (logp - behaviour).abs().max().item() < 1e-4
    assert behaviour[mask.bool()].std() > 0.5  # the comparison is not between constants


def test_greedy_behaviour_logprobs_match_temperature_one(peaked):
    model, tok = peaked
    prompts = _prompts(tok)
    groups = sample_groups(model, tok, prompts, n=1, temperature=0.0, max_new_tokens=10)
    C = [g[0].token_ids for g in groups]
    logp0, _, _ = completion_logprobs(model, prompts, C, temperature=0.0)
    logp1, _, _ = completion_logprobs(model, prompts, C, temperature=1.0)
    behaviour = _padded([g[0].logprobs for g in groups])
    assert torch.equal(logp0, logp1)
    assert (logp1 - behaviour).abs().max().item() < 1e-4


def test_against_unbatched_definition_and_entropy(peaked):
    model, tok = peaked
    prompts = _prompts(tok)[:3]
    completions = [[5, 6, 7, tok.eos_token_id], [40], [9, 9, 9, 9, 9, 9]]
    T = 0.8
    logp, mask, ent = completion_logprobs(
        model, prompts, completions, temperature=T, with_entropy=True
    )
    assert ent is not None
    for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float() / T
        lsm = torch.log_softmax(logits, dim=-1)
        for t, token in enumerate(c):
            row = lsm[len(p) - 1 + t]
            assert logp[r, t].item() == pytest.approx(row[token].item(), abs=1e-5)
            h = -(row.exp() * row).sum().item()
            assert ent[r, t].item() == pytest.approx(h, abs=1e-4)
            assert 0.0 <= ent[r, t].item() <= math.log(len(tok)) + 1e-5
        assert torch.all(logp[r, len(c) :] == 0)
        assert torch.all(ent[r, len(c) :] == 0)
        assert mask[r].sum().item() == len(c)


def test_carries_autograd(peaked):
    model, tok = peaked
    prompts = _prompts(tok)[:2]
    logp, mask, _ = completion_logprobs(model, prompts, [[5, 6], [7]])
    assert logp.requires_grad
    model.zero_grad(set_to_none=True)
    (logp * mask).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    model.zero_grad(set_to_none=True)


def _grads_for(model, prompts, completions, weights, **kwargs):
    model.zero_grad(set_to_none=True)
    logp, mask, ent = completion_logprobs(model, prompts, completions, **kwargs)
    loss = (logp * weights[:, : logp.shape[1]]).sum() + (0.1 * ent.sum() if ent is not None else 0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logp.detach(), mask, grads


@pytest.mark.parametrize("budget", [1, 25, 60])
def test_token_budget_same_values_and_gradients(peaked, budget):
    model, tok = peaked
    prompts = _prompts(tok)
    gen = torch.Generator().manual_seed(0)
    completions = [
        torch.randint(4, len(tok), (k,), generator=gen).tolist() for k in (3, 7, 1, 5, 2)
    ]
    weights = torch.randn(5, 8, generator=gen)
    ref_logp, ref_mask, ref_grads = _grads_for(
        model, prompts, completions, weights, temperature=0.9, with_entropy=True
    )
    logp, mask, grads = _grads_for(
        model,
        prompts,
        completions,
        weights,
        temperature=0.9,
        with_entropy=True,
        token_budget=budget,
    )
    assert torch.equal(mask, ref_mask)
    assert (logp - ref_logp).abs().max().item() < 1e-5
    for name, g in ref_grads.items():
        # equal up to float32 summation order: relative to the tensor's largest entry
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (grads[name] - g).abs().max().item() <= 1e-4 * scale, name


def test_empty_completions(peaked):
    model, tok = peaked
    prompts = _prompts(tok)[:2]
    logp, mask, _ = completion_logprobs(model, prompts, [[], [5, 6]])
    assert logp.shape == (2, 2)
    assert mask.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert torch.all(logp[0] == 0)
    logp, mask, ent = completion_logprobs(model, prompts, [[], []], with_entropy=True)
    assert logp.shape == mask.shape == ent.shape == (2, 0)


def test_rejects_mismatched_inputs(peaked):
    model, _ = peaked
    with pytest.raises(ValueError, match="differ"):
        completion_logprobs(model, [[1, 5]], [[5], [6]])
    with pytest.raises(ValueError, match="empty prompt"):
        completion_logprobs(model, [[]], [[5]])


def _grouped(tok, sizes=(4, 1, 3, 2, 5)):
    """Rows as an RL batch has them: groups of completions of one prompt (lengths mixed, a
    one-token prompt whose shared prefix is empty, an empty completion), shuffled."""
    prompts = _prompts(tok)
    prompts[3] = prompts[3][-1:]  # a one-token prompt: nothing to share
    gen = torch.Generator().manual_seed(3)
    rows = []
    for p, n in zip(prompts, sizes, strict=True):
        for _ in range(n):
            k = 0 if (len(rows) == 4) else int(torch.randint(1, 9, (1,), generator=gen))
            rows.append((p, torch.randint(4, len(tok), (k,), generator=gen).tolist()))
    order = torch.randperm(len(rows), generator=gen).tolist()
    return [rows[i][0] for i in order], [rows[i][1] for i in order]


@pytest.mark.parametrize("budget", [None, 1, 40])
def test_shared_prompts_same_values_and_gradients(peaked, budget):
    model, tok = peaked
    prompts, completions = _grouped(tok)
    assert min(len(p) for p in prompts) == 1 and min(len(c) for c in completions) == 0
    weights = torch.randn(len(prompts), 9, generator=torch.Generator().manual_seed(1))
    kwargs = {"temperature": 0.8, "with_entropy": True, "token_budget": budget}
    ref_logp, ref_mask, ref_grads = _grads_for(model, prompts, completions, weights, **kwargs)
    logp, mask, grads = _grads_for(
        model, prompts, completions, weights, share_prompts=True, **kwargs
    )
    assert torch.equal(mask, ref_mask)
    assert (logp - ref_logp).abs().max().item() < 1e-5
    assert ref_logp[ref_mask.bool()].std() > 0.1  # not a comparison of constants
    for name, g in ref_grads.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (grads[name] - g).abs().max().item() <= 1e-4 * scale, name


def test_shared_prompts_entropy_and_padding(peaked):
    model, tok = peaked
    prompts, completions = _grouped(tok)
    flat = completion_logprobs(model, prompts, completions, with_entropy=True)
    shared = completion_logprobs(model, prompts, completions, with_entropy=True, share_prompts=True)
    for a, b in zip(flat, shared, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-5
    logp, mask, ent = shared
    assert torch.all(logp[mask == 0] == 0) and torch.all(ent[mask == 0] == 0)


def test_shared_prompts_without_repeats_is_the_flat_path(peaked):
    model, tok = peaked
    prompts = _prompts(tok)
    completions = [[5], [6, 7], [8], [9, 10, 11], []]
    flat = completion_logprobs(model, prompts, completions)[0]
    shared = completion_logprobs(model, prompts, completions, share_prompts=True)[0]
    assert torch.equal(flat, shared)


def test_shared_prompts_fall_back_under_gradient_checkpointing(peaked):
    model, tok = peaked
    prompts, completions = _grouped(tok)
    flat = completion_logprobs(model, prompts, completions)[0]
    model.gradient_checkpointing_enable()
    try:
        model.train()
        shared = completion_logprobs(model, prompts, completions, share_prompts=True)[0]
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    assert (flat - shared).abs().max().item() < 1e-5
