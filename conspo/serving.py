"""What the workers offer, published for the api's admission checks.

The api refuses at the door what can only fail later (``services.api.admission``), but it runs
neither a model nor a grader: the workers tell it.

- Verifier replicas add the names they can grade (built-ins and plugins, as imported in the
  replica) to the run's ``verifiers`` set at start-up and every few seconds. A set only grows: a
  name some replica offered stays accepted, since that replica may be restarting.
- Generators write a ``ServedModel``: the context length, where the tokenizer lives (so an api
  on the same filesystem can count tokens exactly) and the longest token of the vocabulary in
  characters (so any api can bound the token count from below without a tokenizer). The
  generators of one run serve one model; the newest writer wins.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import redis
from pydantic import BaseModel, Field, ValidationError

from conspo.keys import Keys
from conspo.redis_conn import as_text


class ServedModel(BaseModel):
    max_model_len: int = Field(ge=1)
    tokenizer_path: str | None = Field(
        default=None, description="The model folder (its tokenizer.json) on the generator's host."
    )
    max_token_chars: int = Field(
        ge=1, description="Characters of the longest token: tokens >= characters / this."
    )
    instance: str = ""
    at: float = Field(default_factory=time.time)


def max_token_chars(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry (added tokens included). Byte-level and
    sentencepiece vocabularies spell a token with at least as many characters as it decodes
    to, so a text of C characters needs at least C / this many tokens."""
    vocab = tokenizer.get_vocab()
    return max((len(token) for token in vocab), default=1) or 1


def publish_served_model(client: redis.Redis, keys: Keys, model: ServedModel) -> None:
    client.set(keys.serving, model.model_dump_json())


def read_served_model(client: redis.Redis, keys: Keys) -> ServedModel | None:
    raw = client.get(keys.serving)
    return parse_served_model(raw) if raw is not None else None


def parse_served_model(raw: bytes | str) -> ServedModel | None:
    try:
        return ServedModel.model_validate_json(raw)
    except (ValidationError, ValueError):
        return None  # a foreign or older writer: no length check rather than a crash


def publish_verifiers(client: redis.Redis, keys: Keys, names: Iterable[str]) -> None:
    names = sorted(set(names))
    if names:
        client.sadd(keys.verifiers, *names)


def read_verifiers(client: redis.Redis, keys: Keys) -> set[str]:
    return {as_text(n) for n in client.smembers(keys.verifiers)}
