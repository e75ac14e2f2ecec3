"""Random stream entries never crash a reader: each one either decodes to its message or is
dead-lettered with the reason, and the reader keeps going.

Hypothesis writes arbitrary entries (random field names and values, missing or extra fields,
non-UTF-8 keys, random bytes, corrupted valid payloads, valid payloads of the wrong message type)
next to valid ones into a stream, as a foreign or buggy writer could, and a ``StreamQueue``
reads them the way every service does: fresh reads, reclaims by another consumer, and a
restarted consumer's own pending entries. (``tests/conspo/test_protocol.py`` covers the
decoders alone: random bytes only ever raise ``DecodeError``.)
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conspo.protocol import (
    Completion,
    DeadLetter,
    Prompt,
    RolloutGroup,
    SamplingParams,
    decode,
    encode,
)
from conspo.queue import StreamQueue

pytestmark = pytest.mark.chaos
EXAMPLES = 300 if os.environ.get("CONSPO_CHAOS_LONG", "").strip() not in ("", "0", "false") else 40

PROMPT = Prompt(prompt_id="p-1", text="What is 1+1?", answer="2", verifier="arith")
GROUP = RolloutGroup(
    group_id="g-1",
    prompt=PROMPT,
    prompt_token_ids=[1, 2],
    completions=[Completion(token_ids=[3], logprobs=[-0.5], text="2", finish_reason="stop")],
    policy_version=0,
    sampling=SamplingParams(n=1),
)
VALID = {"prompts": (Prompt, encode(PROMPT)), "rollouts": (RolloutGroup, encode(GROUP))}
WRONG_TYPE = {"prompts": encode(GROUP), "rollouts": encode(PROMPT)}


@st.composite
def entries(draw: st.DrawFn, stream: str) -> tuple[dict[bytes, bytes], bool]:
    """(fields, is it valid)."""
    kind = draw(st.sampled_from(["valid", "random", "corrupt", "wrong_type", "no_d", "weird_k"]))
    valid = VALID[stream][1]
    key = draw(st.binary(min_size=1, max_size=12))
    if kind == "valid":
        return {b"k": b"key", b"d": valid}, True
    if kind == "random":
        fields = draw(
            st.dictionaries(
                st.binary(min_size=1, max_size=6), st.binary(max_size=300), min_size=1, max_size=4
            )
        )
        return fields, False
    if kind == "corrupt":
        raw = bytearray(valid)
        for _ in range(draw(st.integers(1, 6))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        cut = draw(st.integers(1, len(raw)))
        raw = raw[:cut]
        try:  # a mutation may leave a payload that still decodes: then it is a valid entry
            decode(bytes(raw), VALID[stream][0])
            return {b"k": key, b"d": bytes(raw)}, True
        except Exception:
            return {b"k": key, b"d": bytes(raw)}, False
    if kind == "wrong_type":
        return {b"k": key, b"d": WRONG_TYPE[stream]}, False
    if kind == "no_d":
        return {b"k": key, b"x": valid}, False
    return {b"k": b"\xff\xfe" + key, b"d": valid}, True  # a non-UTF-8 key, valid payload


@pytest.mark.parametrize("stream", ["prompts", "rollouts"])
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_entries_are_dead_lettered_never_crash_the_reader(redis_client, keys, stream, data):
    batch = data.draw(st.lists(entries(stream), min_size=1, max_size=8))
    redis_client.delete(keys.stream(stream), keys.dead, keys.failures)
    queue = StreamQueue(redis_client, keys, stream, VALID[stream][0], visibility_timeout_s=0.001)
    queue.ensure_group()
    for fields, _ in batch:
        redis_client.xadd(keys.stream(stream), fields)
    n_valid = sum(ok for _, ok in batch)

    got = queue.read("reader", count=len(batch), block_ms=None)
    assert len(got) == n_valid
    assert all(isinstance(d.message, VALID[stream][0]) for d in got)
    dead = redis_client.xrange(keys.dead)
    assert len(dead) == len(batch) - n_valid
    for _, fields in dead:
        letter = decode(fields[b"d"], DeadLetter)
        assert letter.source == stream and letter.reason.startswith("undecodable")
    backlog = queue.backlog()
    assert (backlog.pending, backlog.lag) == (n_valid, 0)  # invalid ones were acked with it

    # A restarted consumer, and another consumer reclaiming, see only the valid ones.
    assert len(queue.read_own_pending("reader")) == n_valid
    other = StreamQueue(redis_client, keys, stream, VALID[stream][0], visibility_timeout_s=0.001)
    time.sleep(0.01)  # idle past the (1 ms) visibility timeout
    reclaimed = other.read("other", count=len(batch) + 1, block_ms=None)
    assert len(reclaimed) == n_valid
    assert len(redis_client.xrange(keys.dead)) == len(batch) - n_valid
