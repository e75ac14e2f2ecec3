"""Encoding a prompt into the ids the model sees, and the reasons a prompt is refused."""

from __future__ import annotations

import pytest

from conspo.models.tokenizer import build_char_tokenizer
from conspo.prompting import PromptRejectedError, encode_prompt
from conspo.protocol import ChatMessage, Prompt


@pytest.fixture(scope="module")
def tok():
    """The bundled model's character tokenizer (BOS prepended, a chat template)."""
    return build_char_tokenizer()


def text_prompt(text: str) -> Prompt:
    return Prompt(prompt_id="p1", text=text, answer="1")


def test_text_prompt_is_encoded_with_default_special_tokens(tok):
    ids = encode_prompt(text_prompt("12+34="), tok, 128)
    assert ids == tok("12+34=")["input_ids"]
    assert ids[0] == tok.bos_token_id  # the tiny tokenizer prepends BOS


def test_chat_prompt_uses_the_tokenizers_template(tok):
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


def test_unknown_characters_are_refused_with_a_reason(tok):
    with pytest.raises(PromptRejectedError, match="cannot tokenise"):
        encode_prompt(text_prompt("12+34=\u00e9"), tok, 128)


def test_a_prompt_that_fills_the_context_is_refused(tok):
    with pytest.raises(PromptRejectedError, match="too long: 128 tokens"):
        encode_prompt(text_prompt("1" * 127), tok, 128)
    assert len(encode_prompt(text_prompt("1" * 126), tok, 128)) == 127


def test_chat_markers_special_only_in_the_added_vocabulary_are_not_lost(user_model):
    """A locally trained BPE marks <|im_start|> special in its added vocabulary without naming
    it in additional_special_tokens; the round-trip check must not mistake it for lost text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(user_model)
    assert "<|im_start|>" not in tok.all_special_tokens
    prompt = Prompt(prompt_id="p", messages=[ChatMessage(role="user", content="2+2?")], answer="4")
    ids = encode_prompt(prompt, tok, 512)
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids
