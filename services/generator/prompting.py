"""Turning a ``Prompt`` into the token ids the model sees, and the per-group sampling settings.

Formatting rules (the learner's teacher forcing sees exactly these ids, from the rollout):

- ``text`` prompts are encoded with the tokenizer's default special tokens (a BOS for models that
  want one); ``messages`` prompts are rendered with the tokenizer's own chat template and
  ``add_generation_prompt=True``, then encoded WITHOUT adding special tokens (templates render
  their own BOS). Rendering and encoding are separate steps so that the result does not depend
  on what ``apply_chat_template(tokenize=True)`` returns in a given transformers version.
- A prompt is refused (``PromptRejectedError``, dead-lettered by the loop with the reason) when
  the template fails, when it encodes to nothing, when the vocabulary cannot represent it (the
  unknown token appears, or the encode/decode round trip loses characters: the model would see
  another prompt than was asked; whitespace and Unicode normalisation are tolerated), or when it
  leaves no room for a single generated token in the model's context.

The seed of a group is a pure function of the run's seed and the prompt's stream entry id, so a
prompt that is redone after a crash is sampled with the same seed (and, with a backend that
seeds per group, gives the same completions).
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Any

from conspo.protocol import Prompt, SamplingParams


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
    """``text`` without the special tokens a template rendered (decode skips them too)."""
    for token in getattr(tokenizer, "all_special_tokens", []) or []:
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


def group_seed(run_seed: int, entry_id: str) -> int:
    """A 31-bit seed from the run's seed and the prompt's entry id (stable across processes)."""
    digest = hashlib.blake2b(f"{run_seed}:{entry_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


def group_params(
    base: SamplingParams, *, prompt_len: int, max_model_len: int, seed: int
) -> SamplingParams:
    """``base`` with this group's seed, and the token budget cut to what the context leaves."""
    budget = max(1, min(base.max_tokens, max_model_len - prompt_len))
    return base.model_copy(update={"seed": seed, "max_tokens": budget})
