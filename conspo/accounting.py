"""The books of a run: where every submitted prompt ended up.

One function, used by the local stack (``conspo.launch``), the tests and benchmarks built on it,
and the api's ``GET /v1/accounting`` (which ``deploy/compose_check.py`` reads to prove a
``docker compose`` stack lost nothing).

The books read the idempotency markers (``conspo.lineage``), not counters, because markers are
written once per item even when a stage is killed and redone, while counters may count a replayed
step twice. Every submitted prompt is either generated, still queued, or dead-lettered; every
generated group is labelled, queued or dead; every labelled group is trained, skipped, dropped,
queued or dead. What is left over is *lost* and must be zero. A group trained more than once
(the learner's tally above 1) is *duplicated* and must be zero too.

The reads are many (one SCAN per stage), not one atomic snapshot: exact while nothing moves (a
stopped or frozen pipeline); while the run is going, an item that moves between two reads can
show as lost or found for an instant. Cost grows with the number of markers.
"""

from __future__ import annotations

from collections import Counter

import redis

from conspo.counters import API_PROMPTS_ACCEPTED, API_PROMPTS_FED
from conspo.keys import Keys
from conspo.lineage import GENERATE, LEARN, VERIFY, parse_learn_marker
from conspo.protocol import DeadLetter, DecodeError, Prompt, decode
from conspo.queue import StreamQueue


def accounting(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """Counts per fate, from idempotency markers and stream state; ``lost`` must be 0."""
    learn: Counter[str] = Counter()
    for key in client.scan_iter(match=keys.done(LEARN, "*"), count=1000):
        value = client.get(key)
        if value is not None:
            learn[parse_learn_marker(value.decode())[0]] += 1
    generated = sum(1 for _ in client.scan_iter(match=keys.done(GENERATE, "*"), count=1000))
    labelled = sum(1 for _ in client.scan_iter(match=keys.done(VERIFY, "*"), count=1000))
    dead: Counter[str] = Counter()
    for _, fields in client.xrange(keys.dead):
        try:
            dead[decode(fields[b"d"], DeadLetter).source] += 1
        except DecodeError:
            dead["undecodable"] += 1
    queued = {}
    for name in ("prompts", "rollouts", "labeled"):
        if client.exists(keys.stream(name)):
            queued[name] = StreamQueue(client, keys, name, Prompt).backlog().outstanding
        else:
            queued[name] = 0
    totals = {k.decode(): int(v) for k, v in client.hgetall(keys.counters).items()}
    submitted = totals.get(API_PROMPTS_ACCEPTED, 0) + totals.get(API_PROMPTS_FED, 0)
    out = {
        "submitted": submitted,
        "generated": generated,
        "labelled": labelled,
        "trained": learn["trained"],
        "skipped": learn["skipped"],
        "dropped": learn["dropped"],
        "dead": sum(dead.values()),
        "queued_prompts": queued["prompts"],
        "queued_rollouts": queued["rollouts"],
        "queued_labeled": queued["labeled"],
    }
    out["lost"] = (
        (submitted - generated - dead["prompts"] - queued["prompts"])
        + (generated - labelled - dead["rollouts"] - queued["rollouts"])
        + (labelled - sum(learn.values()) - dead["labeled"] - queued["labeled"])
    )
    out["duplicated"] = sum(int(n) > 1 for n in client.hvals(keys.tally(LEARN)))
    return out
