"""Publishing prompts: once per Idempotency-Key, and once per prompt id in the run.

One Lua script does it all, atomically, with or without a key. Redis runs a script to completion
before any other command, so concurrent requests (on any number of api replicas) cannot
interleave inside it:

0. given the ``Basis`` of the admission the request was checked against (the served model and
   verifier names, ``services.api.admission``), confirm they are still the current values, else
   write nothing and answer "stale" (the route re-reads and checks again). This lets the route
   keep its admission across requests and spend one round trip per request, not two, without
   ever admitting against outdated values;
1. with an Idempotency-Key: if ``keys.idempotency(key)`` exists, return its stored record;
2. for every prompt, look its id up in ``keys.prompt_ids`` (``<item fingerprint> <entry id>``):
   an id already used for a different prompt refuses the whole request (409, nothing written);
3. XADD the prompts whose id is new and record them; a prompt whose id is known with the same
   fingerprint is not enqueued again: its original entry id is replayed (``replayed``);
4. count what was enqueued in ``api.prompts_accepted`` (``conspo.counters``); with a key, store
   ``{fp, prompt_ids, entry_ids, replayed}`` under it with a TTL.

So a prompt id names one prompt for the whole run, whoever sends it and however often; a client
that retries without a key still enqueues once (its ids are the same), and generated ids
(``p-...``) are recorded too, so even the client library's own retry of the script cannot
enqueue twice. There is no "in progress" state to expire or take over, and a crash before the
script leaves nothing behind.

``fp`` is a SHA-256 of the canonical request (the validated body as sorted JSON): a retry with
the same key and a different body is refused with a reason instead of replaying an answer that
belongs to another request. The item fingerprint is the same hash over one prompt without its
id. Key records live for ``idempotency_ttl_s``; prompt ids for the run (dataset prompts, fed by
the feeder under ``<dataset>:<row id>:<epoch>``, are not in this registry).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from conspo import counters
from conspo.protocol import MessageTooLargeError, Prompt, encode
from conspo.queue import XADD_ENTRY, StreamQueue
from conspo.redis_conn import as_text
from services.api.admission import Basis
from services.api.errors import ApiError

_PUBLISH = (
    XADD_ENTRY
    + """
-- KEYS[1] idempotency record (unused without a key), KEYS[2] prompts stream, KEYS[3] counters,
-- KEYS[4] prompt-id registry, KEYS[5] served model, KEYS[6] verifier names. ARGV[1] ttl,
-- ARGV[2] request fingerprint, ARGV[3] '1' with a key, ARGV[4] prompt ids (JSON), ARGV[5] the
-- accepted counter, ARGV[6] '1' to check the admission basis, ARGV[7] the served model it saw,
-- ARGV[8] n, ARGV[9 .. 8 + n] the verifier names it saw, then (prompt id, item fingerprint, k, d)
-- per prompt.
local n = tonumber(ARGV[8])
if ARGV[6] == '1' then
  local stale = (redis.call('GET', KEYS[5]) or '') ~= ARGV[7]
    or redis.call('SCARD', KEYS[6]) ~= n
  for i = 9, 8 + n do
    if stale then break end
    stale = redis.call('SISMEMBER', KEYS[6], ARGV[i]) == 0
  end
  if stale then return {-2} end
end
if ARGV[3] == '1' then
  local existing = redis.call('GET', KEYS[1])
  if existing then return {0, existing} end
end
local first = 9 + n
local known = {}
for a = first, #ARGV, 4 do
  local old = redis.call('HGET', KEYS[4], ARGV[a])
  if old then
    local fp, entry = string.match(old, '^(%S+) (%S+)$')
    if fp ~= ARGV[a + 1] then return {-1, ARGV[a], entry or ''} end
    known[a] = entry
  end
end
local ids, replayed, fresh = {}, {}, 0
for a = first, #ARGV, 4 do
  if known[a] then
    ids[#ids + 1] = known[a]
    replayed[#replayed + 1] = ARGV[a]
  else
    local id = xadd_entry(KEYS[2], ARGV[a + 2], ARGV[a + 3])
    redis.call('HSET', KEYS[4], ARGV[a], ARGV[a + 1] .. ' ' .. id)
    ids[#ids + 1] = id
    fresh = fresh + 1
  end
end
if fresh > 0 then redis.call('HINCRBY', KEYS[3], ARGV[5], fresh) end
local record = cjson.encode({fp = ARGV[2], prompt_ids = cjson.decode(ARGV[4]), entry_ids = ids,
                             replayed = replayed})
if ARGV[3] == '1' then redis.call('SET', KEYS[1], record, 'EX', ARGV[1]) end
return {1, record}
"""
)


def fingerprint(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class StaleAdmissionError(Exception):
    """The admission basis given to ``apublish`` is no longer current: nothing was written."""


@dataclass(frozen=True)
class Published:
    prompt_ids: list[str]
    entry_ids: list[str]
    replayed: bool
    known: list[str]  # prompt ids already in the run with the same prompt: not enqueued again

    @property
    def enqueued(self) -> int:
        return 0 if self.replayed else len(self.entry_ids) - len(self.known)


class PromptPublisher:
    """The publish script over the sync client (``publish``) or the async one (``apublish``, the
    request path): the same arguments, the same reply handling, one round trip either way."""

    def __init__(
        self, queue: StreamQueue[Prompt], ttl_s: int, aclient: aioredis.Redis | None = None
    ) -> None:
        self.queue = queue
        self.ttl_s = ttl_s
        self._script = queue.client.register_script(_PUBLISH)
        self._aclient = aclient
        self._ascript = aclient.register_script(_PUBLISH) if aclient is not None else None
        self._agroup_ready = False

    def _encode(self, prompts: list[Prompt]) -> list[bytes]:
        try:
            return [encode(p, max_bytes=self.queue.max_entry_bytes) for p in prompts]
        except MessageTooLargeError as exc:
            raise ApiError(413, "entry_too_large", str(exc)) from None

    def publish(
        self, prompts: list[Prompt], item_fps: list[str], *, key: str | None = None, fp: str = ""
    ) -> Published:
        """Enqueue ``prompts`` (``item_fps``: one fingerprint per prompt, without its id), once
        per prompt id and, with ``key``, once per Idempotency-Key (see the module docstring)."""
        self.queue.ensure_group()
        keys, args = self._call(prompts, item_fps, key, fp)
        return self._result(self._script(keys=keys, args=args), prompts, key, fp)

    async def apublish(
        self,
        prompts: list[Prompt],
        item_fps: list[str],
        *,
        key: str | None = None,
        fp: str = "",
        basis: Basis | None = None,
    ) -> Published:
        """``publish`` on the async client given at construction; with ``basis``, only while
        it is current (else ``StaleAdmissionError``, nothing written)."""
        if self._aclient is None or self._ascript is None:
            raise RuntimeError("PromptPublisher was built without an async client")
        if not self._agroup_ready:  # once per app, like StreamQueue.ensure_group
            try:
                await self._aclient.xgroup_create(
                    self.queue.key, self.queue.group, id="0", mkstream=True
                )
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._agroup_ready = True
        keys, args = self._call(prompts, item_fps, key, fp, basis)
        return self._result(await self._ascript(keys=keys, args=args), prompts, key, fp)

    def _call(
        self,
        prompts: list[Prompt],
        item_fps: list[str],
        key: str | None,
        fp: str,
        basis: Basis | None = None,
    ) -> tuple[list[str], list[str | bytes | int]]:
        payloads = self._encode(prompts)  # everything is encoded before anything is sent
        keys = self.queue.keys
        args: list[str | bytes | int] = [
            self.ttl_s,
            fp,
            "1" if key is not None else "0",
            json.dumps([p.prompt_id for p in prompts]),
            counters.API_PROMPTS_ACCEPTED,
            "0" if basis is None else "1",
            b"" if basis is None else basis.served_raw,
            0 if basis is None else len(basis.published),
            *(basis.published if basis is not None else ()),
        ]
        for prompt, item_fp, data in zip(prompts, item_fps, payloads, strict=True):
            args.extend([prompt.prompt_id, item_fp, prompt.prompt_id, data])
        record_key = keys.idempotency(key) if key is not None else keys.prompt_ids
        stream = self.queue.key
        return [
            record_key,
            stream,
            keys.counters,
            keys.prompt_ids,
            keys.serving,
            keys.verifiers,
        ], args

    @staticmethod
    def _result(reply: list, prompts: list[Prompt], key: str | None, fp: str) -> Published:
        status = int(reply[0])
        if status == -2:
            raise StaleAdmissionError()
        if status == -1:
            taken, entry = (as_text(x) for x in reply[1:3])
            index = next(i for i, p in enumerate(prompts) if p.prompt_id == taken)
            raise ApiError(
                409,
                "prompt_id_conflict",
                f"prompt_id {taken!r} is already used in this run by another prompt (entry "
                f"{entry}); use a new id, or send the identical prompt to replay it",
                [{"loc": ["body", "prompts", str(index), "prompt_id"], "msg": "already used"}],
            )
        record = json.loads(reply[1])
        if key is not None and record.get("fp") != fp:
            raise ApiError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request body; "
                "use a new key for a new request",
            )
        return Published(
            [str(x) for x in record["prompt_ids"]],
            [str(x) for x in record["entry_ids"]],
            replayed=status == 0,
            known=[str(x) for x in (record.get("replayed") or [])],
        )
