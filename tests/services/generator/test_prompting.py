"""Prompt formatting, refusal reasons, per-group seeds and token budgets."""

from __future__ import annotations

import pytest

from conspo.protocol import ChatMessage, Prompt, SamplingParams
from services.generator.prompting import (
    PromptRejectedError,
    encode_prompt,
    group_params,
    group_seed,
)


def text_prompt(text: str) -> Prompt:
    return Prompt(prompt_id="p1", text=text, answer="1")


def test_text_prompt_is_encoded_with_default_special_tokens(hf_backend):
    tok = hf_backend.tokenizer
    ids = encode_prompt(text_prompt("12+34="), tok, 128)
    assert ids == tok("12+34=")["input_ids"]
    assert ids[0] == tok.bos_token_id  # the tiny tokenizer prepends BOS


def test_chat_prompt_uses_the_tokenizers_template(hf_backend):
    tok = hf_backend.tokenizer
    messages = [
        ChatMessage(role="system", content="Add."),
        ChatMessage(role="user", content="1+2="),
    ]
    prompt = Prompt(prompt_id="p2", messages=messages, answer="3")
    rendered = tok.apply_chat_template(
        [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=False
    )
    expected = tok(rendered, add_special_tokens=False)["input_ids"]
    assert encode_prompt(prompt, tok, 128) == expected
    assert expected.count(tok.bos_token_id) == 1  # the template's BOS, not a second one


def test_unknown_characters_are_refused_with_a_reason(hf_backend):
    with pytest.raises(PromptRejectedError, match="cannot tokenise"):
        encode_prompt(text_prompt("12+34=\u00e9"), hf_backend.tokenizer, 128)


def test_a_prompt_that_fills_the_context_is_refused(hf_backend):
    with pytest.raises(PromptRejectedError, match="too long: 128 tokens"):
        encode_prompt(text_prompt("1" * 127), hf_backend.tokenizer, 128)
    assert len(encode_prompt(text_prompt("1" * 126), hf_backend.tokenizer, 128)) == 127


def test_group_seed_is_stable_and_entry_specific():
    a = group_seed(0, "1700000000000-0")
    assert a == group_seed(0, "1700000000000-0")
    assert a != group_seed(0, "1700000000000-1")
    assert a != group_seed(1, "1700000000000-0")
    assert 0 <= a < 2**31


def test_group_params_cut_the_budget_to_the_context():
    base = SamplingParams(n=8, max_tokens=512, temperature=0.9, stop=["\n"])
    p = group_params(base, prompt_len=100, max_model_len=128, seed=5)
    assert (p.max_tokens, p.seed, p.n, p.temperature, p.stop) == (28, 5, 8, 0.9, ["\n"])
    assert group_params(base, prompt_len=10, max_model_len=4096, seed=5).max_tokens == 512
