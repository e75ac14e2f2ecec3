"""Publishing prompts, once per Idempotency-Key.

Without a key, prompts go out in one MULTI/EXEC with the accepted counter (so the counter always
matches the stream, whatever is retried). With a key, one Lua script does it
all atomically: if ``keys.idempotency(key)`` exists it returns the stored record; otherwise it
XADDs every prompt and stores ``{fp, prompt_ids, entry_ids}`` under the key with a TTL. Redis runs
a script to completion before any other command, so concurrent retries with the same key cannot
both enqueue: exactly one runs the XADDs and the others read its record. There is no "in
progress" state to expire or take over, and a crash before the script leaves nothing behind.

``fp`` is a SHA-256 of the canonical request (the validated body as sorted JSON): a retry with
the same key and a different body is refused with a reason instead of replaying an answer that
belongs to another request. Records live in the run's namespace for ``idempotency_ttl_s``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from conspo.protocol import MessageTooLargeError, Prompt, encode
from conspo.queue import StreamQueue
from services.api.errors import ApiError

_PUBLISH_ONCE = """
-- KEYS[1] idempotency record, KEYS[2] prompts stream, KEYS[3] counters hash
-- ARGV[1] ttl seconds, ARGV[2] request fingerprint, ARGV[3] prompt ids (JSON), then (k, d) pairs
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
local ids = {}
for i = 4, #ARGV, 2 do
  ids[#ids + 1] = redis.call('XADD', KEYS[2], '*', 'k', ARGV[i], 'd', ARGV[i + 1])
end
local record = cjson.encode({fp = ARGV[2], prompt_ids = cjson.decode(ARGV[3]), entry_ids = ids})
redis.call('SET', KEYS[1], record, 'EX', ARGV[1])
redis.call('HINCRBY', KEYS[3], 'api.prompts_accepted', #ids)
return {1, record}
"""

ACCEPTED_COUNTER = "api.prompts_accepted"


def fingerprint(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Published:
    prompt_ids: list[str]
    entry_ids: list[str]
    replayed: bool


class PromptPublisher:
    def __init__(self, queue: StreamQueue[Prompt], ttl_s: int) -> None:
        self.queue = queue
        self.ttl_s = ttl_s
        self._script = queue.client.register_script(_PUBLISH_ONCE)

    def _encode(self, prompts: list[Prompt]) -> list[bytes]:
        try:
            return [encode(p, max_bytes=self.queue.max_entry_bytes) for p in prompts]
        except MessageTooLargeError as exc:
            raise ApiError(413, "entry_too_large", str(exc)) from None

    def publish(self, prompts: list[Prompt]) -> Published:
        """Without a key: the XADDs and the accepted counter in one MULTI/EXEC, so that the
        counter always matches the entries, even when the client library retries the whole
        transaction after a lost reply (then both happen twice: the request had no key)."""
        payloads = self._encode(prompts)  # everything is encoded before anything is sent
        self.queue.ensure_group()
        pipe = self.queue.client.pipeline(transaction=True)
        for prompt, data in zip(prompts, payloads, strict=True):
            pipe.xadd(self.queue.key, {"k": prompt.prompt_id, "d": data})
        pipe.hincrby(self.queue.keys.counters, ACCEPTED_COUNTER, len(prompts))
        replies = pipe.execute()
        ids = [x.decode() if isinstance(x, bytes) else str(x) for x in replies[:-1]]
        return Published([p.prompt_id for p in prompts], ids, replayed=False)

    def publish_once(self, key: str, fp: str, prompts: list[Prompt]) -> Published:
        self.queue.ensure_group()
        payloads = self._encode(prompts)
        args: list[str | bytes | int] = [
            self.ttl_s,
            fp,
            json.dumps([p.prompt_id for p in prompts]),
        ]
        for prompt, data in zip(prompts, payloads, strict=True):
            args.extend([prompt.prompt_id, data])
        keys = [self.queue.keys.idempotency(key), self.queue.key, self.queue.keys.counters]
        fresh, raw = self._script(keys=keys, args=args)
        record = json.loads(raw)
        if record.get("fp") != fp:
            raise ApiError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request body; "
                "use a new key for a new request",
            )
        return Published(
            [str(x) for x in record["prompt_ids"]],
            [x.decode() if isinstance(x, bytes) else str(x) for x in record["entry_ids"]],
            replayed=not bool(fresh),
        )
