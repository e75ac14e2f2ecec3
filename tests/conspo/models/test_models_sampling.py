"""Batched group sampling: shapes, EOS, stop strings, length, seeds, log-prob semantics."""

from __future__ import annotations

import math

import pytest
import torch

from conspo.models.sampling import Sample, sample_groups


def _prompts(tok):
    # different lengths, so the batch is left-padded
    return [tok(p).input_ids for p in ["1+2=", "12+34=", "hello 99-1=", "7"]]


def _reference_logprobs(model, prompt, completion, temperature):
    """Ground truth from the definition: one unbatched, unpadded forward of prompt+completion,
    log_softmax(logits / T) at the positions that predict each completion token."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    t = 1.0 if temperature == 0 else temperature
    logp = torch.log_softmax(logits / t, dim=-1)
    return [float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(completion)]


def test_groups_shapes_and_consistency(peaked):
    model, tok = peaked
    prompts = _prompts(tok)
    groups = sample_groups(
        model, tok, prompts, n=5, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0
    )
    assert len(groups) == len(prompts)
    eos = tok.eos_token_id
    reasons = set()
    for group in groups:
        assert len(group) == 5
        for s in group:
            assert isinstance(s, Sample)
            assert 1 <= len(s.token_ids) <= 12
            assert len(s.logprobs) == len(s.token_ids)
            assert all(lp <= 0.0 and math.isfinite(lp) for lp in s.logprobs)
            assert s.text == tok.decode(s.token_ids, skip_special_tokens=True)
            # EOS only ever appears as the last token, and then the reason is "stop"
            assert eos not in s.token_ids[:-1]
            if s.token_ids[-1] == eos:
                assert s.finish_reason == "stop"
            else:
                assert s.finish_reason == "length"
                assert len(s.token_ids) == 12
            reasons.add(s.finish_reason)
    assert reasons == {"stop", "length"}  # this model/seed produces both


def test_eos_is_kept_with_its_logprob(peaked):
    model, tok = peaked
    prompts = _prompts(tok)
    groups = sample_groups(model, tok, prompts, n=8, temperature=1.0, max_new_tokens=12, seed=1)
    stopped = [(i, s) for i, g in enumerate(groups) for s in g if s.finish_reason == "stop"]
    assert stopped
    for i, s in stopped:
        assert s.token_ids[-1] == tok.eos_token_id
        ref = _reference_logprobs(model, prompts[i], s.token_ids, 1.0)
        assert s.logprobs[-1] == pytest.approx(ref[-1], abs=1e-4)
        assert "<eos>" not in s.text


def test_generation_config_eos_ids_also_stop(peaked):
    model, tok = peaked
    prompt = [tok("12+34=").input_ids]
    greedy = sample_groups(model, tok, prompt, n=1, temperature=0.0, max_new_tokens=10)[0][0]
    assert greedy.finish_reason == "length"
    target = greedy.token_ids[3]
    first = greedy.token_ids.index(target)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, target]
    try:
        s = sample_groups(model, tok, prompt, n=1, temperature=0.0, max_new_tokens=10)[0][0]
    finally:
        model.generation_config.eos_token_id = saved
    assert s.token_ids == greedy.token_ids[: first + 1]
    assert s.finish_reason == "stop"


def test_max_new_tokens_gives_length(peaked):
    model, tok = peaked
    groups = sample_groups(
        model, tok, _prompts(tok), n=4, temperature=0.0, max_new_tokens=3, seed=0
    )
    for g in groups:
        for s in g:
            if s.token_ids[-1] != tok.eos_token_id:
                assert len(s.token_ids) == 3
                assert s.finish_reason == "length"
    one = sample_groups(model, tok, _prompts(tok), n=2, temperature=1.0, max_new_tokens=1, seed=0)
    for g in one:
        for s in g:
            assert len(s.token_ids) == 1
            expected = "stop" if s.token_ids[0] == tok.eos_token_id else "length"
            assert s.finish_reason == expected


def test_stop_string_truncates_at_completing_token(peaked):
    model, tok = peaked
    prompt = [tok("hello 99-1=").input_ids]
    full = sample_groups(model, tok, prompt, n=1, temperature=0.0, max_new_tokens=16)[0][0]
    assert full.finish_reason == "length"
    text = full.text
    assert len(text) >= 8
    stop = text[4:6]
    # the first prefix of tokens whose text contains the stop string
    k = next(
        i
        for i in range(1, len(full.token_ids) + 1)
        if stop in tok.decode(full.token_ids[:i], skip_special_tokens=True)
    )
    s = sample_groups(
        model, tok, prompt, n=1, temperature=0.0, max_new_tokens=16, stop=["@@@@", stop]
    )[0][0]
    assert s.finish_reason == "stop"
    assert s.token_ids == full.token_ids[:k]
    assert s.logprobs == pytest.approx(full.logprobs[:k], abs=1e-6)
    assert s.text.find(stop) == len(s.text) - len(stop)  # first occurrence ends the text


def test_stop_string_not_matched_in_prompt(peaked):
    model, tok = peaked
    prompt = [tok("12+34=").input_ids]
    a = sample_groups(model, tok, prompt, n=1, temperature=0.0, max_new_tokens=6)[0][0]
    in_prompt_only = [c for c in "12+34=" if c not in a.text]
    assert in_prompt_only
    b = sample_groups(
        model, tok, prompt, n=1, temperature=0.0, max_new_tokens=6, stop=in_prompt_only
    )[0][0]
    assert b.token_ids == a.token_ids
    assert b.finish_reason == a.finish_reason


def test_seed_reproduces_and_different_seeds_differ(peaked):
    model, tok = peaked
    kwargs = dict(n=4, temperature=1.0, top_p=0.95, max_new_tokens=10)
    state = torch.get_rng_state()
    a = sample_groups(model, tok, _prompts(tok), seed=123, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    b = sample_groups(model, tok, _prompts(tok), seed=123, **kwargs)
    c = sample_groups(model, tok, _prompts(tok), seed=124, **kwargs)
    ids = lambda gs: [s.token_ids for g in gs for s in g]  # noqa: E731
    assert ids(a) == ids(b)
    assert [s.logprobs for g in a for s in g] == [s.logprobs for g in b for s in g]
    assert ids(a) != ids(c)


def test_group_members_differ_at_temperature_one(peaked):
    model, tok = peaked
    g = sample_groups(model, tok, _prompts(tok)[:1], n=8, temperature=1.0, max_new_tokens=8, seed=5)
    assert len({tuple(s.token_ids) for s in g[0]}) > 1


def test_greedy_logprobs_use_temperature_one_and_group_is_identical(peaked):
    model, tok = peaked
    prompts = _prompts(tok)
    groups = sample_groups(model, tok, prompts, n=3, temperature=0.0, max_new_tokens=8)
    for prompt, g in zip(prompts, groups, strict=True):
        assert len({tuple(s.token_ids) for s in g}) == 1
        ref = _reference_logprobs(model, prompt, g[0].token_ids, 1.0)
        assert g[0].logprobs == pytest.approx(ref, abs=1e-4)


def test_top_p_truncates_sampling_but_not_logprobs(peaked):
    model, tok = peaked
    prompts = _prompts(tok)
    greedy = sample_groups(model, tok, prompts, n=1, temperature=0.0, max_new_tokens=8)
    # top_p tiny keeps only the most likely token: sampling becomes greedy ...
    nucleus = sample_groups(
        model, tok, prompts, n=2, temperature=0.7, top_p=1e-6, max_new_tokens=8, seed=0
    )
    for prompt, g_greedy, g in zip(prompts, greedy, nucleus, strict=True):
        for s in g:
            assert s.token_ids == g_greedy[0].token_ids
            # ... but the log-probs are those of the tempered, untruncated distribution
            ref = _reference_logprobs(model, prompt, s.token_ids, 0.7)
            assert s.logprobs == pytest.approx(ref, abs=1e-4)
            assert all(lp < -1e-3 for lp in s.logprobs[:-1]) or len(s.logprobs) == 1


def test_max_batch_rows_chunks_keep_groups(peaked):
    model, tok = peaked
    prompts = _prompts(tok)
    whole = sample_groups(model, tok, prompts, n=3, temperature=0.0, max_new_tokens=6)
    chunked = sample_groups(
        model, tok, prompts, n=3, temperature=0.0, max_new_tokens=6, max_batch_rows=4
    )
    assert [[s.token_ids for s in g] for g in whole] == [[s.token_ids for s in g] for g in chunked]
    for gw, gc in zip(whole, chunked, strict=True):
        for sw, sc in zip(gw, gc, strict=True):
            assert sw.logprobs == pytest.approx(sc.logprobs, abs=1e-5)


def test_invalid_arguments(peaked):
    model, tok = peaked
    with pytest.raises(ValueError, match="n must"):
        sample_groups(model, tok, [[1, 5]], n=0, temperature=1.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        sample_groups(model, tok, [[]], n=1, temperature=1.0, max_new_tokens=2)
    assert sample_groups(model, tok, [], n=2, temperature=1.0, max_new_tokens=2) == []
