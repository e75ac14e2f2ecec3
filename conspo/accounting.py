"""The books of a run: where every submitted prompt ended up.

One module, used by the local stack (``conspo.launch``), the tests and benchmarks built on it,
the chaos suite, and the api's ``GET /v1/accounting`` (which ``deploy/compose_check.py`` reads to
prove a ``docker compose`` stack lost nothing). It keeps two views of the same facts, read the
same way (idempotency markers, the dead letters, what each stream's group still has to finish):

- ``accounting``, a balance: counts per fate. Every submitted prompt is either generated, still
  queued, or dead-lettered; every generated group is labelled, queued or dead; every labelled
  group is trained, skipped, dropped, queued or dead. What is left over is *lost* and must be
  zero. A group trained more than once (the learner's tally above 1) is *duplicated* and must be
  zero too. Cost grows with the number of markers, not of entries, so it works on trimmed
  streams.
- ``fates``, a trace: the fate of every prompt entry still in ``prompts``, one by one. It needs
  the streams untrimmed (the chaos stacks keep every entry), and is what finds *which* prompt
  was lost and at which stage. The chaos suite checks that both views agree.

Both read markers, not counters, because markers are written once per item even when a stage is
killed and redone, while counters may count a replayed step twice (``submitted`` is the one
counter used). The reads are many, not one atomic snapshot: exact while nothing moves (a stopped
or frozen pipeline); while the run is going, an item that moves between two reads can show as
lost or found for an instant.
"""

from __future__ import annotations

from collections import Counter

import redis

from conspo.counters import API_PROMPTS_ACCEPTED, API_PROMPTS_FED
from conspo.keys import Keys
from conspo.lineage import GENERATE, LEARN, VERIFY, group_id_for, parse_learn_marker
from conspo.protocol import DeadLetter, Message
from conspo.queue import StreamQueue, depths, markers
from conspo.redis_conn import as_text
from conspo.state import RunStore

STAGES = ("prompts", "rollouts", "labeled")


def _queues(client: redis.Redis, keys: Keys) -> dict[str, StreamQueue]:
    return {name: StreamQueue(client, keys, name, Message) for name in STAGES}


def _dead(client: redis.Redis, keys: Keys) -> StreamQueue[DeadLetter]:
    return StreamQueue(client, keys, "dead", DeadLetter)


def _markers(client: redis.Redis, keys: Keys, stage: str) -> int:
    return sum(1 for _ in client.scan_iter(match=keys.done(stage, "*"), count=1000))


def accounting(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """Counts per fate, from idempotency markers and stream state; ``lost`` must be 0."""
    learn: Counter[str] = Counter()
    for key in client.scan_iter(match=keys.done(LEARN, "*"), count=1000):
        value = client.get(key)
        if value is not None:
            learn[parse_learn_marker(as_text(value))[0]] += 1
    generated = _markers(client, keys, GENERATE)
    labelled = _markers(client, keys, VERIFY)
    dead: Counter[str] = Counter(
        e.message.source if e.message is not None else "undecodable"
        for e in _dead(client, keys).entries()
    )
    queued = {
        name: backlog.outstanding
        for name, backlog in zip(STAGES, depths(list(_queues(client, keys).values())), strict=True)
    }
    store = RunStore(client, keys)
    submitted = store.counter(API_PROMPTS_ACCEPTED) + store.counter(API_PROMPTS_FED)
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


def fates(client: redis.Redis, keys: Keys) -> dict[str, str]:
    """``prompt entry id -> fate`` for every entry of ``prompts``, one by one.

    trained / skipped / dropped: the group's LEARN marker; dead: a dead letter at any stage;
    queued: still pending or undelivered in the stream of the stage it is at; otherwise lost
    (with the stage it vanished after: ``lost@generate`` / ``lost@verify`` / ``lost@learn``).
    Needs the streams untrimmed."""
    queues = _queues(client, keys)
    prompts = [e.entry_id for e in queues["prompts"].entries()]
    dead_prompts: set[str] = set()
    dead_groups: set[str] = set()
    for entry in _dead(client, keys).entries():
        if entry.message is None:
            continue
        if entry.message.source == "prompts":
            dead_prompts.add(entry.message.entry_id)
        else:
            dead_groups.add(entry.key)
    open_prompts = queues["prompts"].unfinished()
    open_groups = {
        name: set(queues[name].entry_keys(sorted(queues[name].unfinished())).values())
        for name in ("rollouts", "labeled")
    }
    out: dict[str, str] = {}
    for i in range(0, len(prompts), 500):
        chunk = prompts[i : i + 500]
        gids = [group_id_for(e) for e in chunk]
        wanted = []
        for e, g in zip(chunk, gids, strict=True):
            wanted += [(LEARN, g), (VERIFY, g), (GENERATE, e)]
        replies = markers(client, keys, wanted)
        for j, (e, g) in enumerate(zip(chunk, gids, strict=True)):
            learned, verified, generated = replies[3 * j : 3 * j + 3]
            if learned is not None:
                out[e] = parse_learn_marker(learned)[0]
            elif e in dead_prompts or g in dead_groups:
                out[e] = "dead"
            elif verified is not None:
                out[e] = "queued" if g in open_groups["labeled"] else "lost@learn"
            elif generated is not None:
                out[e] = "queued" if g in open_groups["rollouts"] else "lost@verify"
            else:
                out[e] = "queued" if e in open_prompts else "lost@generate"
    return out


def summarize(fates: dict[str, str], entries: list[str] | None = None) -> Counter:
    """Fates counted (every ``lost@...`` as ``lost``), of all prompts or of ``entries``."""
    chosen = fates if entries is None else {e: fates.get(e, "lost@unknown") for e in entries}
    out: Counter[str] = Counter()
    for fate in chosen.values():
        out["lost" if fate.startswith("lost") else fate] += 1
    return out
