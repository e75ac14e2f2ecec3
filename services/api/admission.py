"""Refusing at the door what can only fail later: 422 with a reason instead of a silent 202.

A prompt accepted with 202 that no stage can handle fails minutes later, far from the client:
dead-lettered by the generator, or graded ``error`` on every completion. What the api can know
at request time it checks here, for ``POST /v1/prompts`` and for dataset rows:

- an empty prompt (only whitespace, or chat messages without content) or an empty gold answer:
  ``empty_prompt``, ``empty_answer``;
- a verifier no replica offers: ``unknown_verifier``. The names come from what the verifier
  replicas publish (``conspo.serving``: built-ins and plugins, as each replica imported them).
  Until a replica has published, the api's own ``verifiers`` setting stands in (the built-ins
  by default; add plugin names there to submit before any verifier has started);
- a prompt that cannot fit the served model's context: ``prompt_too_long``. Known only once a
  generator has published what it serves; before that, no length check. When the generator's
  tokenizer folder is readable here (one machine, a shared volume) the api counts with that
  ``tokenizer.json`` (the ``tokenizers`` library, no model, no transformers); otherwise it uses
  a bound that needs no tokenizer: a text of C characters has at least C / (characters of the
  longest vocabulary entry) tokens. Either way the count is a lower bound on what the generator
  will count (specials and the chat template only add tokens; chat contents are counted one by
  one, less one token per message for merges at the template's seams), so a prompt that would
  fit is never refused, while one that certainly cannot is.

Everything else a generator may refuse (characters the vocabulary lacks, a template that fails)
is still dead-lettered downstream with its reason: the api does not tokenise like the generator.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from conspo.keys import Keys
from conspo.redis_conn import as_text
from conspo.serving import ServedModel, parse_served_model, read_served_model, read_verifiers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str
    field: str  # the request field it is about


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    """``tokenizers.Tokenizer`` of a model folder, or None if it cannot be read here."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(file))
    except Exception as exc:  # a corrupt or foreign file: fall back to the character bound
        log.warning("cannot read %s (prompt lengths use the character bound): %s", file, exc)
        return None


@dataclass(frozen=True)
class Basis:
    """The raw Redis values an ``Admission`` was computed from: the publish script compares
    them with the current ones, so a cached admission is only ever used while it is exact."""

    served_raw: bytes  # the serving key's value, b"" when absent
    published: tuple[bytes, ...]  # the verifier names set, as stored


@dataclass(frozen=True)
class Admission:
    """What the api knows about the workers at the time of one request."""

    verifiers: frozenset[str]
    verifiers_from: str  # "verifiers" (published) or "settings"
    served: ServedModel | None
    basis: Basis | None = None  # set by ``aread``

    @classmethod
    def read(cls, client: redis.Redis, keys: Keys, fallback: list[str]) -> Admission:
        published = frozenset(read_verifiers(client, keys))
        served = read_served_model(client, keys)
        return cls._of(published, served, fallback)

    @classmethod
    async def aread(cls, client: aioredis.Redis, keys: Keys, fallback: list[str]) -> Admission:
        """``read`` for the async request path: both reads in one round trip, with their
        ``basis``."""
        async with client.pipeline(transaction=False) as pipe:
            pipe.smembers(keys.verifiers)
            pipe.get(keys.serving)
            names, raw = await pipe.execute()
        served = parse_served_model(raw) if raw is not None else None
        admission = cls._of(frozenset(as_text(n) for n in names), served, fallback)
        basis = Basis(raw if raw is not None else b"", tuple(sorted(names)))
        return dataclasses.replace(admission, basis=basis)

    @classmethod
    def _of(
        cls, published: frozenset[str], served: ServedModel | None, fallback: list[str]
    ) -> Admission:
        if published:
            return cls(published, "verifiers", served)
        return cls(frozenset(fallback), "settings", served)

    # -- checks -----------------------------------------------------------------------------------
    def check_verifier(self, name: str) -> Refusal | None:
        if name in self.verifiers:
            return None
        where = (
            "the verifier replicas offer"
            if self.verifiers_from == "verifiers"
            else "no verifier has started yet; the api's `verifiers` setting allows"
        )
        return Refusal(
            "unknown_verifier",
            f"no verifier named {name!r}: {where} {', '.join(sorted(self.verifiers)) or 'none'}",
            "verifier",
        )

    def check_prompt(
        self, text: str | None, contents: list[str] | None, answer: str
    ) -> Refusal | None:
        """``text`` for a plain prompt, ``contents`` (message contents) for a chat one."""
        pieces = [text or ""] if contents is None else contents
        field = "text" if contents is None else "messages"
        if not any(p.strip() for p in pieces):
            what = "text is empty" if contents is None else "chat messages have no content"
            return Refusal("empty_prompt", f"the prompt {what}: nothing to generate from", field)
        if not answer.strip():
            return Refusal(
                "empty_answer", "the gold answer is empty: nothing to grade against", "answer"
            )
        return self._check_length(pieces, field)

    def _check_length(self, pieces: list[str], field: str) -> Refusal | None:
        served = self.served
        if served is None:
            return None
        limit = served.max_model_len
        tokenizer = _tokenizer(served.tokenizer_path) if served.tokenizer_path else None
        if tokenizer is not None:
            counts = [len(tokenizer.encode(p, add_special_tokens=False).ids) for p in pieces]
            tokens = sum(counts) - (len(pieces) if field == "messages" else 0)
            how = "counted with the served model's tokenizer"
        else:
            chars = sum(len(p) for p in pieces)
            tokens = math.ceil(chars / served.max_token_chars)
            how = (
                f"{chars:,} characters, at most {served.max_token_chars} per token in the "
                "served vocabulary"
            )
        if tokens < limit:
            return None
        return Refusal(
            "prompt_too_long",
            f"the prompt has at least {tokens:,} tokens ({how}); the served model's context is "
            f"{limit:,} tokens, which leaves no room for a completion",
            field,
        )
