"""Character tokenizer: ids, round trips through save/from_pretrained, chat template."""

from __future__ import annotations

import string

import pytest
from transformers import AutoTokenizer

from conspo.models.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_special_tokens_and_vocab(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
    )
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    # every printable ASCII character, newline and tab, each one token, plus four specials
    assert len(tok) == 95 + 2 + 4
    for ch in string.digits + "+-=*/() .,:?!abcXYZ\n\t":
        ids = tok(ch, add_special_tokens=False).input_ids
        assert len(ids) == 1
        assert ids[0] != tok.unk_token_id


def test_encode_decode_round_trip(tok):
    text = "12+34=46\nThe answer is -7, (a*b)/c!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character plus BOS
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<bos>" + text


def test_unknown_characters_map_to_unk(tok):
    ids = tok("1€2", add_special_tokens=False).input_ids
    assert ids == [tok.convert_tokens_to_ids("1"), tok.unk_token_id, tok.convert_tokens_to_ids("2")]


def test_special_token_strings_are_single_tokens(tok):
    ids = tok("7<eos>", add_special_tokens=False).input_ids
    assert ids == [tok.convert_tokens_to_ids("7"), tok.eos_token_id]


def test_save_and_from_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "99-100=-1\n<unk>x€"
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.chat_template == tok.chat_template
    assert loaded.decode([5, 6], skip_special_tokens=True) == tok.decode([5, 6])


def test_chat_template_single_user_message_matches_plain_prompt(tok):
    messages = [{"role": "user", "content": "12+34="}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    assert ids == tok("12+34=").input_ids
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<bos>12+34="


def test_chat_template_multi_turn(tok):
    messages = [
        {"role": "system", "content": "Add."},
        {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "2+2="},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<bos>Add.\n1+2=3<eos>2+2="
