"""Turning a ``Prompt`` into the token ids the model sees: the one encoding training and
evaluation share.

The generator encodes every rollout's prompt with ``encode_prompt``; the learner's held-out
evaluation and ``conspo eval`` encode theirs with it too (from ``Prompt`` objects built by the
same ``conspo.rows.PromptFormat`` the api's dataset loader uses), so the ids a policy is
evaluated on are the ids it was trained on, chat template included.

Rules (the learner's teacher forcing sees exactly these ids, from the rollout):

- ``text`` prompts are encoded with the tokenizer's default special tokens (a BOS for models that
  want one); ``messages`` prompts are rendered with the tokenizer's own chat template and
  ``add_generation_prompt=True``, then encoded WITHOUT adding special tokens (templates render
  their own BOS). Rendering and encoding are separate steps so that the result does not depend
  on what ``apply_chat_template(tokenize=True)`` returns in a given transformers version.
- A prompt is refused (``PromptRejectedError``, dead-lettered by the generator with the reason)
  when the template fails, when it encodes to nothing, when the vocabulary cannot represent it
  (the unknown token appears, or the encode/decode round trip loses characters: the model would
  see another prompt than was asked; whitespace and Unicode normalisation are tolerated), or
  when it leaves no room for a single generated token in the model's context.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from conspo.protocol import Prompt


class PromptRejectedError(ValueError):
    """The prompt cannot be generated for; the message is the dead letter's reason."""


def encode_prompt(prompt: Prompt, tokenizer: Any, max_model_len: int) -> list[int]:
    """The token ids of ``prompt``; raises ``PromptRejectedError`` with a reason."""
    try:
        if prompt.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
            if not getattr(tokenizer, "chat_template", None):
                raise PromptRejectedError("chat prompt, but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = prompt.text or ""
            ids = tokenizer(text)["input_ids"]
        ids = [int(i) for i in ids]
        decoded = tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
    except PromptRejectedError:
        raise
    except Exception as exc:  # tokenizers and jinja raise many unrelated types
        raise PromptRejectedError(f"cannot tokenise: {type(exc).__name__}: {exc}") from None
    if not ids:
        raise PromptRejectedError("the prompt encodes to no tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise PromptRejectedError(
            f"cannot tokenise: {ids.count(unk)} character(s) map to the unknown token "
            f"{getattr(tokenizer, 'unk_token', unk)!r}"
        )
    lost = _lost_characters(_visible(text, tokenizer), decoded)
    if lost:
        raise PromptRejectedError(
            f"cannot tokenise: the vocabulary drops {lost!r} (the model would see another prompt)"
        )
    if len(ids) >= max_model_len:
        raise PromptRejectedError(
            f"prompt too long: {len(ids)} tokens, the model's context is {max_model_len} "
            "(no room for a completion)"
        )
    return ids


def _visible(text: str, tokenizer: Any) -> str:
    """``text`` without the special tokens a template rendered (decode skips them too).

    Besides the named ones (bos, eos, ``additional_special_tokens``), a tokenizer trained with
    ``tokenizers`` may mark chat markers such as ``<|im_start|>`` special only in its added
    vocabulary; decode skips those as well, so they are removed here too."""
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(t.content for t in added.values() if getattr(t, "special", False))
    for token in sorted(tokens, key=len, reverse=True):
        if token:
            text = text.replace(token, "")
    return text


def _lost_characters(text: str, decoded: str) -> str:
    """Characters of ``text`` that the encode/decode round trip lost, up to whitespace and
    Unicode normalisation (tokenizers legitimately normalise both)."""

    def canon(s: str) -> str:
        return "".join(unicodedata.normalize("NFKC", s).split())

    want, got = canon(text), canon(decoded)
    if want == got:
        return ""
    missing = [ch for ch in dict.fromkeys(want) if want.count(ch) > got.count(ch)]
    return "".join(missing)[:20] or want[:20]
